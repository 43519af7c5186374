"""`import_checkpoint CHECKPOINT SPEC [--set KEY=VALUE ...] [--workdir DIR]`: a checkpoint written by the
official shortcut code as a finished run directory of SPEC.

The official code (kvfrans/shortcut-models @6010043, utils/checkpoint.py and TrainStateEma.save) writes
a pickle of `{"train_state": {"params", "params_ema", "opt_state", "step"}, ...}`; its released
checkpoints have that format. SPEC must use `model.architecture: official`, the network those
parameters belong to. Every parameter name and shape is checked against SPEC's model; the first
mismatch ends the import with one line (exit status 2). The run directory (`<workdir>/<spec name>/
<hash[:12]>/`, as `run_experiment` writes it) then holds run.json (status finished, where the weights
came from) and an Orbax checkpoint of the full training state, so `run_experiment SPEC --eval-only`
evaluates it. The checkpoint carries no data-iterator position, so training on from it is not supported.

Two traits of the official code's own saves are accepted: saved to a local path, the file is written as
FILENAME/FILENAME.tmp (it makes a directory of the file name), so CHECKPOINT may be that directory;
and saved on one host, `process_allgather` gives every array a leading axis of length 1, dropped here.

The pickle is read with an unpickler that only builds numpy, jax, optax and flax objects; still,
import only checkpoints from a source you trust.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from shortcut.errors import ShortcutError

# (official module path, this project's), "{i}" a block index. Per block and in the final layer the
# official names are flax's automatic ones, in creation order: a block's Dense_1 is its key
# projection, Dense_2 its query, Dense_3 its value (official model.py, DiTBlock).
MODULE_NAMES: tuple[tuple[str, str], ...] = (
    ("PatchEmbed_0/Conv_0", "x_embedder/proj"),
    ("TimestepEmbedder_0", "t_embedder"),
    ("TimestepEmbedder_1", "d_embedder"),
    ("LabelEmbedder_0/Embed_0", "y_embedder/embedding_table"),
    ("DiTBlock_{i}/Dense_0", "block_{i}/adaLN_modulation"),
    ("DiTBlock_{i}/Dense_1", "block_{i}/key"),
    ("DiTBlock_{i}/Dense_2", "block_{i}/query"),
    ("DiTBlock_{i}/Dense_3", "block_{i}/value"),
    ("DiTBlock_{i}/Dense_4", "block_{i}/proj"),
    ("DiTBlock_{i}/MlpBlock_0/Dense_0", "block_{i}/fc1"),
    ("DiTBlock_{i}/MlpBlock_0/Dense_1", "block_{i}/fc2"),
    ("FinalLayer_0/Dense_0", "final_layer/adaLN_modulation"),
    ("FinalLayer_0/Dense_1", "final_layer/linear"),
)
LABELS = "y_embedder/embedding_table/embedding"
# The official DiT's log-variance table: built, never used in its output, so checked and not imported.
UNUSED, UNUSED_SHAPE = "Embed_0/embedding", (256, 1)

_SAFE_MODULES = ("numpy", "jax", "jaxlib", "optax", "flax", "ml_collections", "collections")


class ImportMismatch(ShortcutError, ValueError):
    """The checkpoint does not fit the spec (or is not an official checkpoint); the message says where."""


def _rule(pattern: str) -> re.Pattern:
    """A module path pattern matching a parameter path under that module: groups (block index, rest)."""
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "(?P<rest>/.+)$")


_FORWARD = [(_rule(official), ours) for official, ours in MODULE_NAMES]
_BACKWARD = [(_rule(ours), official) for official, ours in MODULE_NAMES]


def _translate(path: str, rules) -> str | None:
    for rule, target in rules:
        m = rule.match(path)
        if m:
            return target.replace("{i}", m.groupdict().get("i") or "") + m.group("rest")
    return None


def project_name(official_path: str) -> str | None:
    """This project's parameter path ("block_0/key/kernel") for an official one ("DiTBlock_0/Dense_1/kernel")."""
    return _translate(official_path, _FORWARD)


def official_name(project_path: str) -> str | None:
    """The official parameter path for one of this project's (inverse of `project_name`)."""
    return _translate(project_path, _BACKWARD)


def flatten(tree: dict) -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    return traverse_util.unflatten_dict(flat, sep="/")


