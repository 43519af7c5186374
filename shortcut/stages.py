"""Stage dependencies between runs: a student spec's teacher, and the data a student generates from it.

A spec may name a teacher (`teacher: digits_flow`, plus optional `teacher_overrides: [KEY=VALUE, ..]`).
Running the student (shortcut.run.run) resolves the teacher first, in the same work directory:

  * the teacher's run directory is <workdir>/<teacher name>/<teacher hash[:12]>/ (its --smoke version
    when the student runs with --smoke, so the two always have the same tiny architecture);
  * run.json says "finished" and a checkpoint of its last step exists: its EMA parameters are loaded;
  * run.json says "failed": TeacherError, naming the directory and the teacher's error (a failed
    teacher is never retrained silently, with these or any other settings);
  * no run yet, or one that was interrupted or killed: TeacherError. The library never trains a teacher:
    the graph orders teachers before students (orchestration/execution/graph.py), and `run_experiment STUDENT`
    runs a missing teacher first as its own run.

The student's hash includes the teacher's hash (Spec.hash), so a different teacher means a different
student run. How a student uses its teacher is the objective's business: `init_state(...,
teacher_params=)` hands the EMA parameters to `objective.init_aux`, `objective.init_from_teacher` starts
the student from the teacher's weights, and objectives with `uses_pairs` (reflow) train on a dataset of
(noise, sample, label) triples that the teacher generates into <student run dir>/pairs/ in chunks;
finished chunks survive a kill and generation resumes at the first missing one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from shortcut import record as record_lib
from shortcut.record import RunDir, Status
from shortcut.data.iterators import pack_state, unpack_state
from shortcut.errors import ShortcutError
from shortcut.spec import Spec

PAIR_NOISE_STREAM = 0x5EED_0F  # folded into the seed: pair noise never equals evaluation noise


class TeacherError(ShortcutError, RuntimeError):
    """The teacher of a student spec cannot be used (failed, incompatible, or missing where it must exist)."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    spec: Spec  # the teacher's effective spec (its --smoke version for a --smoke student)
    run_dir: Path
    step: int
    params: Any  # EMA parameters of the teacher's last checkpoint

    def summary(self) -> dict:
        return {"name": self.spec.name, "spec_hash": self.spec.hash(), "run_dir": str(self.run_dir),
                "step": self.step, "params": "ema"}


def resolve_teacher(spec: Spec, workdir: str | Path, *, log: Callable[[str], None] = print) -> Teacher | None:
    """The finished teacher of `spec` (None when it has none). The library never trains a teacher: the
    graph runs it first (orchestration/execution/graph.py; `run_experiment STUDENT` runs missing teachers too)."""
    if spec.teacher is None:
        return None
    tspec = spec.teacher_spec()  # its --smoke version for a --smoke student
    smoke = " --smoke" if spec.smoke else ""
    tdir = RunDir.of(tspec, workdir)
    label = f"teacher {tspec.name} [{tspec.hash()[:12]}]"
    record = tdir.read()
    status = tdir.status()
    if status == Status.FAILED:
        raise TeacherError(
            f"{spec.name}: {label} failed in {tdir.path}: {record.get('error', 'no error recorded')}. Fix the cause "
            f"and rerun the teacher (run_experiment {tspec.name}{smoke} with the same "
            f"overrides; it resumes from its last checkpoint), or delete {tdir.path} to train it afresh.")
    if not tdir.finished(tspec.hash()):
        raise TeacherError(f"{spec.name}: {label} has no finished run in {tdir.path} (status: {status or 'no run'}); "
                           f"run it first: run_experiment {tspec.name}{smoke} with the same "
                           f"overrides (`run_experiment {spec.name}` runs a missing teacher first by itself)")
    params, step = load_params(tdir)
    if step != tspec.train.steps:
        raise TeacherError(f"{spec.name}: {label} in {tdir.path} is marked finished but its latest checkpoint is step "
                           f"{step}, not its train.steps {tspec.train.steps}")
    log(f"{spec.name}: using the finished {label} from {tdir.path} (step {step}, EMA parameters)")
    return Teacher(tspec, tdir.path, step, params)


def load_params(rundir: RunDir, *, ema: bool = True) -> tuple[Any, int]:
    """The EMA parameters (with `ema=False` the online ones) of a run's latest checkpoint, and its step, read
    without knowing the rest of that run's state."""
    from shortcut.checkpoint import describe_error, quiet_orbax_echoes

    if not rundir.checkpoints.is_dir():
        raise TeacherError(f"no checkpoints in {rundir.checkpoints}")
    checkpointer = rundir.checkpointer()
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise TeacherError(f"no checkpoints in {rundir.checkpoints}")
        quiet_orbax_echoes()
        try:
            state = checkpointer.restore_state(step)
        except Exception as e:  # noqa: BLE001 - a damaged file: say which checkpoint, not a traceback
            raise TeacherError(f"the teacher's latest checkpoint {rundir.checkpoints / str(step)} cannot be read "
                               f"({describe_error(e)}); remove that directory and rerun to train that step "
                               "again") from None
    finally:
        checkpointer.close()
    return jax.tree.map(jnp.asarray, state["ema_params" if ema else "params"]), int(step)


