"""End-to-end runs: smoke runs of the paper specs, a short digits run, resume after SIGKILL, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from shortcut import methods
from shortcut.checkpoint import Checkpointer
from shortcut.record import git_provenance, jsonable, run_dir
from shortcut.run import run
from shortcut.spec import smoke_version
from shortcut.spec_files import list_specs, load_spec
from shortcut.train import (NonFiniteLossError, build_model, init_state, make_apply_fn, make_optimizer,
                            make_train_step, restore, train)

REPO = Path(__file__).resolve().parents[1]
SHORT = ["train.steps=40", "train.log_every=20", "train.checkpoint_every=20", "eval.steps=[128, 4, 1]",
         "eval.num_samples=64", "eval.batch_size=64", "eval.grid_size=16"]


# The default run covers the on-the-fly path with a paper spec; tests/test_latents.py the pre-encoded one.
LATENT_SMOKE = [("celeba_ditb_shortcut", "on_the_fly"),
                pytest.param("imagenet_ditb_shortcut", "pre_encoded", marks=pytest.mark.slow),
                pytest.param("celeba_ditb_flow", "on_the_fly", marks=pytest.mark.slow),
                pytest.param("imagenet_ditb_flow", "on_the_fly", marks=pytest.mark.slow),
                pytest.param("imagenet_ditxl_shortcut", "pre_encoded", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,encoding", LATENT_SMOKE)
def test_paper_specs_smoke_through_the_latent_path(name, encoding, tmp_path):
    """Mock 256x256 images -> (random reduced-width) VAE encode -> train on 32x32x4 latents -> sample ->
    decode -> the FID pipeline with stand-in weights; every stage labelled as a smoke check in the record."""
    spec = load_spec(name, [f"data.latent.encoding={encoding}"])
    record = run(smoke_version(spec), workdir=tmp_path, log=lambda s: None)
    assert record["status"] == "finished" and record["smoke"] is True
    assert "mock" in record["data"]
    assert record["spec"]["model"]["hidden_size"] == 32 and spec.input_shape == (32, 32, 4)
    assert record["spec"]["method"] == {**spec.model_dump(mode="json")["method"]}
    assert record["latent"]["encoding"] == encoding and record["latent"]["vae_weights_sha256"] is None
    assert "NOT sd-vae-ft-mse" in record["latent"]["vae"] and "smoke" in record["latent"]["note"]
    assert list(record["samples"]) == [s.samples_key for s in spec.eval.settings()]  # ImageNet: 128 at two scales
    for s in record["samples"].values():  # grids of decoded 256x256 images, not of latents
        grid = Image.open(s["grid"])
        assert grid.size[0] >= 256 * 2 and grid.mode == "RGB" and s["network_evaluations"] >= 1
    assert {e["num_steps"] for e in record["evaluation"]} == {128, 4, 1}
    assert all(e["metric"] == "fid_smoke" and "not an FID" in e["note"] and np.isfinite(e["value"])
               for e in record["evaluation"])
    if encoding == "pre_encoded":
        assert (Path(record["run_dir"]) / "latents" / "shortcut_latents.json").exists()
    assert json.loads((Path(record["run_dir"]) / "run.json").read_text())["status"] == "finished"


BASELINE_PAPER_SPECS = [n for n in list_specs() if n.startswith(("celeba_", "imagenet_"))
                        and not n.endswith(("_shortcut", "_flow"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINE_PAPER_SPECS)
def test_baseline_paper_specs_smoke(name, tmp_path):
    """Every baseline's CelebA/ImageNet spec end to end with --smoke (its teacher first, as a smoke run too)."""
    spec = load_spec(name, smoke=True)
    if spec.teacher is not None:
        assert run(spec.teacher_spec(), workdir=tmp_path, log=lambda s: None)["status"] == "finished"
    record = run(spec, workdir=tmp_path, log=lambda s: None)
    assert record["status"] == "finished" and set(record["samples"]) == {"128", "4", "1"}


