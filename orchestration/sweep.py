"""`sweep NAME [--set KEY=VALUE ...] [--num-samples N] [--max-concurrent N] [--resume] [--workdir DIR]`.

Ray Tune over a spec's `sweep:` section (shortcut/spec.py, SweepSpec): each trial is the spec with the
sampled values set, run by orchestration.execution.worker.execute in its own run directory (the values change
the spec hash). A trial reports its metrics at every evaluation (`eval.every` steps and the end) with
its Orbax checkpoint of that step, so the ASHA scheduler can stop the weaker trials early and a trial
whose worker dies is retried from its last checkpoint (`sweep.max_failures`). The sweep's state lives
in <workdir>/sweeps/<name>/; `--resume` continues an interrupted sweep from there.

MLflow: one parent run per sweep (its search space as params, the best value and configuration at the
end), one child run per trial (tag mlflow.parentRunId). The best configuration is written to
results/sweeps/<name>_best.yaml, a spec that `run_experiment` runs as is, plus every trial's result
in results/sweeps/<name>_trials.csv.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from shortcut.errors import ShortcutError
from shortcut.spec import Spec, SpecError, with_values
from shortcut.spec_files import load_spec, parse_value, spec_path

STATE_FILE = "shortcut_sweep.json"  # beside Tune's own state: the parent MLflow run, the resolved spec


def metric_of(spec: Spec) -> str:
    """The metric a sweep optimises (sweep.metric, else the fewest-steps evaluation, e.g. fd_digits/1_steps)."""
    if spec.sweep.metric:
        return spec.sweep.metric
    if spec.eval.metric == "none":
        raise SpecError(spec.name, "sweep.metric", "eval.metric is none: nothing to optimise; set eval.metric")
    fewest = min(spec.eval.settings(), key=lambda s: s.num_steps)
    return f"{spec.eval.metric}/{fewest.key}"


def param_space(spec: Spec) -> dict:
    """Tune's search space: dotted spec keys -> Tune distributions."""
    from ray import tune

    kinds = {"choice": tune.choice, "grid": tune.grid_search,
             "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: kinds[kind](values) for key, dist in spec.sweep.space.items() for kind, values in dist.items()}


def check_space(spec: Spec) -> None:
    """Fail before any trial starts when a value of the space does not make a valid spec."""
    for key, dist in spec.sweep.space.items():
        kind, values = next(iter(dist.items()))
        for v in (values if kind in ("choice", "grid") else values[:2]):
            try:
                spec.with_values({key: v}, f"{spec.name}: sweep.space.{key}={v!r}")
            except SpecError as e:
                raise SpecError(f"{spec.name}: sweep.space", key, f"value {v!r} gives an invalid spec: "
                                                                  f"{e.key}: {e.message}") from None


class TuneReporter:
    """Run hooks (orchestration.execution.worker.Hooks) that report each evaluation to Tune with the checkpoint of
    that step, and turn the scheduler's decision to stop the trial into StopTraining."""

    def __init__(self):
        self.run_dir: Path | None = None

    def start(self, record: dict) -> None:
        self.run_dir = Path(record["run_dir"])

    def log_evaluation(self, entries: list[dict]) -> None:
        from ray import tune

        from shortcut.train import StopTraining

        if not entries:
            return
        step = int(entries[0]["train_step"])
        metrics = {f"{e['metric']}/{e.get('setting') or str(e['num_steps']) + '_steps'}": float(e["value"])
                   for e in entries if e.get("value") is not None}
        metrics["train_step"] = step
        source = self.run_dir / "checkpoints" / str(step)
        try:
            if source.is_dir():
                with tempfile.TemporaryDirectory() as staging:
                    shutil.copytree(source, Path(staging) / str(step))
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))
            else:
                tune.report(metrics)
        except SystemExit:  # how Tune ends a function trial it decided to stop
            raise StopTraining(f"stopped early by the sweep's scheduler after the evaluation at step {step}") from None