def _uses_student_model(objective) -> bool:
    """Whether the teacher's parameters go through the student's network (distillation, or a warm start)."""
    return objective.init_from_teacher or not objective.uses_pairs


def check_architecture(spec: Spec, teacher: Teacher, student_params) -> None:
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    if jax.tree.structure(teacher.params) != jax.tree.structure(student_params) or \
            shapes(teacher.params) != shapes(student_params):
        raise TeacherError(
            f"{spec.name}: the teacher {teacher.spec.name}'s network differs from the student's (teacher model "
            f"{teacher.spec.model.model_dump()}, data {teacher.spec.input_shape} with {teacher.spec.data.num_classes} "
            f"classes; student model {spec.model.model_dump()}, data {spec.input_shape} with "
            f"{spec.data.num_classes} classes); {spec.method.name} runs the teacher's parameters through the "
            "student's network, so give both the same model (teacher_overrides can set the teacher's)")


def start_from_teacher(spec: Spec, state, objective, teacher: Teacher | None):
    """Check the teacher fits the student's network and, with `init_from_teacher`, start from its weights."""
    if teacher is None:
        return state
    if _uses_student_model(objective):
        check_architecture(spec, teacher, state.params)
    if not objective.init_from_teacher:
        return state
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), teacher.params)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


# ---------------------------------------------------------------- generated pairs (reflow)


def training_data(spec: Spec, objective, teacher: Teacher | None, rundir: Path, *,
                  log: Callable[[str], None] = print):
    """The training iterator for objectives that train on generated pairs; None for every other objective."""
    if not objective.uses_pairs:
        return None
    if teacher is None:
        raise TeacherError(f"{spec.name}: method {spec.method.name} trains on pairs generated by a teacher; "
                           "name the teacher's spec with `teacher:` (e.g. `teacher: digits_flow`)")
    directory = rundir / "pairs"
    if not pairs_complete(directory) and jax.process_count() > 1:
        raise TeacherError(f"{spec.name}: the pair dataset in {directory} is incomplete and pair generation runs in "
                           "one process; run this spec once on a single host (it generates the pairs, which every "
                           "later run reuses), then train on many")
    generate_pairs(spec, teacher, directory, log=log)
    return PairIterator(directory, batch_size=spec.train.batch_size // jax.process_count(), seed=spec.seed,
                        process_index=jax.process_index(), process_count=jax.process_count())


