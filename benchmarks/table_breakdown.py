"""Where the time of one `table1_digits` run goes: start-up, compile, train, evaluate, Ray and MLflow.

    python benchmarks/table_breakdown.py                      # digits_shortcut, 400 training steps
    python benchmarks/table_breakdown.py --steps 400 --spec digits_flow --json out.json
    python benchmarks/table_breakdown.py --only vmap          # one seed vs 3 seeds vmapped in one program

Every part is a real run of the project's code, each in a fresh process with the environment a Ray
worker of `table1_digits` gets (one CPU: JAX on the CPU, single-threaded XLA):

  imports   a worker's imports (jax, TensorFlow for the input pipeline, shortcut.run, tracking, mlflow)
  inproc    shortcut.run.run in one process, no Ray, no tracking: setup (data, model, metric), the
            compile time of every XLA compilation (jax.monitoring), training at steady state, and
            each step count's evaluation (2,000 samples, the spec's protocol, unchanged)
  cache     the same again with a warm JAX compilation cache (what a second seed of a spec sees)
  cli       `run_experiment SPEC` from a fresh work directory: with Ray (--no-tracking), and with Ray
            and MLflow (a local tracking server); wall time minus the run's own timings = overhead
  vmap      the train step for one seed vs the same step vmapped over 3 seeds in one program

Figures are wall-clock seconds on this machine; the table run's 4,000-step figures are extrapolated
from the short run (steady-state steps/s) and printed as such. On a shared machine (other jobs on
the same cores) every figure is inflated; compare parts measured in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchestration.execution.cluster import worker_options  # noqa: E402
from shortcut.spec import ResourcesSpec  # noqa: E402

WORKER_ENV = worker_options(ResourcesSpec(cpus=1))["runtime_env"]["env_vars"]  # what a table1_digits worker gets
TABLE_STEPS, TABLE_RUNS, SLOTS = 4000, 27, 2  # table1_digits: 9 specs x 3 seeds, two single-CPU workers at once

IMPORTS = """
import time, json
t = {}
t0 = time.perf_counter()
import jax; t["jax"] = time.perf_counter() - t0
import shortcut.data.tfenv; t["tensorflow + tfds"] = time.perf_counter() - t0 - sum(t.values())
import shortcut.run; t["shortcut.run (flax, optax, orbax, ...)"] = time.perf_counter() - t0 - sum(t.values())
import orchestration.execution.worker, orchestration.tracking.tracker; t["orchestration"] = time.perf_counter() - t0 - sum(t.values())
import mlflow; t["mlflow"] = time.perf_counter() - t0 - sum(t.values())
print(json.dumps(t))
"""


def _python(code_or_args: list[str], env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **WORKER_ENV, **(env or {})))


def _last_json(out: subprocess.CompletedProcess) -> dict:
    if out.returncode != 0:
        raise SystemExit(f"error: a measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_imports() -> dict:
    t0 = time.perf_counter()
    parts = _last_json(_python(["-c", IMPORTS]))
    return {"parts": parts, "process_s": time.perf_counter() - t0}


def inprocess(spec_name: str, overrides: list[str], workdir: str, cache_dir: str | None) -> dict:
    """One run in this process (called in a fresh subprocess); compile events timed by jax.monitoring."""
    t_start = time.perf_counter()
    import jax

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    events: list[tuple[float, str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: events.append((time.perf_counter(), event, duration)))
    counts: dict[str, int] = {}
    jax.monitoring.register_event_listener(lambda event, **kw: counts.__setitem__(event, counts.get(event, 0) + 1))
    from shortcut.run import run
    from shortcut.spec_files import load_spec

    imported = time.perf_counter() - t_start
    spec = load_spec(spec_name, overrides)
    t_run = time.perf_counter()
    record = run(spec, workdir=workdir, log=lambda m: None)
    run_s = time.perf_counter() - t_run
    timings = record["timings"]
    train_end = t_run + timings["setup_s"] + timings["train_s"]
    compiles = [(t, d) for t, e, d in events if e == "/jax/core/compile/backend_compile_duration"]
    traces = [(t, d) for t, e, d in events if e in ("/jax/core/compile/jaxpr_trace_duration",
                                                   "/jax/core/compile/jaxpr_to_mlir_module_duration")]
    cache_hits = counts.get("/jax/compilation_cache/cache_hits", 0)
    history = record["train"]["history"]
    steady = [h["steps_per_sec"] for h in history[1:]]  # the first window includes the train step's compile
    evals = {str(e["num_steps"]): e["seconds"] for e in record["evaluation"]}
    return {
        "imports_s": imported, "run_s": run_s, "setup_s": timings["setup_s"], "train_s": timings["train_s"],
        "evaluate_s": sum(v for k, v in timings.items() if k.startswith("evaluate_step")),
        "evaluate_by_steps_s": evals, "steady_steps_per_s": sum(steady) / len(steady) if steady else None,
        "train_steps": record["train"]["steps"],
        "compile_train_s": sum(d for t, d in compiles if t <= train_end),
        "compile_eval_s": sum(d for t, d in compiles if t > train_end),
        "trace_lower_s": sum(d for _, d in traces), "compilations": len(compiles), "cache_hits": cache_hits,
    }


def measure_inprocess(spec: str, overrides: list[str], cache_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="breakdown_") as work:
        t0 = time.perf_counter()
        args = ["-m", "benchmarks.table_breakdown", "--_inprocess", json.dumps([spec, overrides, work, cache_dir])]
        out = _last_json(_python(args))
        out["process_s"] = time.perf_counter() - t0
        return out


def measure_cli(spec: str, overrides: list[str], tracking: bool) -> dict:
    """`run_experiment` from a fresh work directory (Ray always; MLflow if tracking)."""
    with tempfile.TemporaryDirectory(prefix="breakdown_cli_") as tmp:
        work, results = Path(tmp) / "runs", Path(tmp) / "results"
        args = ["-m", "orchestration.run_experiment", spec, "--workdir", str(work), "--results-dir", str(results),
                "--cpus", "1"] + [a for o in overrides for a in ("--set", o)]
        if not tracking:
            args.append("--no-tracking")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=3600,
                             env=dict(os.environ, SHORTCUT_TRACKING_IDLE_S="5"))
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise SystemExit(f"error: run_experiment failed:\n{out.stderr[-2000:]}")
        [record_path] = list(work.glob("*/*/run.json"))
        record = json.loads(record_path.read_text())
        timings = record["timings"]
        inner = timings["setup_s"] + timings["train_s"] + sum(v for k, v in timings.items()
                                                              if k.startswith("evaluate_step"))
        return {"wall_s": wall, "inside_run_s": inner, "overhead_s": wall - inner, "timings": timings,
                "run_started": record["started"], "run_finished": record["finished"]}


def measure_vmap(spec_name: str, steps: int, seeds: int = 3) -> dict:
    """Steps/s of the real train step for one seed, and of the same step vmapped over `seeds` seeds
    (stacked states, one batch per seed) in one jit-compiled program: what training the seeds of one
    experiment together would give. Interleaved, so load on the machine affects both alike."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from shortcut import assembly
    from shortcut.spec_files import load_spec
    from shortcut.train import init_state, make_train_step

    spec = load_spec(spec_name)
    parts = assembly.build(spec)
    model, optimizer, objective = parts.model, parts.optimizer, parts.objective
    states = [init_state(load_spec(spec_name, [f"seed={s}"]), model, optimizer, objective) for s in range(seeds)]
    one = make_train_step(parts.apply_fn, objective, optimizer, spec)
    many = jax.jit(jax.vmap(make_train_step(parts.apply_fn, objective, optimizer, spec)), donate_argnums=0)
    b, rng = spec.train.batch_size, np.random.default_rng(0)

    def batch(*lead):
        return {"image": jnp.asarray(rng.uniform(-1, 1, (*lead, b, *spec.input_shape)).astype(np.float32)),
                "label": jnp.asarray(rng.integers(0, spec.data.num_classes, (*lead, b)).astype(np.int32))}

    single, stacked = batch(), batch(seeds)
    state1 = states[0]
    state_n = jax.tree.map(lambda *x: jnp.stack(x), *states)
    t0 = time.perf_counter()
    state1, m = one(state1, single)
    jax.block_until_ready(m)
    compile1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    state_n, m = many(state_n, stacked)
    jax.block_until_ready(m)
    compile_n = time.perf_counter() - t0
    t_one = t_many = 0.0
    for _ in range(3):  # interleaved rounds
        t0 = time.perf_counter()
        for _ in range(steps):
            state1, m = one(state1, single)
        jax.block_until_ready(m)
        t_one += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            state_n, m = many(state_n, stacked)
        jax.block_until_ready(m)
        t_many += time.perf_counter() - t0
    one_sps, many_sps = 3 * steps / t_one, 3 * steps / t_many
    return {"spec": spec_name, "seeds": seeds, "compile_one_s": compile1, "compile_vmapped_s": compile_n,
            "steps_per_s_one_seed": one_sps, "steps_per_s_vmapped": many_sps,
            "seed_steps_per_s_gain": many_sps * seeds / one_sps}


