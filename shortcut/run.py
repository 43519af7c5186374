"""One experiment run: check data -> build -> train (resuming) -> sample at each step count -> record.

Everything a run writes lives in its run directory `<workdir>/<spec name>/<spec hash[:12]>/`:
checkpoints/, samples/steps_<N>.png, params.txt and run.json (the run record: the source of truth
for what was trained, how long it took and what came out).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from clu import parameter_overview

from shortcut import data as data_lib
from shortcut import methods
from shortcut.checkpoint import Checkpointer
from shortcut.images import save_grid
from shortcut.sampling import generate, make_sampler
from shortcut.sharding import DataParallel
from shortcut.spec import Spec, SpecError, validate
from shortcut.train import build_model, init_state, make_apply_fn, make_optimizer, make_train_step, train

REPO_ROOT = Path(__file__).resolve().parents[1]


class UnsupportedError(RuntimeError):
    """A spec asks for something this version cannot do; the message says what and why."""


def run_dir(spec: Spec, workdir: str | Path | None = None) -> Path:
    return Path(workdir or spec.output.workdir) / spec.name / spec.hash()[:12]


def smoke_version(spec: Spec) -> Spec:
    """The same spec with a tiny model, a few steps and few samples, for mock data on a CPU."""
    tree = spec.model_dump(mode="json")
    tree["model"] = dict(tree["model"], size=None, hidden_size=32, depth=2, num_heads=2, dtype="float32")
    tree["train"] = dict(tree["train"], steps=4, batch_size=8, log_every=2, checkpoint_every=2)
    tree["eval"] = dict(tree["eval"], num_samples=8, batch_size=8, grid_size=8)
    return validate(tree, {}, default_source=f"{spec.name} (--smoke)")


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path: Path, content: dict) -> None:
    """Atomic write: a reader never sees a half-written record."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str))
    os.replace(tmp, path)


def make_data(spec: Spec, smoke: bool, dp: DataParallel):
    """The training iterator (per-process batches), after checking the data matches the spec."""
    per_process = spec.train.batch_size // jax.process_count()
    if smoke:
        return data_lib.make_mock_iterator(image_shape=spec.input_shape, num_classes=spec.data.num_classes,
                                           batch_size=per_process, seed=spec.seed)
    if spec.data.latent is not None:
        raise UnsupportedError(
            f"{spec.name} trains in the latent space of {spec.data.latent.autoencoder}; the latent pipeline "
            "(autoencoder, weights, encoding) is not part of this version yet. Use --smoke to check the spec "
            "end to end on mock latents.")
    d = spec.data
    info = data_lib.check_dataset(d.dataset, split=d.split, data_dir=d.data_dir, image_size=d.image_size)
    if info.image_shape != spec.input_shape:
        raise SpecError(spec.name, "data", f"dataset {d.dataset} gives images {info.image_shape}, the spec says "
                                           f"{spec.input_shape} (data.image_size, data.channels)")
    if info.num_classes != d.num_classes:
        raise SpecError(spec.name, "data.num_classes", f"dataset {d.dataset} has {info.num_classes} classes")
    return data_lib.make_train_iterator(d.dataset, batch_size=per_process, seed=spec.seed, split=d.split,
                                        data_dir=d.data_dir, image_size=d.image_size, flip=d.flip,
                                        process_index=jax.process_index(), process_count=jax.process_count(),
                                        shuffle_buffer=d.shuffle_buffer)


