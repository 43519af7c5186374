"""`run_experiment SPEC --plan TOPOLOGY`: compile a spec's real train step for hardware this machine does not have,
and report its memory per device, FLOPs per step and projected wall time, before anyone books the hardware.

The spec's own model, objective, optimiser, EMA and `resources.sharding` (dp / fsdp, shortcut/sharding.py) are
built; the state is abstract (shortcut/memory.py `abstract_state`: `jax.eval_shape`, no parameter is ever
materialised) and the jit-compiled train step of shortcut/train.py is lowered with `jax.ShapeDtypeStruct` inputs
sharded over a mesh of the topology's devices and compiled for them. XLA's `memory_analysis()` gives the bytes
per device (arguments, temporaries, outputs) and `cost_analysis()` the FLOPs of the per-device program.

TOPOLOGY is
  * `tpu:v3-8`, `tpu:v4-8`, `tpu:v5e-4`, ... (TPU_SLICES): compiled by libtpu for that slice through
    `jax.experimental.topologies.get_topology_desc`; needs the optional extra `pip install -e '.[plan]'`;
  * `cpu:N`: N fake host devices (`jax_num_cpu_devices`); a CPU estimate: XLA's CPU compiler schedules and fuses
    differently from a TPU's, so its bytes and FLOPs approximate, not predict, an accelerator's.

Everything in the report is a projection except the compiled figures: time = FLOPs per device / (the device's
peak dense bf16 FLOP/s x MFU), with the peaks of DEVICES (their sources beside them) and a stated MFU (40 % by
default). Writes results/plans/<spec>_<topology>_<sharding>.json.

Its parts: orchestration/planning/devices.py (the device table, topologies), compile.py (the compiled programs
and the batch search), report.py (the time projection, the text and the JSON); this module composes them.

GPU: JAX compiles for CUDA without a GPU only through the jax-cuda12 plugin with an explicit target description
(see docs/planning.md); this planner does not offer a GPU target.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from orchestration.planning import devices as devices_lib
from orchestration.planning import report as report_lib
from orchestration.planning.compile import (compile_sampling_step, compile_train_step, compile_vae_decode,
                                            largest_batch, result_fits)
from orchestration.planning.devices import Device, PlanError, Topology, parse_topology, prepare_jax, topology_devices
from orchestration.planning.report import gib
from shortcut import progress, record

DEFAULT_MFU = 0.4
FID_SAMPLES = 50_000


def plan(spec, topology: Topology, *, strategy: str | None = None, mfu: float = DEFAULT_MFU, bisect: bool = True,
         sampling: bool = True, alternative: bool = True, max_compiles: int = 8,
         log: Callable[[str], None] = print) -> dict:
    """The plan of `spec` on `topology` (see the module docstring); JAX must have been prepared (prepare_jax)."""
    import jax

    from shortcut import assembly, memory

    strategy = strategy or spec.resources.sharding
    devices = topology_devices(topology)
    n = len(devices)
    if spec.train.batch_size % n:
        raise PlanError(f"train.batch_size {spec.train.batch_size} is not divisible by the {n} devices of "
                        f"{topology.name}")
    capacity, capacity_source = devices_lib.capacity(topology)
    device = topology.device
    t0 = time.perf_counter()
    parts = assembly.build(spec)
    state = memory.abstract_state(spec, parts=parts)
    per_device = spec.train.batch_size // n
    log(f"plan {spec.name} on {topology.name} ({n} x {devices[0].device_kind}), {strategy}, batch "
        f"{spec.train.batch_size} ({per_device} per device): compiling the train step ...")
    # At most this many compiles: the spec's batch, the batch search, the other strategy, the sampling steps and
    # the VAE decoder; the bar's time left is an upper bound. (A failed compile ends the plan and its process.)
    most = 1 + (max_compiles if bisect else 0) + (1 if alternative and n > 1 else 0) \
        + (len({s.cfg_scale for s in spec.eval.settings()}) + 1 if sampling else 0)
    compiles = progress.bar(most, f"plan {spec.name}: compiles", unit="compile")
    count = _counting(compiles)
    compile_train = count(compile_train_step)
    main = compile_train(parts, state, devices, strategy, per_device)
    fits = result_fits(main, capacity)
    report: dict[str, Any] = {
        "spec": spec.name, "spec_hash": spec.hash(), "topology": topology.name, "sharding": strategy,
        "num_devices": n, "device_kind": devices[0].device_kind, "device": dataclasses.asdict(device),
        "estimate": ("CPU estimate: compiled by XLA's CPU backend for fake host devices; TPU or GPU memory and FLOPs "
                     "differ" if topology.platform == "cpu" else
                     f"compiled by libtpu for {topology.slice_name} ({n} devices) on a machine without one"),
        "jax": jax.__version__, "libtpu": _libtpu_version() if topology.platform == "tpu" else None,
        **record.git_provenance(),
        "num_params": main.get("state_bytes", {}).get("num_params") or _num_params(state),
        "device_memory": capacity, "device_memory_source": capacity_source, "mfu": mfu,
        "projections": "step and run times are projections: compiled FLOPs / (peak x MFU); the memory and FLOP "
                       "figures are the compiler's",
    }
    train = {"global_batch": spec.train.batch_size, "per_device_batch": per_device, "steps": spec.train.steps,
             "fits": fits, **{k: main[k] for k in ("oom", "peak", "compile_s") if k in main}}
    train.update(arguments=main["arguments"], flops_per_device=main["flops_per_device"],
                 flops_source=main["flops_source"],
                 flops_per_step=None if main["flops_per_device"] is None else main["flops_per_device"] * n)
    if not main["oom"]:
        train["memory"] = main["memory"]
    else:
        train.update(message=main["message"], compiler_capacity=main.get("compiler_capacity"))
    if bisect:
        log("  searching the largest per-device batch that fits ...")
        best, trail = largest_batch(lambda bb: compile_train(parts, state, devices, strategy, bb), per_device,
                                    {per_device: main}, capacity, max_compiles=max_compiles)
        train["max_per_device_batch"], train["batch_search"] = best, trail
        if train["flops_per_device"] is None and best:  # the spec's batch did not compile: scale a batch that did
            flops_best = next((x["flops_per_device"] for x in trail if x["per_device_batch"] == best), None)
            if flops_best:
                train["flops_per_device"] = flops_best * per_device / best
                train["flops_per_step"] = train["flops_per_device"] * n
                train["flops_source"] = (f"the compiled program at {best} per device, scaled linearly to "
                                         f"{per_device} (the spec's batch ran out of memory)")
    report["train"] = train
    if alternative and not fits and n > 1:  # would the other strategy fit?
        alt = "fsdp" if strategy == "dp" else "dp"
        log(f"  {strategy} does not fit: compiling {alt} ...")
        other = compile_train(parts, state, devices, alt, per_device)
        report["alternative"] = {"sharding": alt, "fits": result_fits(other, capacity), "peak": other["peak"],
                                 "oom": other["oom"], "flops_per_device": other["flops_per_device"]}
        if train["flops_per_device"] is None and other["flops_per_device"] and not other["oom"]:
            train["flops_per_device"] = other["flops_per_device"]  # the same step, sharded the other way
            train["flops_per_step"] = other["flops_per_device"] * n
            train["flops_source"] = f"the compiled {alt} program of the same step ({strategy} ran out of memory)"
        report["advice"] = (f"{strategy} does not fit ({gib(main['peak'])} per device); {alt} would "
                            f"({gib(other['peak'])}): --set resources.sharding={alt}"
                            if result_fits(other, capacity) else
                            f"neither {strategy} ({gib(main['peak'])}) nor {alt} ({gib(other['peak'])}) fits; "
                            "lower train.batch_size or use more devices")
    train.update(report_lib.step_time(train["flops_per_device"], device, mfu, spec.train.steps))
    if sampling:
        report["sampling"] = _sampling(spec, parts, state, devices, strategy, device, mfu, log, count)
    compiles.close()
    report["compile_s_total"] = time.perf_counter() - t0
    return report


def _counting(compiles: progress.Bar) -> Callable:
    """`count(fn)`: `fn`, advancing the compiles bar by one each time it returns."""
    def count(fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            compiles.update()
            return out
        return counted
    return count


def _libtpu_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return None


def _num_params(state) -> int:
    import jax

    return int(sum(math.prod(a.shape) for a in jax.tree.leaves(state.params)))


def _sampling(spec, parts, state, devices: list, strategy: str, device: Device, mfu: float, log,
              count: Callable) -> dict:
    n = len(devices)
    eval_batch = math.ceil(spec.eval.batch_size / n) * n
    log(f"  compiling one sampling step at the eval batch {eval_batch} ...")
    scales = sorted({s.cfg_scale for s in spec.eval.settings()})
    steps = {w: count(compile_sampling_step)(parts, state, devices, strategy, eval_batch, w) for w in scales}
    decode = count(compile_vae_decode)(spec, devices, eval_batch)
    batches = math.ceil(FID_SAMPLES / eval_batch)
    decode_s = report_lib.seconds(decode and decode["flops_per_device"], device, mfu)
    fid = {}
    for s in spec.eval.settings():
        one = steps[s.cfg_scale]
        evals = (parts.objective.network_evaluations(s.num_steps, s.cfg_scale)
                 / parts.objective.network_evaluations(1, s.cfg_scale))
        step_s = report_lib.seconds(one["flops_per_device"], device, mfu)
        sample_s = None if step_s is None else batches * evals * step_s
        fid[s.key] = {"num_steps": s.num_steps, "cfg_scale": s.cfg_scale, "network_steps": evals,
                      "sampling_s": sample_s, "vae_decode_s": None if decode_s is None else batches * decode_s,
                      "total_s": None if sample_s is None else sample_s + (batches * decode_s if decode_s else 0.0)}
    return {"eval_batch": eval_batch, "steps": {str(w): v for w, v in steps.items()}, "vae_decode": decode,
            "fid50k": fid, "note": "FID-50k time: sampling and VAE decode at the stated MFU; Inception features, "
                                   "statistics and host transfers are not included"}


def cli(spec, topology_text: str, argv: list[str], *, mfu: float = DEFAULT_MFU, bisect: bool = True,
        sampling: bool = True, out: str | None = None) -> int:
    """`run_experiment SPEC --plan TOPOLOGY`: plan, print, write; reruns itself in a fresh process when JAX
    already started with too few CPU devices for cpu:N."""
    topology = parse_topology(topology_text)
    if not prepare_jax(topology):
        import subprocess

        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(topology.num_devices))
        return subprocess.run([sys.executable, "-m", "orchestration.run_experiment", *argv], env=env).returncode
    report = plan(spec, topology, mfu=mfu, bisect=bisect, sampling=sampling,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    path = report_lib.write(report, Path(out) if out else None)
    print(report_lib.summary(report))
    print(f"written to {path}")
    return 0
