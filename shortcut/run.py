"""One experiment run: check data -> build -> train (resuming) -> sample at each step count -> record.

Everything a run writes lives in its run directory `<workdir>/<spec name>/<spec hash[:12]>/`:
checkpoints/, samples/steps_<N>.png, eval/ (partial metric statistics, so a killed evaluation resumes),
params.txt and run.json (the run record: the source of truth for what was trained, how long it took
and every metric with its provenance).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from clu import parameter_overview

from shortcut import data as data_lib
from shortcut import methods, stages
from shortcut.checkpoint import Checkpointer
from shortcut.evaluate import evaluate, load_metric, smoke_metric
from shortcut.sampling import make_sampler
from shortcut.sharding import Parallel
from shortcut.spec import Spec, SpecError, validate
from shortcut.train import (StopTraining, build_model, init_state, make_apply_fn, make_optimizer, make_train_step,
                            restore, train)

REPO_ROOT = Path(__file__).resolve().parents[1]


class UnsupportedError(RuntimeError):
    """A spec asks for something this version cannot do; the message says what and why."""


def run_dir(spec: Spec, workdir: str | Path | None = None) -> Path:
    return Path(workdir or spec.output.workdir) / spec.name / spec.hash()[:12]


def smoke_version(spec: Spec) -> Spec:
    """The same spec with a tiny model, a few steps and few samples, for mock data on one CPU."""
    tree = spec.model_dump(mode="json")
    tree["model"] = dict(tree["model"], size=None, hidden_size=32, depth=2, num_heads=2, dtype="float32")
    tree["train"] = dict(tree["train"], steps=4, batch_size=8, log_every=2, checkpoint_every=2)
    tree["eval"] = dict(tree["eval"], num_samples=8, batch_size=8, grid_size=8)
    tree["resources"] = {"cpus": 1, "gpus": 0, "tpus": 0, "hosts": 1, "sharding": spec.resources.sharding}
    if tree["data"].get("latent"):
        tree["data"]["latent"] = dict(tree["data"]["latent"], batch_size=8)
    smoke_method = getattr(methods.objective_class(spec.method.name), "smoke_method", None)  # e.g. fewer reflow pairs
    tree["method"] = smoke_method(tree["method"]) if smoke_method else tree["method"]
    return validate(tree, {}, default_source=f"{spec.name} (--smoke)")


def git_commit() -> str:
    if os.environ.get("SHORTCUT_GIT_COMMIT"):  # set by orchestration/jobs.py: a Ray job's code has no .git
        return os.environ["SHORTCUT_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def jsonable(obj):
    """numpy scalars and arrays as numbers and lists; anything else unknown as its string."""
    return obj.tolist() if isinstance(obj, (np.generic, np.ndarray)) else str(obj)


def write_json(path: Path, content: dict) -> None:
    """Atomic write: a reader never sees a half-written record."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=jsonable))
    os.replace(tmp, path)