def run(spec: Spec, *, workdir: str | Path | None = None, smoke: bool = False, log=print) -> dict:
    """Train and sample one spec; returns the run record (also written to run.json)."""
    if smoke:
        spec = smoke_version(spec)
    rundir = run_dir(spec, workdir)
    rundir.mkdir(parents=True, exist_ok=True)
    record = {
        "name": spec.name, "spec_hash": spec.hash(), "smoke": smoke, "status": "running",
        "data": "mock (random) data, for a pipeline check only" if smoke else spec.data.dataset,
        "git_commit": git_commit(), "started": _now(), "run_dir": str(rundir),
        "devices": [str(d) for d in jax.devices()], "versions": _versions(),
        "spec": spec.model_dump(mode="json"),
    }
    write_json(rundir / "run.json", record)
    try:
        _run(spec, rundir, smoke, record, log)
        record["status"] = "finished"
        return record
    except BaseException as e:  # the record says how the run ended, whatever ended it
        record["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record["finished"] = _now()
        write_json(rundir / "run.json", record)


def _run(spec: Spec, rundir: Path, smoke: bool, record: dict, log) -> None:
    t0 = time.perf_counter()
    dp = DataParallel.create(spec.train.batch_size)
    data = make_data(spec, smoke, dp)
    model = build_model(spec)
    apply_fn = make_apply_fn(model)
    objective = methods.make_objective(spec)
    optimizer = make_optimizer(spec.optimizer)
    state = dp.replicate(init_state(spec, model, optimizer))

    overview = parameter_overview.get_parameter_overview(state.params, include_stats=False)
    (rundir / "params.txt").write_text(overview + "\n")
    n_params = parameter_overview.count_parameters(state.params)
    record["num_params"] = n_params
    log(f"{spec.name} [{spec.hash()[:12]}] {spec.method.name}, DiT hidden {spec.model.hidden_size} depth "
        f"{spec.model.depth}: {n_params:,} parameters (table in {rundir / 'params.txt'})")

    train_step = make_train_step(apply_fn, objective, optimizer, spec)
    checkpointer = Checkpointer(rundir / "checkpoints", keep=spec.train.keep_checkpoints)
    record["timings"] = {"setup_s": time.perf_counter() - t0}
    try:
        result = train(spec, state, train_step, data, checkpointer, shard=dp.shard, log=log)
    finally:
        checkpointer.close()
    record["resumed_from"] = result.resumed_from
    record["timings"]["train_s"] = result.seconds
    record["train"] = {"steps": spec.train.steps, "final": result.history[-1] if result.history else None,
                       "history": result.history}
    record["samples"] = sample_all(spec, objective, make_sampler(objective, apply_fn), result.state.ema_params,
                                   rundir, record["timings"], log)


def sample_all(spec: Spec, objective, sampler, params, rundir: Path, timings: dict, log) -> dict:
    """Sample `eval.num_samples` at each step count from the same noise; grid + summary statistics."""
    out = {}
    ev = spec.eval
    for n in ev.steps:
        t0 = time.perf_counter()
        stats = _RunningMoments()
        grid_images = []
        for images, _ in generate(sampler, params, shape=spec.input_shape, num_classes=spec.data.num_classes,
                                  num_samples=ev.num_samples, batch_size=ev.batch_size, num_steps=n,
                                  cfg_scale=ev.cfg_scale, seed=spec.seed + 1):
            stats.update(images)
            if sum(len(g) for g in grid_images) < ev.grid_size:
                grid_images.append(images)
        seconds = time.perf_counter() - t0
        grid = save_grid(np.concatenate(grid_images)[: ev.grid_size], rundir / "samples" / f"steps_{n}.png")
        out[str(n)] = {"num_samples": ev.num_samples, "network_evaluations": objective.network_evaluations(n, ev.cfg_scale),
                       "cfg_scale": ev.cfg_scale, "params": "ema", "seconds": seconds, "grid": str(grid),
                       **stats.summary()}
        timings[f"sample_{n}_steps_s"] = seconds
        log(f"sampled {ev.num_samples} at {n} step(s) in {seconds:.1f}s: mean {stats.summary()['mean']:+.3f} "
            f"std {stats.summary()['std']:.3f}, outside [-1,1] {stats.summary()['frac_outside']:.1%} -> {grid}")
    return out


class _RunningMoments:
    """Pixel statistics of the samples (a sanity check; quality metrics come from evaluation)."""

    def __init__(self):
        self.n = 0
        self.s = self.s2 = 0.0
        self.lo, self.hi, self.outside = np.inf, -np.inf, 0

    def update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        self.n += x.size
        self.s += x.sum()
        self.s2 += np.square(x).sum()
        self.lo, self.hi = min(self.lo, x.min()), max(self.hi, x.max())
        self.outside += int(np.sum(np.abs(x) > 1))

    def summary(self) -> dict:
        mean = self.s / self.n
        return {"mean": mean, "std": float(np.sqrt(max(self.s2 / self.n - mean**2, 0))), "min": float(self.lo),
                "max": float(self.hi), "frac_outside": self.outside / self.n}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    import flax
    import optax
    import orbax.checkpoint

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": orbax.checkpoint.__version__}
