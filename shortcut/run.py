"""One experiment run: check data -> build -> train (resuming) -> sample at each step count -> record.

Everything a run writes lives in its run directory `<workdir>/<spec name>/<spec hash[:12]>/`:
checkpoints/, samples/steps_<N>.png, eval/ (partial metric statistics, so a killed evaluation resumes),
params.txt and run.json (the run record: the source of truth for what was trained, how long it took
and every metric with its provenance).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import jax
from clu import parameter_overview

from shortcut import data as data_lib
from shortcut import assembly, compute, disk
from shortcut import teacher as teacher_lib
from shortcut import record as record_lib
from shortcut.checkpoint import remove_partial_saves
from shortcut.errors import ShortcutError
from shortcut.evaluate import evaluate
from shortcut.metrics import load_metric
from shortcut.record import RunDir, Status, last_evaluation
from shortcut.run_lock import RunLock
from shortcut.sharding import Parallel
from shortcut.spec import Spec, SpecError
from shortcut.train import StopTraining, init_state, make_train_step, resume, train


class UnsupportedError(ShortcutError, RuntimeError):
    """A spec asks for something this version cannot do; the message says what and why."""


def make_data(spec: Spec, codec=None, rundir: Path | None = None, log=print):
    """The training iterator (per-process batches), after checking the data matches the spec. With a
    latent spec, batches are latents: encoded on the fly, or sampled from the pre-encoded dataset."""
    per_process = spec.train.batch_size // jax.process_count()
    d = spec.data
    if spec.smoke:
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
    if spec.smoke:  # a few batches of mock images stand in for the dataset
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


def describe_codec(parts, record: dict):
    """The run's VAE (assembly.Parts.codec: None for pixel specs), described in the run record."""
    codec, lat = parts.codec, parts.spec.data.latent
    if codec is None:
        return None
    record["latent"] = {"autoencoder": lat.autoencoder, "vae": codec.description,
                        "vae_weights_sha256": codec.weights_sha256, "encoding": lat.encoding, "scale": lat.scale}
    if parts.spec.smoke:
        record["latent"]["note"] = ("--smoke: a randomly initialised reduced-width VAE, not sd-vae-ft-mse; "
                                    "checks encode -> train -> sample -> decode -> evaluate only")
    return codec


def run(spec: Spec, *, workdir: str | Path | None = None, eval_only: bool = False, log=print, tracker=None,
        on_locked: str = "fail") -> dict:
    """Train (or with eval_only, load the latest checkpoint) and evaluate one spec; returns the run
    record, which is also written to run.json. An optional `tracker` gets start(record),
    log_metrics(metrics) per training log line, log_evaluation(entries) and end(final record).
    The run holds its run directory's lock (shortcut/run_lock.py) throughout; when another process holds
    it, `on_locked` says what to do: "fail" (RunLocked, nothing written), "wait" (then run), or "record"
    (wait; if that run finished this spec, return its record instead of running again). A --smoke run is
    the run of a spec in its --smoke form (shortcut.spec.smoke_version)."""
    from shortcut.memory import check_run_fits

    parts = assembly.build(spec)  # once: the memory check, the run and its teacher share them
    check_run_fits(spec, parts=parts)  # MemoryPlanError (one line) before anything is written or allocated
    rundir = RunDir.of(spec, workdir)
    rundir.path.mkdir(parents=True, exist_ok=True)
    # one writer per run directory (process 0 of a multi-host run writes for all), before anything is written
    lock = rundir.lock().acquire(wait=on_locked != "fail", log=log) if jax.process_index() == 0 else None
    if lock and lock.waited and on_locked == "record" and not eval_only and (done := rundir.finished(spec.hash())):
        return _replay(done, tracker, lock)  # the run that held it while we waited finished this very spec
    if lock:
        remove_partial_saves(rundir.checkpoints, log=log)  # a killed run's; the lock holder's job only
    previous = rundir.read()
    record = previous if eval_only and previous else {}
    record.update({
        "name": spec.name, "spec_hash": spec.hash(), "smoke": spec.smoke, "status": Status.RUNNING,
        "data": "mock (random) data, for a pipeline check only" if spec.smoke else spec.data.dataset,
        **record_lib.git_provenance(), "started": record_lib.now(), "run_dir": str(rundir.path),
        "devices": [str(d) for d in jax.devices()], "processes": jax.process_count(),
        "host": socket.gethostname(), "pid": os.getpid(), "versions": _versions(),
        "spec": spec.model_dump(mode="json"),
    })
    record.setdefault("evaluation", [])
    if not eval_only and previous and previous.get("spec_hash") == record["spec_hash"]:
        # a resumed run keeps its curve (points it redoes are replaced) and its compute (a run resumed at its
        # last step compiles no train step)
        record.update({k: previous[k] for k in ("curve", "compute") if previous.get(k)})
    record.setdefault("curve", [])
    rundir.write(record)
    if tracker is not None:  # e.g. orchestration.tracking.tracker.Tracker; its hooks never raise
        tracker.start(record)
    try:
        _run(parts, rundir, eval_only, record, log, tracker)
        record["status"] = Status.FINISHED
        return record
    except StopTraining as e:  # a hook (e.g. a sweep's early stopping) ended training on purpose
        record["status"], record["stopped"] = Status.STOPPED, str(e)
        return record
    except BaseException as e:  # the record says how the run ended, whatever ended it
        record["status"] = Status.INTERRUPTED if isinstance(e, (KeyboardInterrupt, SystemExit)) else Status.FAILED
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        try:
            record["finished"] = record_lib.now()
            try:
                rundir.write(record)
            except OSError as e:
                # a full disk as the run ends on an error: the last record written stays as it was (writes
                # are atomic) and the error that ended the run is the one reported
                if not disk.is_full(e) or record["status"] == "finished":
                    raise
            if tracker is not None:
                tracker.end(record)
        finally:
            if lock:
                lock.release()