def make_data(spec: Spec, smoke: bool, codec=None, rundir: Path | None = None, log=print):
    """The training iterator (per-process batches), after checking the data matches the spec. With a
    latent spec, batches are latents: encoded on the fly, or sampled from the pre-encoded dataset."""
    per_process = spec.train.batch_size // jax.process_count()
    d = spec.data
    if smoke:
        images = data_lib.make_mock_iterator(image_shape=spec.pixel_shape, num_classes=d.num_classes,
                                             batch_size=per_process, seed=spec.seed)
    else:
        info = data_lib.check_dataset(d.dataset, split=d.split, data_dir=d.data_dir, image_size=d.image_size)
        if info.image_shape != spec.pixel_shape:
            raise SpecError(spec.name, "data", f"dataset {d.dataset} gives images {info.image_shape}, the spec says "
                                               f"{spec.pixel_shape} (data.image_size, data.channels)")
        if info.num_classes != d.num_classes:
            raise SpecError(spec.name, "data.num_classes", f"dataset {d.dataset} has {info.num_classes} classes")
        if d.latent is None or d.latent.encoding == "on_the_fly":
            images = data_lib.make_train_iterator(
                d.dataset, batch_size=per_process, seed=spec.seed, split=d.split, data_dir=d.data_dir,
                image_size=d.image_size, flip=d.flip, process_index=jax.process_index(),
                process_count=jax.process_count(), shuffle_buffer=d.shuffle_buffer)
    if d.latent is None:
        return images
    from shortcut.data import latents

    if d.latent.encoding == "on_the_fly":
        return latents.EncodedIterator(images, codec, seed=spec.seed)
    if smoke:  # a few batches of mock images stand in for the dataset
        directory = rundir / "latents"
        latents.pre_encode(spec, codec, directory, images=[next(images) for _ in range(2)], log=log)
    else:
        directory = Path(d.latent.encoded_dir) if d.latent.encoded_dir else latents.default_encoded_dir(spec, codec)
        if not (directory / "shortcut_latents.json").exists() and jax.process_count() > 1:
            raise UnsupportedError(f"the pre-encoded latents {directory} do not exist; encode them once on one host "
                                   f"first (run_experiment {spec.name} --set train.steps=0 ... or a single-host run)")
        latents.pre_encode(spec, codec, directory, log=log)
    return latents.make_latent_iterator(directory, scale=d.latent.scale, batch_size=per_process, seed=spec.seed,
                                        flip=d.flip, num_classes=d.num_classes, process_index=jax.process_index(),
                                        process_count=jax.process_count(), shuffle_buffer=d.shuffle_buffer)


def make_codec(spec: Spec, smoke: bool, record: dict):
    """The VAE of a latent spec (a random reduced-width one under --smoke), described in the run record."""
    if spec.data.latent is None:
        return None
    from shortcut.vae import LatentCodec

    lat = spec.data.latent
    codec = LatentCodec.from_spec(lat, smoke, batch_size=lat.batch_size, seed=spec.seed, path=lat.weights)
    record["latent"] = {"autoencoder": lat.autoencoder, "vae": codec.description,
                        "vae_weights_sha256": codec.weights_sha256, "encoding": lat.encoding, "scale": lat.scale}
    if smoke:
        record["latent"]["note"] = ("--smoke: a randomly initialised reduced-width VAE, not sd-vae-ft-mse; "
                                    "checks encode -> train -> sample -> decode -> evaluate only")
    return codec


def run(spec: Spec, *, workdir: str | Path | None = None, smoke: bool = False, eval_only: bool = False,
        log=print, tracker=None) -> dict:
    """Train (or with eval_only, load the latest checkpoint) and evaluate one spec; returns the run
    record, which is also written to run.json. An optional `tracker` gets start(record),
    log_metrics(metrics) per training log line, log_evaluation(entries) and end(final record)."""
    if smoke:
        spec = smoke_version(spec)
    rundir = run_dir(spec, workdir)
    rundir.mkdir(parents=True, exist_ok=True)
    previous = rundir / "run.json"
    record = json.loads(previous.read_text()) if eval_only and previous.exists() else {}
    record.update({
        "name": spec.name, "spec_hash": spec.hash(), "smoke": smoke, "status": "running",
        "data": "mock (random) data, for a pipeline check only" if smoke else spec.data.dataset,
        "git_commit": git_commit(), "started": _now(), "run_dir": str(rundir),
        "devices": [str(d) for d in jax.devices()], "processes": jax.process_count(),
        "host": socket.gethostname(), "pid": os.getpid(), "versions": _versions(),
        "spec": spec.model_dump(mode="json"),
    })
    record.setdefault("evaluation", [])
    write_json(rundir / "run.json", record)
    if tracker is not None:  # e.g. orchestration.tracking.Tracker; its hooks never raise
        tracker.start(record)
    try:
        _run(spec, rundir, smoke, eval_only, record, log, tracker)
        record["status"] = "finished"
        return record
    except StopTraining as e:  # a hook (e.g. a sweep's early stopping) ended training on purpose
        record["status"], record["stopped"] = "stopped", str(e)
        return record
    except BaseException as e:  # the record says how the run ended, whatever ended it
        record["status"] = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record["finished"] = _now()
        write_json(rundir / "run.json", record)
        if tracker is not None:
            tracker.end(record)