def map_params(official: dict, expected: dict) -> dict:
    """The official parameter tree renamed onto this project's `architecture: official` tree, as float32
    numpy arrays; `expected` is that tree (arrays or ShapeDtypeStructs). Raises ImportMismatch naming the
    first parameter whose name or shape does not fit."""
    want = {path: tuple(leaf.shape) for path, leaf in flatten(expected).items()}
    flat = {path: np.asarray(value) for path, value in flatten(official).items()}
    if UNUSED in flat and flat[UNUSED].shape == (1, *UNUSED_SHAPE):  # a single-host save's process axis
        flat = {path: value[0] for path, value in flat.items()}
    got: dict[str, np.ndarray] = {}
    for path, value in sorted(flat.items()):
        ours = project_name(path)
        if ours == LABELS and want[ours][0] == 1 and value.shape == (2, want[ours][1]):
            # An unconditional spec takes the official null row: the official CelebA-HQ command trains with
            # num_classes 1 and class dropout 1, so every label is the null class 1.
            value = value[1:]
        shape = value.shape
        if path == UNUSED:
            if shape != UNUSED_SHAPE:
                raise ImportMismatch(f"checkpoint parameter {path} has shape {shape}, the official DiT's is "
                                     f"{UNUSED_SHAPE}")
            continue
        if ours is None:
            raise ImportMismatch(f"checkpoint parameter {path} is not a parameter of the official DiT")
        if ours not in want:
            raise ImportMismatch(f"checkpoint parameter {path} ({ours}) does not exist in the spec's model")
        if shape != want[ours]:
            raise ImportMismatch(f"checkpoint parameter {path} has shape {shape}, the spec's model expects "
                                 f"{want[ours]} ({ours})")
        got[ours] = value.astype(np.float32)
    for ours in sorted(want):
        if ours not in got:
            raise ImportMismatch(f"the checkpoint has no {official_name(ours)} (the spec's model's {ours}, "
                                 f"shape {want[ours]})")
    return unflatten(got)


def _adam_states(tree) -> list:
    """The optax ScaleByAdamState nodes of an optimizer state, in order."""
    import optax

    if isinstance(tree, optax.ScaleByAdamState):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [s for child in tree for s in _adam_states(child)]
    return []


def _replace_adam(tree, adam):
    import optax

    if isinstance(tree, optax.ScaleByAdamState):
        return adam
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # another optax NamedTuple state
        return type(tree)(*(_replace_adam(c, adam) for c in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_replace_adam(c, adam) for c in tree)
    return tree


def map_opt_state(official_opt_state, params: dict, optimizer):
    """This project's optimizer state for `params` with the official Adam moments and count renamed onto
    it: `(state, Adam's count or None, note)`. A checkpoint without an Adam state gets a fresh one (count None)."""
    import jax.numpy as jnp
    import optax

    fresh = optimizer.init(params)
    found = _adam_states(official_opt_state)
    if len(found) != 1 or len(_adam_states(fresh)) != 1:
        return fresh, None, "fresh optimizer state (the checkpoint has no single Adam state)"
    adam = found[0]
    mu, nu = (map_params(moment, params) for moment in (adam.mu, adam.nu))
    count = _scalar(adam.count)
    state = _replace_adam(fresh, optax.ScaleByAdamState(count=jnp.asarray(count, jnp.int32), mu=mu, nu=nu))
    return state, count, f"Adam moments imported (count {count})"


def _scalar(value) -> int:
    """An official step or count: a number, or an array of one (a single-host save's process axis)."""
    return int(np.asarray(value).reshape(()))


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] in _SAFE_MODULES or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def checkpoint_file(path: str | Path) -> Path:
    """The file of an official checkpoint given as the file or as the directory its local save makes."""
    path = Path(path)
    if path.is_dir():  # the official local save: FILENAME/FILENAME.tmp
        inside = [p for p in path.iterdir() if p.is_file()]
        if len(inside) != 1:
            raise ImportMismatch(f"{path} is a directory with {len(inside)} files; give the checkpoint file")
        path = inside[0]
    if not path.is_file():
        raise ImportMismatch(f"no checkpoint file {path}")
    return path.absolute()