def test_digits_run_writes_record_grids_and_checkpoints(tmp_path):
    spec = load_spec("digits_shortcut", SHORT)
    record = run(spec, workdir=tmp_path, log=lambda s: None)
    rundir = run_dir(spec, tmp_path)
    on_disk = json.loads((rundir / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(record, default=jsonable))
    assert isinstance(on_disk["evaluation"][0]["reference_provenance"]["count"], int)
    assert on_disk["status"] == "finished" and on_disk["spec_hash"] == spec.hash()
    assert on_disk["git_commit"] and on_disk["timings"]["train_s"] > 0
    assert [h["step"] for h in on_disk["train"]["history"]] == [20, 40]
    for h in on_disk["train"]["history"]:
        assert {"loss", "loss_flow", "loss_bootstrap", "steps_per_sec", "lr", "grad_norm"} <= set(h)
    assert on_disk["samples"]["1"]["network_evaluations"] == 1
    assert on_disk["samples"]["128"]["network_evaluations"] == 128
    assert all((rundir / "samples" / f"steps_{n}.png").exists() for n in (128, 4, 1))
    assert Checkpointer(rundir / "checkpoints", keep=2).all_steps() == [20, 40]
    assert "Total" in (rundir / "params.txt").read_text()
    # A rerun of a finished run resumes at the end and only samples again.
    again = run(spec, workdir=tmp_path, log=lambda s: None)
    assert again["resumed_from"] == 40 and again["train"]["history"] == []


def _final_params(rundir: Path, spec):
    model = build_model(spec)
    state = init_state(spec, model, make_optimizer(spec.optimizer))
    ckpt = Checkpointer(rundir / "checkpoints", keep=2)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    restored, _ = restore(ckpt, ckpt.latest_step(), abstract)
    ckpt.close()
    return restored


def _cli(workdir: Path, overrides: list[str]) -> list[str]:
    args = [sys.executable, "-m", "orchestration.run_experiment", "digits_shortcut", "--in-process", "--workdir",
            str(workdir)]
    for o in overrides:
        args += ["--set", o]
    return args


def test_provenance_names_changed_code_but_not_the_outputs_commands_write(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    for name in ("shortcut/train.py", "results/plans/a.json", "docs/planning.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "results/plans/a.json").write_text("2\n")  # a command's own outputs
    (tmp_path / "docs/planning.md").write_text("2\n")
    assert git_provenance(tmp_path) == {"git_commit": head, "git_changes": []}
    (tmp_path / "shortcut/train.py").write_text("2\n")
    assert git_provenance(tmp_path) == {"git_commit": head + "-dirty", "git_changes": ["M shortcut/train.py"]}


@pytest.mark.xdist_group("processes")  # xdist group: see conftest.py
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """SIGKILL after a checkpoint, rerun: it resumes there and ends with bitwise-identical parameters."""
    overrides = ["train.steps=120", "train.checkpoint_every=30", "train.log_every=30", "eval.steps=[1]",
                 "eval.num_samples=16", "eval.batch_size=16"]
    spec = load_spec("digits_shortcut", overrides)
    killed_dir = tmp_path / "killed"
    ckpt_dir = run_dir(spec, killed_dir) / "checkpoints"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_cli(killed_dir, overrides), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; lengthen it"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 120

    resumed = subprocess.run(_cli(killed_dir, overrides), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = json.loads((run_dir(spec, killed_dir) / "run.json").read_text())
    assert record["status"] == "finished" and record["resumed_from"] in steps
    assert f"resumed from checkpoint at step {record['resumed_from']}" in resumed.stdout

    straight = run(spec, workdir=tmp_path / "straight", log=lambda s: None)
    assert straight["resumed_from"] is None
    a = _final_params(run_dir(spec, killed_dir), spec)
    b = _final_params(run_dir(spec, tmp_path / "straight"), spec)
    assert int(a.step) == int(b.step) == 120
    for x, y in zip(jax.tree.leaves((a.params, a.ema_params, a.opt_state)),
                    jax.tree.leaves((b.params, b.ema_params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _PoisonedData:
    """Digits-shaped batches; NaN images from batch `poison_at` on."""

    def __init__(self, poison_at: int):
        self.i, self.poison_at = 0, poison_at
        self.rng = np.random.default_rng(0)

    def __next__(self):
        self.i += 1
        image = self.rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
        if self.i >= self.poison_at:
            image[:] = np.nan
        return {"image": image, "label": np.zeros((16,), np.int32)}

    def get_state(self) -> bytes:
        return str(self.i).encode()

    def set_state(self, state: bytes) -> None:
        self.i = int(state)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    spec = load_spec("digits_flow", ["train.steps=10", "train.batch_size=16", "train.log_every=1",
                                     "train.checkpoint_every=2"])
    model = build_model(spec)
    optimizer = make_optimizer(spec.optimizer)
    objective = methods.make_objective(spec)
    step = make_train_step(make_apply_fn(model), objective, optimizer, spec)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=5)
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at step 5; last good checkpoint: 4"):
        train(spec, init_state(spec, model, optimizer), step, _PoisonedData(poison_at=5), ckpt, log=lambda s: None)
    assert ckpt.all_steps() == [2, 4]
    restored, data_state = restore(ckpt, 4, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                        init_state(spec, model, optimizer)))
    assert data_state == b"4"
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored.params))


def test_latent_spec_without_vae_weights_says_what_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUT_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("SHORTCUT_VAE_WEIGHTS", raising=False)
    done = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "celeba_ditb_shortcut", "--in-process",
                           "--no-tracking", "--set", "eval.metric=none", "--workdir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    message = done.stderr
    assert "diffusion_pytorch_model.safetensors" in message and str(tmp_path / "weights") in message
    assert "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815" in message  # the expected sha256
    record = json.loads(next((tmp_path / "runs").rglob("run.json")).read_text())
    assert record["status"] == "failed" and "VAEWeightsError" in record["error"]