def pair_noise(start: int, count: int, shape: tuple[int, ...], seed: int) -> jax.Array:
    """Noise of pairs start..start+count-1; pair i's noise depends only on (seed, i)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), PAIR_NOISE_STREAM)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + count))
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def pairs_flops(spec: Spec, objective, teacher: Teacher | None) -> float | None:
    """FLOPs of the teacher's sampling of all `num_pairs` stored pairs (None for objectives without pairs, or
    when the backend gives no cost analysis): one compiled network evaluation per sample x the sampler's
    network evaluations per sample at `pair_steps` (and guidance)."""
    if not objective.uses_pairs or teacher is None:
        return None
    from shortcut import assembly
    from shortcut.compute import forward_flops_per_sample

    cfg = spec.method
    parts = assembly.build(teacher.spec)
    per_sample = forward_flops_per_sample(parts.apply_fn, teacher.params, teacher.spec.input_shape)
    if per_sample is None:
        return None
    evaluations = parts.objective.network_evaluations(cfg.pair_steps or cfg.denoise_timesteps, cfg.pair_cfg_scale)
    return per_sample * evaluations * cfg.num_pairs


def generate_pairs(spec: Spec, teacher: Teacher, directory: Path, *, log: Callable[[str], None] = print,
                   max_chunks: int | None = None) -> Path:
    """Fill `directory` with method.num_pairs (noise, image, label) triples from the teacher's sampler.

    Arrays noise.npy / image.npy / label.npy are written chunk by chunk; progress.json lists the finished
    chunks, so a killed generation resumes at the first unfinished chunk (a half-written chunk is redone).
    `max_chunks` stops after that many new chunks (used by tests to simulate a kill).
    """
    from shortcut import assembly
    from shortcut.sampling import sample_labels

    cfg = spec.method
    n, chunk = cfg.num_pairs, cfg.pair_chunk_size
    num_chunks = math.ceil(n / chunk)
    steps = cfg.pair_steps or cfg.denoise_timesteps
    shape = spec.input_shape
    meta = {"teacher": teacher.spec.name, "teacher_hash": teacher.spec.hash(), "teacher_step": teacher.step,
            "num_pairs": n, "chunk_size": chunk, "steps": steps, "cfg_scale": cfg.pair_cfg_scale, "seed": spec.seed,
            "shape": list(shape), "num_classes": spec.data.num_classes}
    if tuple(teacher.spec.input_shape) != tuple(shape) or teacher.spec.data.num_classes != spec.data.num_classes:
        raise TeacherError(f"{spec.name}: the teacher {teacher.spec.name} generates {teacher.spec.input_shape} with "
                           f"{teacher.spec.data.num_classes} classes, the student trains on {shape} with "
                           f"{spec.data.num_classes}")
    directory.mkdir(parents=True, exist_ok=True)
    progress_path = directory / "progress.json"
    if progress_path.exists():
        progress = json.loads(progress_path.read_text())
        if progress["meta"] != meta:
            raise TeacherError(f"{directory} holds pairs made with other settings ({progress['meta']}, now {meta}); "
                               "delete it to regenerate")
    else:
        for name, dtype, item_shape in (("noise", np.float32, shape), ("image", np.float32, shape),
                                        ("label", np.int32, ())):
            tmp = directory / f"{name}.tmp.npy"
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, *item_shape)).flush()
            os.replace(tmp, directory / f"{name}.npy")
        progress = {"meta": meta, "done": []}
        record_lib.write_json(progress_path, progress, indent=1)
    todo = [c for c in range(num_chunks) if c not in set(progress["done"])]
    if not todo:
        return directory
    if progress["done"]:
        log(f"{spec.name}: resuming pair generation, {len(progress['done'])}/{num_chunks} chunks already in {directory}")
    else:
        log(f"{spec.name}: generating {n} pairs with the teacher {teacher.spec.name} at {steps} steps "
            f"in {num_chunks} chunks -> {directory}")

    sampler = assembly.build(teacher.spec).sampler
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r+") for name in ("noise", "image", "label")}
    batch = max(1, min(spec.eval.batch_size, chunk))
    for done_now, c in enumerate(todo):
        if max_chunks is not None and done_now >= max_chunks:
            return directory
        t0 = time.perf_counter()
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        for start in range(lo, hi, batch):
            count = min(batch, hi - start)
            noise = pair_noise(start, batch, shape, spec.seed)  # fixed batch shape: one compilation
            labels = sample_labels(start, batch, spec.data.num_classes)
            out = sampler(teacher.params, noise, jnp.asarray(labels), num_steps=steps, cfg_scale=cfg.pair_cfg_scale)
            arrays["noise"][start:start + count] = np.asarray(noise[:count])
            arrays["image"][start:start + count] = np.asarray(out[:count])
            arrays["label"][start:start + count] = labels[:count]
        for a in arrays.values():
            a.flush()
        progress["done"] = sorted(progress["done"] + [c])
        record_lib.write_json(progress_path, progress, indent=1)
        log(f"{spec.name}: pairs chunk {len(progress['done'])}/{num_chunks} ({hi - lo} pairs) in "
            f"{time.perf_counter() - t0:.1f}s")
    return directory


def pairs_complete(directory: Path) -> bool:
    path = directory / "progress.json"
    if not path.exists():
        return False
    progress = json.loads(path.read_text())
    meta = progress["meta"]
    return len(progress["done"]) == math.ceil(meta["num_pairs"] / meta["chunk_size"])


class PairIterator:
    """Batches {"image", "noise", "label"} from stored pairs: a fresh permutation per epoch, restorable.

    Global batch k of epoch e takes rows perm_e[k G : (k+1) G] (G = batch_size * process_count) and this
    process its own slice of them; perm_e depends only on (seed, e), so the position is one integer.
    """

    def __init__(self, directory: Path, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if not pairs_complete(directory):
            raise TeacherError(f"{directory}: the pair dataset is incomplete")
        self._arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("noise", "image", "label")}
        self._n = len(self._arrays["label"])
        self._batch, self._seed = batch_size, seed
        self._process_index = process_index
        self._global = batch_size * process_count
        if self._n < self._global:
            raise TeacherError(f"{directory}: {self._n} pairs are fewer than one batch of {self._global}; raise "
                               "method.num_pairs")
        self._per_epoch = self._n // self._global
        self._step = 0
        self._perm_epoch, self._perm = -1, None
        self._fingerprint = {"kind": "pairs", "num_pairs": self._n, "batch_size": batch_size, "seed": seed,
                             "process_index": process_index, "process_count": process_count}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, k = divmod(self._step, self._per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._perm_epoch = epoch
        lo = k * self._global + self._process_index * self._batch
        idx = np.sort(self._perm[lo:lo + self._batch])
        self._step += 1
        return {name: np.asarray(a[idx]) for name, a in self._arrays.items()}

    def get_state(self) -> bytes:
        return pack_state({"kind": "pairs", "fingerprint": self._fingerprint, "step": self._step})

    def set_state(self, state: bytes) -> None:
        meta, _ = unpack_state(state)
        if meta.get("kind") != "pairs" or meta.get("fingerprint") != self._fingerprint:
            raise ValueError(f"iterator state {meta.get('fingerprint')} was saved by another pair iterator "
                             f"({self._fingerprint})")
        self._step = int(meta["step"])