def restore_checkpoint(run_dir: Path) -> int | None:
    """Put the trial's last reported checkpoint (if Tune has one) into its run directory, where the run
    resumes from it; returns its step. A no-op when the run directory already holds it."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        steps = [p for p in Path(d).iterdir() if p.name.isdigit()]
        for p in steps:
            dest = run_dir / "checkpoints" / p.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(p, dest)
        return max((int(p.name) for p in steps), default=None)


def trial(config: dict, *, base: Spec, launch_kwargs: dict, parent_run_id: str | None) -> None:
    """One trial (runs in a Tune worker): the resolved spec `base` with `config` set, trained and evaluated."""
    import dataclasses

    from ray import tune

    from orchestration.execution.worker import execute
    from orchestration.tracking.parent import PARENT_TAG
    from shortcut.record import run_dir
    from shortcut.run_lock import RunLock

    spec = base.with_values(config, f"{base.name} trial")
    # only into a run directory no other process writes (e.g. this trial's earlier attempt, still alive)
    with RunLock(run_dir(spec, launch_kwargs["workdir"])).acquire(wait=True) as lock:
        resumed_at = restore_checkpoint(lock.rundir)
    if resumed_at is not None:
        print(f"trial {tune.get_context().get_trial_id()}: resuming from its checkpoint at step {resumed_at}")
    tracking = launch_kwargs["tracking"]
    tags = dict(tracking.tags, sweep=base.name, sweep_trial=tune.get_context().get_trial_id())
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    # a run directory in use elsewhere (a plain run of the same values): wait for that run's record
    kwargs = dict(launch_kwargs, tracking=dataclasses.replace(tracking, tags=tuple(tags.items())), on_locked="record")
    outcome = execute(spec, hooks=(TuneReporter(),), **kwargs)
    if outcome["status"] not in ("finished", "stopped"):
        raise RuntimeError(f"trial run {outcome['run_dir']} ended {outcome['status']}: {outcome.get('error')}")


# ------------------------------------------------------------------------------------------- MLflow


def _parent_run(client, state: dict, spec: Spec) -> str | None:
    from orchestration.tracking.naming import experiment_name
    from orchestration.tracking.sync import get_or_create_experiment

    if client is None:
        return state.get("parent_run_id")
    if state.get("parent_run_id"):
        client.update_run(state["parent_run_id"], status="RUNNING")
        return state["parent_run_id"]
    exp = get_or_create_experiment(client, experiment_name({"spec": spec.model_dump(mode="json"), "smoke": spec.smoke}))
    run = client.create_run(exp, run_name=f"sweep-{spec.name}", tags={"sweep": spec.name, "kind": "sweep",
                                                                       "metric": metric_of(spec)})
    for key, dist in spec.sweep.space.items():
        client.log_param(run.info.run_id, f"space.{key}", json.dumps(dist))
    for key in ("num_samples", "scheduler", "mode", "grace_period", "reduction_factor"):
        client.log_param(run.info.run_id, f"sweep.{key}", str(getattr(spec.sweep, key)))
    return run.info.run_id


# ---------------------------------------------------------------------------------------------- run


def run_sweep(spec: Spec, *, workdir: Path, launch_kwargs: dict, resume: bool = False, overrides: tuple[str, ...] = (),
              num_samples: int | None = None, max_concurrent: int | None = None, address: str | None = None,
              cpus: int | None = None, results_dir: Path) -> dict:
    """Run (or with resume, continue) the sweep; returns the best trial's config and metrics."""
    from orchestration.execution import cluster

    if not (address or os.environ.get("RAY_ADDRESS")):
        cluster.local_only()  # before ray is imported
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestration.tracking.parent import client_for

    sweep_dir = workdir / "sweeps" / spec.name
    state_path = sweep_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if resume and state.get("spec"):  # continue with the spec the sweep started with, whatever --set says now
        spec = Spec.from_tree(state["spec"], f"{sweep_dir / STATE_FILE}")
        overrides = tuple(state.get("overrides", ()))
    cfg, metric = spec.sweep, metric_of(spec)
    check_space(spec)
    if resume and not tune.Tuner.can_restore(str(sweep_dir)):
        raise SpecError(spec.name, "", f"--resume: no sweep state in {sweep_dir}; start it without --resume")
    if not resume and tune.Tuner.can_restore(str(sweep_dir)):
        raise SpecError(spec.name, "", f"a sweep already exists in {sweep_dir}: continue it with --resume, "
                                       "or remove that folder to start over")

    resources = spec.resources
    runtime_env = cluster.worker_options(resources)["runtime_env"]
    started_ray = not ray.is_initialized()
    available = cluster.connect(address, num_cpus=cpus, runtime_env=runtime_env)
    warning = cluster.check_feasible(resources, available, spec.name, local=not address)
    if warning:
        print(warning, file=sys.stderr)

    client, release = client_for(workdir, launch_kwargs["tracking"])
    try:
        parent = _parent_run(client, state, spec)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state.update(parent_run_id=parent, spec=spec.to_tree(), overrides=list(overrides), metric=metric)
        state_path.write_text(json.dumps(state, indent=2))

        trainable = tune.with_parameters(trial, base=spec,
                                         launch_kwargs=launch_kwargs, parent_run_id=parent)
        per_trial = {"cpu": resources.cpus, "gpu": resources.gpus}
        if resources.tpus:
            per_trial["TPU"] = resources.tpus
        trainable = tune.with_resources(trainable, per_trial)
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
        else:
            evaluations = spec.train.steps // spec.eval.every if spec.eval.every else 1
            scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max(evaluations, 1),
                                       grace_period=min(cfg.grace_period, max(evaluations, 1)),
                                       reduction_factor=cfg.reduction_factor)
                         if cfg.scheduler == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable, param_space=param_space(spec),
                tune_config=tune.TuneConfig(metric=metric, mode=cfg.mode, scheduler=scheduler,
                                            num_samples=num_samples or cfg.num_samples,
                                            max_concurrent_trials=max_concurrent or cfg.max_concurrent),
                run_config=tune.RunConfig(name=spec.name, storage_path=str(sweep_dir.parent),
                                          failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                          verbose=1))
        results = tuner.fit()
        best = _best(results, metric, cfg.mode)
        summary = {"name": spec.name, "metric": metric, "mode": cfg.mode, "trials": len(results),
                   "errors": len(results.errors), "best": best, "sweep_dir": str(sweep_dir)}
        if best is not None:
            summary["best_spec"] = str(write_best(spec, best, results_dir, metric, overrides))
            summary["trials_csv"] = str(write_trials(spec, results, results_dir))
        if client is not None and parent:
            if best is not None:
                client.log_metric(parent, f"best/{metric}", best["value"])
                client.log_dict(parent, best, "best.json")
            client.set_terminated(parent, "FINISHED" if not results.errors else "FAILED")
        return summary
    finally:
        release()
        if started_ray:
            ray.shutdown()


