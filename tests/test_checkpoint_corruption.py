"""Checkpoints that cannot be read: each kind of file Orbax writes is damaged in the newest of two
checkpoints; the older one is used with one warning line, or (both damaged) one error line names the
directories to remove. Nothing is deleted. End to end through `run_experiment --eval-only` and a resume."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut.checkpoint import UNREADABLE_DIR, CheckpointError, Checkpointer


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)  # random values: the array files do not compress away
    return {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(256,)), jnp.float32), "step": jnp.asarray(seed, jnp.int32)}


ABSTRACT = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints at steps 1 and 2 (data iterator bytes b'position-<step>')."""
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ckpt = Checkpointer(root, keep=2)
    for step in (1, 2):
        ckpt.save(step, _state(step), f"position-{step}".encode())
    ckpt.close()
    return root


def _zero_middle(path: str, n: int = 65536) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - n // 2))
        f.write(b"\0" * min(n, size))


def _largest(pattern: str) -> str:
    return max(glob.glob(pattern, recursive=True), key=os.path.getsize)


DAMAGE = {  # kind -> (how, the item the warning names)
    "array data": (lambda d: _zero_middle(_largest(f"{d}/state/ocdbt.process_0/d/*")), "state"),
    "array data truncated to 0 bytes": (lambda d: [os.truncate(p, 0) for p in glob.glob(f"{d}/state/ocdbt.process_0/d/*")],
                                        "state"),
    "tree metadata (_METADATA)": (lambda d: _zero_middle(f"{d}/state/_METADATA"), "state"),
    "array metadata": (lambda d: _zero_middle(f"{d}/state/array_metadatas/process_0"), "state"),
    "OCDBT manifest": (lambda d: _zero_middle(f"{d}/state/manifest.ocdbt"), "state"),
    "sharding metadata": (lambda d: _zero_middle(f"{d}/state/_sharding"), "state"),
    "data-iterator item": (lambda d: _zero_middle(f"{d}/data/metadata"), "data"),
    "data-iterator item not base64": (lambda d: Path(f"{d}/data/metadata").write_text(
        json.dumps({"iterator": "%%% not base64 %%%", "process": 0})), "data"),
    "truncated directory (half its files gone)": (
        lambda d: [os.remove(p) for p in sorted(q for q in glob.glob(f"{d}/**/*", recursive=True)
                                                if os.path.isfile(q))[::2]], "state"),
    "truncated directory (an item missing)": (lambda d: shutil.rmtree(f"{d}/state"), "state"),
}


def _damaged_copy(saved: Path, tmp_path: Path, kind: str, steps=(2,)) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root)
    for step in steps:
        DAMAGE[kind][0](str(root / str(step)))
    return root


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(saved, tmp_path, kind):
    root = _damaged_copy(saved, tmp_path, kind)
    lines: list[str] = []
    ckpt = Checkpointer(root, keep=2)
    step, (state, data) = ckpt.restore_latest(lambda s: ckpt.restore(s, ABSTRACT), log=lines.append)
    ckpt.close()
    assert step == 1 and data == b"position-1"
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: checkpoint at step 2 is unreadable ({DAMAGE[kind][1]}") and "using step 1" in lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 600, lines[0]
    assert (root / "2").exists() and not (tmp_path / UNREADABLE_DIR).exists()  # nothing moved or deleted


def test_resume_sets_the_unreadable_step_aside_and_can_save_it_again(saved, tmp_path):
    root = _damaged_copy(saved, tmp_path, "array data")
    lines: list[str] = []
    ckpt = Checkpointer(root, keep=2)
    step, _ = ckpt.restore_latest(lambda s: ckpt.restore(s, ABSTRACT), log=lines.append, set_aside=True)
    assert step == 1 and ckpt.all_steps() == [1]
    aside = tmp_path / UNREADABLE_DIR / "2"
    assert len(lines) == 1 and f"moved it to {aside}" in lines[0] and (aside / "state").is_dir()
    ckpt.save(2, _state(7), b"again")  # training reaches step 2 again
    ckpt.close()
    ckpt = Checkpointer(root, keep=2)
    step, (state, data) = ckpt.restore_latest(lambda s: ckpt.restore(s, ABSTRACT), log=lines.append)
    ckpt.close()
    assert step == 2 and data == b"again" and int(state["step"]) == 7 and len(lines) == 1


def test_no_readable_checkpoint_is_one_error_line_naming_what_to_remove(saved, tmp_path, capfd):
    root = _damaged_copy(saved, tmp_path, "array data", steps=(1, 2))
    ckpt = Checkpointer(root, keep=2)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(lambda s: ckpt.restore(s, ABSTRACT), log=pytest.fail)
    ckpt.close()
    message = str(e.value)
    assert "\n" not in message and f"remove {root / '2'} {root / '1'}" in message
    assert "step 2: state: ValueError" in message and "step 1: state:" in message
    assert (root / "1").exists() and (root / "2").exists()
    import gc
    gc.collect()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]


# ------------------------------------------------------------------------------ end to end (CLI)


SMOKE = ["digits_shortcut", "--smoke", "--in-process", "--no-tracking", "--set", "eval.steps=[1]"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """A finished --smoke digits run (checkpoints at steps 2 and 4), made in-process."""
    from orchestration.run_experiment import main

    workdir = tmp_path_factory.mktemp("runs")
    assert main(SMOKE + ["--workdir", str(workdir)]) == 0
    return workdir


def _copy_run(smoke_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    workdir = tmp_path / "runs"
    shutil.copytree(smoke_run, workdir)
    [ckpts] = list(workdir.glob("digits_shortcut/*/checkpoints"))
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [2, 4]
    return workdir, ckpts


def test_eval_only_and_resume_use_the_checkpoint_before_a_damaged_one(smoke_run, tmp_path, capsys):
    from orchestration.run_experiment import main

    workdir, ckpts = _copy_run(smoke_run, tmp_path)
    DAMAGE["array data"][0](str(ckpts / "4"))
    args = SMOKE + ["--workdir", str(workdir)]
    capsys.readouterr()
    assert main(args + ["--eval-only"]) == 0
    out = capsys.readouterr()
    warnings = [line for line in (out.out + out.err).splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and "step 4" in warnings[0] and "(state: ValueError" in warnings[0], warnings
    assert "evaluating the checkpoint at step 2" in out.out + out.err
    assert (ckpts / "4").exists()  # eval-only moves nothing

    assert main(args) == 0  # resume: from step 2, the damaged step 4 is set aside and trained again
    out = capsys.readouterr()
    assert "resumed from checkpoint at step 2" in out.out + out.err
    record = json.loads(next(workdir.glob("digits_shortcut/*/run.json")).read_text())
    assert record["status"] == "finished" and record["resumed_from"] == 2
    assert (ckpts.parent / UNREADABLE_DIR / "4" / "state").is_dir() and (ckpts / "4").is_dir()


def test_eval_only_with_no_readable_checkpoint_is_one_line_and_exit_1(smoke_run, tmp_path, capfd):
    from orchestration.run_experiment import main

    workdir, ckpts = _copy_run(smoke_run, tmp_path)
    DAMAGE["data-iterator item"][0](str(ckpts / "4"))
    DAMAGE["truncated directory (an item missing)"][0](str(ckpts / "2"))
    capfd.readouterr()
    assert main(SMOKE + ["--workdir", str(workdir), "--eval-only"]) == 1
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"remove {ckpts / '4'} {ckpts / '2'}" in errors[0], err[-3000:]
    assert "step 4: data (the data iterator's position): JSONDecodeError" in errors[0]
    assert "Traceback" not in err and "warning: checkpoint" not in err