def _vmap_subprocess(spec: str, steps: int) -> dict:
    return _last_json(_python(["-m", "benchmarks.table_breakdown", "--_vmap", json.dumps([spec, steps])]))


def report(r: dict) -> str:
    lines = [f"# table_breakdown: {r['spec']} --set train.steps={r['steps']} (measured {r['when']}, "
             f"load average at start {r['load']:.1f} on {os.cpu_count()} CPUs)", ""]
    if "imports" in r:
        i = r["imports"]
        lines += ["## Worker start-up: imports (fresh process)", "",
                  *[f"- {k}: {v:.1f} s" for k, v in i["parts"].items()],
                  f"- whole process (interpreter + imports): {i['process_s']:.1f} s", ""]
    for key, title in (("inproc", "One run in one process (no Ray, no MLflow), cold compilation cache"),
                       ("cache", "The same with a warm JAX compilation cache (a later seed of the same spec)")):
        if key not in r:
            continue
        p = r[key]
        by_steps = sorted(p["evaluate_by_steps_s"].items(), key=lambda x: -int(x[0]))
        ev = ", ".join(f"{n}-step {s:.1f} s" for n, s in by_steps)
        lines += [f"## {title}", "",
                  f"- process: {p['process_s']:.1f} s (imports {p['imports_s']:.1f} s, run {p['run_s']:.1f} s)",
                  f"- setup (data, model, metric, teacher): {p['setup_s']:.1f} s",
                  f"- train: {p['train_s']:.1f} s for {p['train_steps']} steps, of which XLA compile "
                  f"{p['compile_train_s']:.1f} s; steady state {p['steady_steps_per_s']:.2f} steps/s",
                  f"- evaluate: {p['evaluate_s']:.1f} s ({ev}), of which XLA compile {p['compile_eval_s']:.1f} s",
                  f"- tracing + lowering (all): {p['trace_lower_s']:.1f} s; {p['compilations']} compilations, "
                  f"{p['cache_hits']} from the persistent cache", ""]
    if "cli_ray" in r:
        a, b = r["cli_ray"], r.get("cli_ray_mlflow")
        lines += ["## run_experiment from a fresh work directory", "",
                  f"- Ray, no tracking: wall {a['wall_s']:.1f} s, inside the run {a['inside_run_s']:.1f} s, "
                  f"overhead (driver, Ray start, worker start-up, export) {a['overhead_s']:.1f} s"]
        if b:
            lines.append(f"- Ray + MLflow: wall {b['wall_s']:.1f} s, inside the run {b['inside_run_s']:.1f} s, "
                         f"overhead {b['overhead_s']:.1f} s (MLflow adds {b['overhead_s'] - a['overhead_s']:+.1f} s)")
        lines.append("")
    if "inproc" in r:
        p = r["inproc"]
        per_step = 1 / p["steady_steps_per_s"]
        fixed = p["process_s"] - (p["train_s"] - p["compile_train_s"])  # all but steady-state training
        overhead = r["cli_ray_mlflow"]["overhead_s"] - p["imports_s"] if "cli_ray_mlflow" in r else 0.0
        run_s = fixed + overhead + TABLE_STEPS * per_step
        lines += [f"## Extrapolated (not measured) to the table: {TABLE_STEPS} steps, {TABLE_RUNS} runs, "
                  f"{SLOTS} at once",
                  "", f"- one {TABLE_STEPS}-step run: {fixed:.0f} s fixed (start-up, compile, evaluation) + "
                  f"{overhead:.0f} s Ray/MLflow + {TABLE_STEPS} x {per_step * 1000:.0f} ms = {run_s / 60:.1f} min",
                  f"- {TABLE_RUNS} such runs on {SLOTS} slots: {TABLE_RUNS * run_s / SLOTS / 60:.0f} min "
                  "(ignores that methods' steps cost differently, the reflow teacher's pair generation and the "
                  "wait for teachers)", ""]
    if "vmap" in r:
        v = r["vmap"]
        lines += [f"## Train step: one seed vs {v['seeds']} seeds vmapped in one program ({v['spec']}, one thread)", "",
                  f"- one seed: {v['steps_per_s_one_seed']:.2f} steps/s (compile {v['compile_one_s']:.1f} s)",
                  f"- {v['seeds']} seeds vmapped: {v['steps_per_s_vmapped']:.2f} steps/s of all {v['seeds']} "
                  f"(compile {v['compile_vmapped_s']:.1f} s): {v['seed_steps_per_s_gain']:.2f}x the seed-steps/s", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="digits_shortcut")
    p.add_argument("--steps", type=int, default=400, help="training steps of the measured run")
    p.add_argument("--only", nargs="+", choices=["imports", "inproc", "cache", "cli", "vmap"],
                   help="measure only these parts (default: all)")
    p.add_argument("--vmap-steps", type=int, default=40, help="timed steps per round of the vmap comparison")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--_inprocess", help=argparse.SUPPRESS)
    p.add_argument("--_vmap", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._inprocess:
        print(json.dumps(inprocess(*json.loads(args._inprocess))))
        return 0
    if args._vmap:
        print(json.dumps(measure_vmap(*json.loads(args._vmap))))
        return 0
    parts = set(args.only or ["imports", "inproc", "cache", "cli", "vmap"])
    overrides = [f"train.steps={args.steps}", "resources.cpus=1"]
    r: dict = {"spec": args.spec, "steps": args.steps, "load": os.getloadavg()[0],
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def done(what: str) -> None:  # each part as soon as it is measured: a slow machine still shows some
        print(f"[{time.strftime('%H:%M:%S')}] measured {what}", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2) + "\n")

    if "imports" in parts:
        r["imports"] = measure_imports()
        done("imports")
    if "inproc" in parts:
        r["inproc"] = measure_inprocess(args.spec, overrides)
        done("inproc")
    if "cache" in parts:
        with tempfile.TemporaryDirectory(prefix="breakdown_cache_") as cache:
            measure_inprocess(args.spec, overrides, cache)  # fills the cache
            r["cache"] = measure_inprocess(args.spec, overrides, cache)
        done("cache")
    if "cli" in parts:
        r["cli_ray"] = measure_cli(args.spec, overrides, tracking=False)
        done("cli_ray")
        r["cli_ray_mlflow"] = measure_cli(args.spec, overrides, tracking=True)
        done("cli_ray_mlflow")
    if "vmap" in parts:
        r["vmap"] = _vmap_subprocess(args.spec, args.vmap_steps)
        done("vmap")
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