def _best(results, metric: str, mode: str) -> dict | None:
    try:
        r = results.get_best_result(metric=metric, mode=mode, scope="all")
    except RuntimeError:
        return None
    if r is None or r.metrics is None or metric not in r.metrics:
        return None
    frame = r.metrics_dataframe
    value = float(frame[metric].min() if mode == "min" else frame[metric].max()) if frame is not None else float(
        r.metrics[metric])
    return {"config": dict(r.config), "value": value, "trial_id": r.metrics.get("trial_id"),
            "train_step": r.metrics.get("train_step")}


def write_best(spec: Spec, best: dict, results_dir: Path, metric: str, overrides: tuple[str, ...] = ()) -> Path:
    """results/sweeps/<name>_best.yaml: the swept spec with the sweep's --set overrides and the best values,
    runnable by run_experiment."""
    out = results_dir / "sweeps" / f"{spec.name}_best.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(spec_path(spec.name).resolve(), out.parent)
    chosen = {k: parse_value(v) for k, v in (o.split("=", 1) for o in overrides)}
    chosen.update(best["config"])
    values = with_values({}, chosen)
    date = datetime.date.today().isoformat()
    flags = " ".join(f"--set {k}={json.dumps(v)}" for k, v in chosen.items())
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    header = (f"# Best configuration of `sweep {spec.name}` ({date}): {metric} = {best['value']:.6g} "
              f"(trial {best['trial_id']}, train step {best['train_step']}).\n"
              f"# Run it: run_experiment {shown}\n"
              f"# or: run_experiment {spec.name} {flags}\n")
    body = {"base": base, "description": f"{spec.name} with the best values of its sweep", **values}
    out.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return out