def _replay(record: dict, tracker, lock: RunLock) -> dict:
    """Another process ran this spec while we waited: its record goes to the hooks (a sweep's Tune
    reporter, a table's progress board, MLflow: synced again, idempotently) as if this run had made it."""
    try:
        if tracker is not None:
            tracker.start(record)
            with contextlib.suppress(StopTraining):
                tracker.log_evaluation(last_evaluation(record))
            tracker.end(record)
        return record
    finally:
        lock.release()


def _run(parts: assembly.Parts, rundir: RunDir, eval_only: bool, record: dict, log, tracker=None) -> None:
    t0 = time.perf_counter()
    spec = parts.spec
    # fail before training if weights or statistics are missing
    metric = load_metric(spec)
    if spec.smoke:
        record["evaluation_note"] = (metric.note if metric else
                                     "--smoke: mock data has no reference statistics, so no metric")
    objective, model, apply_fn, optimizer, sampler = (parts.objective, parts.model, parts.apply_fn, parts.optimizer,
                                                      parts.sampler)
    codec = describe_codec(parts, record)
    parallel = Parallel.create(spec.train.batch_size, spec.resources.sharding)
    # A `teacher:` spec's finished run is found in the same work directory (shortcut/teacher.py).
    teacher = teacher_lib.resolve(parts, rundir.path.parents[1], log=log)
    if teacher is not None:
        record["teacher"] = teacher.summary()
    teacher_flops = compute.teacher_compute(teacher.run_dir) if teacher is not None else None
    preparation = objective.preparation_flops(spec, teacher)  # e.g. the teacher's sampling of reflow's pairs
    # compute spent before this run's first step: its teacher's and the method's preparation of its data
    offset = sum(x or 0.0 for x in ((teacher_flops or {}).get("total_flops"), *preparation.values()))
    data = None
    if not eval_only:  # the dataset, unless the method trains on data of its own (reflow: its teacher's pairs)
        data = objective.training_data(lambda: make_data(spec, codec, rundir.path, log), spec=spec, teacher=teacher,
                                       rundir=rundir.path, log=log)
    state = init_state(spec, model, optimizer, objective, teacher_params=teacher.params if teacher else None)
    state = parallel.place(teacher_lib.start_from_teacher(spec, state, objective, teacher))

    overview = parameter_overview.get_parameter_overview(state.params, include_stats=False)
    (rundir.path / "params.txt").write_text(overview + "\n")
    n_params = parameter_overview.count_parameters(state.params)
    record["num_params"] = n_params
    log(f"{spec.name} [{spec.hash()[:12]}] {spec.method.name}, DiT hidden {spec.model.hidden_size} depth "
        f"{spec.model.depth}: {n_params:,} parameters (table in {rundir.path / 'params.txt'})")

    timings = record.setdefault("timings", {})
    timings["setup_s"] = time.perf_counter() - t0

    def on_compiled(step_flops: float | None) -> None:
        record["compute"] = compute.run_compute(step_flops, spec.train.steps, teacher_flops, preparation,
                                                has_teacher=teacher is not None)
        rundir.write(record)

    def add_curve(entries: list[dict], step: int) -> None:
        """Convergence-curve points from evaluation entries at the curve's settings."""
        keys = {s.key for s in spec.eval.curve_settings()}
        flops = (record.get("compute") or {}).get("train_step_flops")
        points = [{"train_step": step, "num_steps": e["num_steps"], "setting": e["setting"], "metric": e["metric"],
                   "value": e["value"], "compute_flops": None if flops is None else offset + flops * step,
                   "noise_floor": (e.get("noise_floor") or {}).get("value"), "bootstrap_std": e.get("bootstrap_std")}
                  for e in entries if e["setting"] in keys]
        if points:
            done = {(p["train_step"], p["setting"]) for p in points}
            record["curve"] = sorted([p for p in record["curve"] if (p["train_step"], p["setting"]) not in done] +
                                     points, key=lambda p: (p["train_step"], p["num_steps"]))

    def evaluated(state, step: int, **kwargs) -> tuple[list[dict], dict]:
        """(entries, sample grids) of an evaluation at `step`, with the parameters `eval.params` names."""
        params = state.ema_params if spec.eval.params == "ema" else state.params
        return evaluate(spec, metric, sampler, params, objective=objective, train_step=step, rundir=rundir.path,
                        log=log, decode=codec.decode if codec else None, **kwargs)

    def curve_at(state, step: int) -> None:
        t = time.perf_counter()
        entries, _ = evaluated(state, step, settings=spec.eval.curve_settings(), grids=False)
        add_curve(entries, step)
        timings["curve_s"] = timings.get("curve_s", 0.0) + time.perf_counter() - t
        rundir.write(record)
        if tracker is not None:
            tracker.log_evaluation(entries)

    def evaluate_at(state, step: int) -> None:
        checkpointer.wait()  # the checkpoint of this step is complete before hooks hear of the evaluation
        t = time.perf_counter()
        entries, samples = evaluated(state, step)
        record["evaluation"] = [e for e in record["evaluation"] if e["train_step"] != step] + entries
        record["samples"] = samples
        if spec.eval.curve_every:
            add_curve(entries, step)
        timings[f"evaluate_step{step}_s"] = time.perf_counter() - t
        rundir.write(record)
        if tracker is not None:
            tracker.log_evaluation(entries)

    checkpointer = rundir.checkpointer(keep=spec.train.keep_checkpoints)
    try:
        if eval_only:
            found = resume(checkpointer, state, log=log)
            if found is None:
                raise UnsupportedError(f"--eval-only: no checkpoint in {checkpointer.directory}; train first")
            step, (state, _) = found
            log(f"evaluating the checkpoint at step {step}")
        else:
            train_step = make_train_step(apply_fn, objective, optimizer, spec, parallel, state)
            result = train(spec, state, train_step, data, checkpointer, shard=parallel.shard, log=log,
                           on_eval=evaluate_at, on_curve=curve_at if metric is not None else None,
                           on_compiled=on_compiled,
                           on_log=tracker.log_metrics if tracker is not None else lambda m: None)
            state = result.state
            record["resumed_from"] = result.resumed_from
            timings["train_s"] = result.seconds
            record["train"] = {"steps": spec.train.steps, "final": result.history[-1] if result.history else None,
                               "history": result.history}
        evaluate_at(state, int(state.step))
    finally:
        checkpointer.close()


def _versions() -> dict:
    import flax
    import optax
    import orbax.checkpoint

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": orbax.checkpoint.__version__}