def _run(spec: Spec, rundir: Path, smoke: bool, eval_only: bool, record: dict, log, tracker=None) -> None:
    t0 = time.perf_counter()
    # fail before training if weights or statistics are missing
    metric = smoke_metric(spec) if smoke else load_metric(spec)
    if smoke:
        record["evaluation_note"] = (metric.note if metric else
                                     "--smoke: mock data has no reference statistics, so no metric")
    codec = make_codec(spec, smoke, record)
    parallel = Parallel.create(spec.train.batch_size, spec.resources.sharding)
    # A `teacher:` spec is found finished in the same work directory or trained first (shortcut/stages.py).
    teacher = stages.resolve_teacher(spec, rundir.parents[1], smoke=smoke, train_missing=not eval_only, log=log)
    if teacher is not None:
        record["teacher"] = teacher.summary()
    objective = methods.make_objective(spec)
    data = None
    if not eval_only:  # reflow trains on the teacher's generated pairs, every other method on the dataset
        data = stages.training_data(spec, objective, teacher, rundir, log=log)
        data = make_data(spec, smoke, codec, rundir, log) if data is None else data
    model = build_model(spec)
    apply_fn = make_apply_fn(model)
    optimizer = make_optimizer(spec.optimizer)
    state = init_state(spec, model, optimizer, objective, teacher_params=teacher.params if teacher else None)
    state = parallel.place(stages.start_from_teacher(spec, state, objective, teacher))

    overview = parameter_overview.get_parameter_overview(state.params, include_stats=False)
    (rundir / "params.txt").write_text(overview + "\n")
    n_params = parameter_overview.count_parameters(state.params)
    record["num_params"] = n_params
    log(f"{spec.name} [{spec.hash()[:12]}] {spec.method.name}, DiT hidden {spec.model.hidden_size} depth "
        f"{spec.model.depth}: {n_params:,} parameters (table in {rundir / 'params.txt'})")

    sampler = make_sampler(objective, apply_fn)
    timings = record.setdefault("timings", {})
    timings["setup_s"] = time.perf_counter() - t0

    def evaluate_at(state, step: int) -> None:
        checkpointer.wait()  # the checkpoint of this step is complete before hooks hear of the evaluation
        t = time.perf_counter()
        params = state.ema_params if spec.eval.params == "ema" else state.params
        entries, samples = evaluate(spec, metric, sampler, params, objective=objective, train_step=step,
                                    rundir=rundir, log=log, decode=codec.decode if codec else None)
        record["evaluation"] = [e for e in record["evaluation"] if e["train_step"] != step] + entries
        record["samples"] = samples
        timings[f"evaluate_step{step}_s"] = time.perf_counter() - t
        write_json(rundir / "run.json", record)
        if tracker is not None:
            tracker.log_evaluation(entries)

    checkpointer = Checkpointer(rundir / "checkpoints", keep=spec.train.keep_checkpoints)
    try:
        if eval_only:
            like = state
            found = checkpointer.restore_latest(lambda step: restore(checkpointer, step, like), log=log)
            if found is None:
                raise UnsupportedError(f"--eval-only: no checkpoint in {checkpointer.directory}; train first")
            step, (state, _) = found
            log(f"evaluating the checkpoint at step {step}")
        else:
            train_step = make_train_step(apply_fn, objective, optimizer, spec, parallel, state)
            result = train(spec, state, train_step, data, checkpointer, shard=parallel.shard, log=log,
                           on_eval=evaluate_at, on_log=tracker.log_metrics if tracker is not None else lambda m: None)
            state = result.state
            record["resumed_from"] = result.resumed_from
            timings["train_s"] = result.seconds
            record["train"] = {"steps": spec.train.steps, "final": result.history[-1] if result.history else None,
                               "history": result.history}
        evaluate_at(state, int(state.step))
    finally:
        checkpointer.close()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    import flax
    import optax
    import orbax.checkpoint

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": orbax.checkpoint.__version__}