def write_trials(spec: Spec, results, results_dir: Path) -> Path:
    import pandas as pd

    rows = []
    for r in results:
        row = {"trial_id": (r.metrics or {}).get("trial_id"), **{f"config.{k}": v for k, v in r.config.items()}}
        row.update({k: v for k, v in (r.metrics or {}).items() if "/" in k or k in ("train_step", "training_iteration")})
        row["error"] = str(r.error).splitlines()[0][:200] if r.error else ""
        rows.append(row)
    out = results_dir / "sweeps" / f"{spec.name}_trials.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sweep", description="Ray Tune over the search space of a spec's `sweep:` "
                                "section (ASHA on the evaluation metric by default).")
    p.add_argument("name", help="spec name (experiments/NAME.yaml) or path, with a sweep: section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key for every trial (repeatable)")
    p.add_argument("--num-samples", type=int, help="trials (default: sweep.num_samples; grid values multiply it)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: sweep.max_concurrent, else as "
                   "many as resources allow)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in WORKDIR/sweeps/NAME")
    p.add_argument("--workdir", help="work directory (default: the spec's output.workdir, runs/)")
    p.add_argument("--smoke", action="store_true", help="each trial tiny, on mock data (no metric: FIFO only)")
    p.add_argument("--address", help="Ray cluster GCS address (HOST:6379, auto); default: a local instance")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--no-tracking", action="store_true", help="no MLflow (also: SHORTCUT_TRACKING=off)")
    p.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI, else the local server)")
    p.add_argument("--results-dir", help="where the best spec goes (default: $SHORTCUT_RESULTS_DIR, else results/)")
    args = p.parse_args(argv)

    from orchestration.reporting.results import default_results_dir
    from orchestration.execution.worker import Tracking

    try:
        spec = load_spec(args.name, args.overrides, smoke=args.smoke)
        if spec.sweep is None:
            raise SpecError(spec.name, "sweep", "this spec declares no sweep: section (a search space)")
        workdir = Path(args.workdir or spec.output.workdir).expanduser().resolve()
        results_dir = (Path(args.results_dir) if args.results_dir else default_results_dir()).expanduser().resolve()
        tracking = Tracking.from_flags(no_tracking=args.no_tracking, uri=args.tracking_uri)
        launch_kwargs = {"workdir": str(workdir), "tracking": tracking,
                         "results_dir": str(results_dir)}
        summary = run_sweep(spec, workdir=workdir, launch_kwargs=launch_kwargs, resume=args.resume,
                            overrides=tuple(args.overrides),
                            num_samples=args.num_samples, max_concurrent=args.max_concurrent, address=args.address,
                            cpus=args.cpus, results_dir=results_dir)
    except ShortcutError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; continue with: sweep NAME --resume", file=sys.stderr)
        return 130
    best = summary["best"]
    print(f"sweep {summary['name']}: {summary['trials']} trials ({summary['errors']} errored) in {summary['sweep_dir']}")
    if best is None:
        print("no trial reported the metric", file=sys.stderr)
        return 1
    print(f"  best {summary['metric']} = {best['value']:.6g} with {best['config']}")
    print(f"  best spec: {summary['best_spec']}\n  trials: {summary['trials_csv']}")
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