def load_official(path: str | Path) -> dict:
    """The `train_state` dict of an official checkpoint (params, params_ema, opt_state, step)."""
    path = checkpoint_file(path)
    try:
        with path.open("rb") as f:
            data = _SafeUnpickler(f).load()
    except Exception as e:  # any unpickling failure is a wrong file, said in one line
        raise ImportMismatch(f"{path} is not an official checkpoint pickle ({type(e).__name__}: {e})") from None
    state = data.get("train_state") if isinstance(data, dict) else None
    if not isinstance(state, dict) or "params" not in state:
        raise ImportMismatch(f"{path} has no train_state.params: not a checkpoint of the official code")
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_checkpoint(checkpoint: str | Path, spec, workdir: str | Path | None = None, log=print) -> Path:
    """Write the run directory of `spec` holding the official checkpoint's parameters; returns it."""
    import jax
    import jax.numpy as jnp
    from clu import parameter_overview

    from shortcut import assembly
    from shortcut.checkpoint import Checkpointer
    from shortcut.record import git_commit, run_dir, write_json
    from shortcut.train import checkpoint_tree, fresh_emas, init_state

    if spec.model.architecture != "official":
        raise ImportMismatch(f"spec {spec.name} has model.architecture {spec.model.architecture}; an official "
                             "checkpoint needs official (--set model.architecture=official)")
    if spec.teacher is not None:
        raise ImportMismatch(f"spec {spec.name} starts from a teacher; import into a spec without one")
    checkpoint = checkpoint_file(checkpoint)
    official = load_official(checkpoint)
    parts = assembly.build(spec)
    model, optimizer = parts.model, parts.optimizer
    x = jnp.zeros((1, *spec.input_shape))
    expected = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), jnp.ones((1,)),
                              jnp.zeros((1,), jnp.int32))["params"]
    params = map_params(official["params"], expected)  # checked before anything is built or written
    ema = map_params(official.get("params_ema", official["params"]), expected)
    state = init_state(spec, model, optimizer, parts.objective)
    opt_state, count, opt_note = map_opt_state(official.get("opt_state"), params, optimizer)
    # The official step starts at 1 before any update; Adam's count is the number of updates.
    step = count if count is not None else max(_scalar(official.get("step", 1)) - 1, 0)
    params, ema, opt_state = jax.tree.map(jnp.asarray, (params, ema, opt_state))
    ema, more_ema = fresh_emas(ema, spec.optimizer.ema_decays)  # the official EMA starts every EMA of a twin EMA
    state = state.replace(step=jnp.asarray(step, jnp.int32), params=params, ema_params=ema, opt_state=opt_state,
                          more_ema=more_ema)

    rundir = run_dir(spec, workdir)
    from shortcut.run_lock import RunLock

    lock = RunLock(rundir).acquire()  # RunLocked if a run is writing there; held until this function returns
    checkpointer = Checkpointer(rundir / "checkpoints", keep=spec.train.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        checkpointer.close()
        raise ImportMismatch(f"{rundir} already has checkpoints; remove it or pick another --workdir")
    checkpointer.save(step, checkpoint_tree(state), b"")
    checkpointer.close()
    (rundir / "params.txt").write_text(parameter_overview.get_parameter_overview(state.params, include_stats=False)
                                       + "\n")
    write_json(rundir / "run.json", {
        "name": spec.name, "spec_hash": spec.hash(), "smoke": False, "status": "finished",
        "data": spec.data.dataset, "git_commit": git_commit(), "run_dir": str(rundir),
        "spec": spec.model_dump(mode="json"), "evaluation": [],
        "num_params": parameter_overview.count_parameters(state.params),
        "imported": {"checkpoint": str(checkpoint), "sha256": _sha256(checkpoint),
                     "format": "official shortcut-models pickle (TrainStateEma.save)",
                     "official_step": _scalar(official.get("step", -1)), "step": step, "optimizer": opt_note,
                     "note": "parameters trained by the official code; no data-iterator position, not resumable"},
    })
    log(f"imported {checkpoint} (step {step}, {opt_note}) into {rundir}")
    lock.release()
    return rundir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="import_checkpoint",
        description="Import a checkpoint written by the official shortcut code (a pickle of {'train_state': "
                    "{params, params_ema, opt_state, step}}) as a finished run of SPEC "
                    "(model.architecture: official), for run_experiment SPEC --eval-only.")
    p.add_argument("checkpoint", help="the official checkpoint file")
    p.add_argument("spec", help="spec name (experiments/NAME.yaml) or a path to a spec file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key (repeatable), e.g. --set model.architecture=official; pass the "
                        "same overrides to run_experiment --eval-only")
    p.add_argument("--workdir", help="where run directories go (default: the spec's output.workdir, runs/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from shortcut.spec_files import load_spec

    try:
        spec = load_spec(args.spec, args.overrides)
        import_checkpoint(args.checkpoint, spec, args.workdir)
    except ShortcutError as e:
        print(f"import_checkpoint: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
