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

GPU: JAX compiles for CUDA without a GPU only through the jax-cuda12 plugin with an explicit target description
(see docs/planning.md); this planner does not offer a GPU target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from shortcut import record
from shortcut.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MFU = 0.4
FID_SAMPLES = 50_000


class PlanError(InputError, RuntimeError):
    """A plan cannot be made (unknown topology, libtpu missing, ...); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Device:
    """One JAX device of a kind: its peak dense bf16 FLOP/s and memory, with where the figures come from."""

    label: str
    peak_flops: float | None
    memory_bytes: float | None
    source: str
    kinds: tuple[str, ...] = ()  # substrings of JAX's `device_kind` that name this device (device_for_kind)


GiB = 2**30
_GPU = "vendor datasheet, dense (no sparsity); memory not listed: GPU topologies are not planned"
# Per JAX device (a TPU v3 core; a v4 / v5p chip, whose two cores JAX drives as one "megacore" device; a
# v5e / v6e chip; a GPU). The one table of device peaks: the planner's, and the accelerator benchmark's MFU.
# Order matters for device_for_kind: the first row naming a kind wins ("H100 PCIe" before "H100").
DEVICES: dict[str, Device] = {
    "tpu-v3": Device("TPU v3 core", 123e12 / 2, 16 * GiB,
                     "cloud.google.com/tpu/docs/v3: 123 TFLOP/s bf16 and 32 GiB HBM per chip of 2 cores", ("TPU v3",)),
    "tpu-v4": Device("TPU v4 chip (megacore)", 275e12, 32 * GiB,
                     "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM per chip", ("TPU v4",)),
    "tpu-v5e": Device("TPU v5e chip", 197e12, 16 * GiB,
                      "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM per chip",
                      ("TPU v5 lite", "TPU v5e")),
    "tpu-v5p": Device("TPU v5p chip (megacore)", 459e12, 95 * GiB,
                      "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM per chip",
                      ("TPU v5p", "TPU v5")),
    "tpu-v6e": Device("TPU v6e chip", 918e12, 32 * GiB,
                      "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM per chip", ("TPU v6",)),
    "gpu-h100-pcie": Device("NVIDIA H100 PCIe", 756e12, None, _GPU, ("H100 PCIe",)),
    "gpu-h100": Device("NVIDIA H100 SXM", 989e12, None, _GPU, ("H100",)),
    "gpu-h200": Device("NVIDIA H200", 989e12, None, _GPU, ("H200",)),
    "gpu-h800": Device("NVIDIA H800", 989e12, None, _GPU, ("H800",)),
    "gpu-b200": Device("NVIDIA B200", 2250e12, None, _GPU, ("B200",)),
    "gpu-a100": Device("NVIDIA A100", 312e12, None, _GPU, ("A100",)),
    "gpu-l40s": Device("NVIDIA L40S", 362e12, None, _GPU, ("L40S",)),
    "gpu-l4": Device("NVIDIA L4", 121e12, None, _GPU, ("L4",)),
    "gpu-a10": Device("NVIDIA A10", 125e12, None, _GPU, ("A10",)),
    "cpu": Device("host CPU device", None, None,
                  "no peak: a CPU estimate; memory is this host's MemAvailable shared by the fake devices"),
}


def device_for_kind(kind: str) -> Device | None:
    """The DEVICES row of a JAX `device_kind` (e.g. "NVIDIA H100 80GB HBM3", "TPU v4"), None when unknown."""
    return next((d for d in DEVICES.values()
                 if any(re.search(rf"\b{re.escape(k)}\b", kind, re.IGNORECASE) for k in d.kinds)), None)

# slice name -> (libtpu topology name, chip config, device kind); single-host slices (one process compiles).
TPU_SLICES: dict[str, tuple[str, str, str]] = {
    "v3-8": ("v3:2x2", "default", "tpu-v3"),
    "v4-8": ("v4:2x2x1", "megacore", "tpu-v4"),
    "v5e-1": ("v5e:1x1", "default", "tpu-v5e"),
    "v5e-4": ("v5e:2x2", "default", "tpu-v5e"),
    "v5e-8": ("v5e:2x4", "default", "tpu-v5e"),
    "v5p-8": ("v5:2x2x1", "megacore", "tpu-v5p"),
    "v6e-4": ("v6e:2x2", "default", "tpu-v6e"),
    "v6e-8": ("v6e:2x4", "default", "tpu-v6e"),
}

INSTALL_LIBTPU = ("libtpu is not installed: `pip install -e '.[plan]'` (or `pip install \"jax[tpu]==<your jax version>\"`) "
                  "to compile for TPU topologies; `--plan cpu:N` works without it")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. tpu:v3-8
    platform: str  # tpu | cpu
    num_devices: int
    kind: str  # key of DEVICES
    slice_name: str = ""

    @property
    def device(self) -> Device:
        return DEVICES[self.kind]

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-")


def parse_topology(text: str) -> Topology:
    platform, _, rest = text.partition(":")
    if platform == "cpu":
        if not rest.isdigit() or int(rest) < 1:
            raise PlanError(f"--plan {text}: cpu:N needs a device count N >= 1, e.g. cpu:8")
        return Topology(text, "cpu", int(rest), "cpu")
    if platform == "tpu":
        if rest not in TPU_SLICES:
            raise PlanError(f"--plan {text}: unknown TPU slice {rest!r}; known: "
                            f"{', '.join('tpu:' + s for s in TPU_SLICES)}")
        topo, chip, kind = TPU_SLICES[rest]
        cores = int(rest.split("-")[1])
        n = cores // 2 if chip == "megacore" or kind == "tpu-v5p" else cores
        return Topology(text, "tpu", n, kind, rest)
    if platform in ("gpu", "cuda"):
        raise PlanError(f"--plan {text}: no GPU targets; JAX compiles for CUDA without a GPU only with the "
                        "jax-cuda12 plugin and a target description (docs/planning.md). Use tpu:SLICE or cpu:N")
    raise PlanError(f"--plan {text}: expected tpu:SLICE (e.g. tpu:v3-8) or cpu:N (e.g. cpu:8)")


def prepare_jax(topology: Topology) -> bool:
    """Before JAX's backends start: the CPU backend by default (a TPU plan only compiles for the TPU; the
    local libtpu must not try to drive a TPU), with N devices for cpu:N. False when JAX already started
    with fewer devices than needed (the caller reruns in a fresh process)."""
    import jax
    from jax._src import xla_bridge

    want = topology.num_devices if topology.platform == "cpu" else 1
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        if topology.platform == "cpu":
            jax.config.update("jax_num_cpu_devices", want)
        return True
    return topology.platform != "cpu" or len(jax.devices("cpu")) >= want


def topology_devices(topology: Topology) -> list:
    import jax

    if topology.platform == "cpu":
        return jax.devices("cpu")[:topology.num_devices]
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError(INSTALL_LIBTPU) from None
    from jax.experimental import topologies

    topo, chip, _ = TPU_SLICES[topology.slice_name]
    with _quiet_stderr():  # libtpu reports at length that this host has no TPU; it needs none to compile
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, chip_config_name=chip)
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"--plan {topology.name}: libtpu could not describe {topo}: {_first_line(e)}") from None
    devices = list(desc.devices)
    if len(devices) != topology.num_devices:
        raise PlanError(f"--plan {topology.name}: libtpu gave {len(devices)} devices for {topo}, "
                        f"expected {topology.num_devices}")
    return devices


class _quiet_stderr:
    """Redirect file descriptor 2 (native libraries' logging) to /dev/null for a block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ----------------------------------------------------------------------------- compiling


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


_USED = re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", re.I)
_TEMPS = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])?\) exceeds available HBM \(([\d.]+)([KMGT])?\)")


def _oom_bytes(e: BaseException) -> tuple[float | None, float | None, str]:
    """(bytes, capacity, what the bytes are) from libtpu's out-of-memory message: "Used 20.5G of 15.48G hbm"
    (everything) or "the total memory required for HLO temporaries (15.50G) exceeds available HBM (15.48G)"."""
    scale = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for pattern, what in ((_USED, "total"), (_TEMPS, "temporaries")):
        m = pattern.search(str(e))
        if m:
            return float(m.group(1)) * scale[m.group(2)], float(m.group(3)) * scale[m.group(4)], what
    return None, None, ""


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    # Donated state: outputs written over their arguments' buffers (alias) are not held twice.
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


@dataclasses.dataclass
class Built:
    """The spec's real pieces for planning: everything shapes-only."""

    spec: Any
    model: Any
    apply_fn: Callable
    optimizer: Any
    objective: Any
    state: Any  # abstract TrainState


def build(spec) -> Built:
    """The run's own parts (shortcut/assembly.py) with its abstract state (shortcut/memory.py)."""
    from shortcut import assembly, memory

    parts = assembly.build(spec)
    state = memory.abstract_state(spec, parts=parts)
    return Built(spec, parts.model, parts.apply_fn, parts.optimizer, parts.objective, state)


def compile_train_step(b: Built, devices: list, strategy: str, per_device_batch: int) -> dict:
    """Compile the real train step for `devices` at this per-device batch: memory, FLOPs and seconds, or
    `oom` with libtpu's figures when the program cannot fit."""
    from shortcut import memory
    from shortcut.sharding import Parallel
    from shortcut.train import make_train_step

    global_batch = per_device_batch * len(devices)
    spec = b.spec.model_copy(update={"train": b.spec.train.model_copy(update={"batch_size": global_batch})})
    parallel = Parallel.create(global_batch, strategy, devices=devices)
    step = make_train_step(b.apply_fn, b.objective, b.optimizer, spec, parallel, b.state)
    batch = memory.abstract_batch(spec, global_batch, b.objective)
    parts = memory.state_bytes(spec, parallel, strategy, state=b.state)
    batch_bytes = sum(math.prod(parallel.data.shard_shape(a.shape)) * a.dtype.itemsize for a in batch.values())
    arguments = {"params": parts["params"], "ema": parts["ema"], "opt_state": parts["opt_state"], "aux": parts["aux"],
                 "other": parts["other"], "batch": batch_bytes}
    t0 = time.perf_counter()
    lowered = step.lower(b.state, batch)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        need, cap, what = _oom_bytes(e)
        if what == "temporaries":  # the message counts temporaries only: add the arguments
            need += sum(arguments.values())
        return {"per_device_batch": per_device_batch, "global_batch": global_batch, "fits": False, "oom": True,
                "peak": need, "compiler_capacity": cap, "compile_s": time.perf_counter() - t0,
                "message": _first_line(e), "arguments": arguments, "flops_per_device": _lowered_flops(lowered),
                "flops_source": "the lowered program before XLA's optimisations (the compile ran out of memory)"}
    out = {"per_device_batch": per_device_batch, "global_batch": global_batch, "oom": False,
           "compile_s": time.perf_counter() - t0, "memory": _memory(compiled), "flops_per_device": _flops(compiled),
           "flops_source": "XLA cost analysis of the compiled per-device program"}
    out["peak"] = out["memory"]["peak"]
    out["state_bytes"] = parts
    out["arguments"] = dict(arguments, xla_total=out["memory"]["argument"])
    return out


def _lowered_flops(lowered) -> float | None:
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def compile_sampling_step(b: Built, devices: list, strategy: str, eval_batch: int, cfg_scale: float) -> dict:
    """One sampling step (the objective's own sampler with N = 1) at the evaluation batch, parameters placed as
    the trained state's, noise and labels split over the devices."""
    import jax
    import numpy as np

    from shortcut.sharding import Parallel

    parallel = Parallel.create(eval_batch, strategy, devices=devices)
    shapes = b.state.params
    noise = jax.ShapeDtypeStruct((eval_batch, *b.spec.input_shape), np.float32)
    labels = jax.ShapeDtypeStruct((eval_batch,), np.int32)
    fn = jax.jit(lambda p, x, y: b.objective.sample(b.apply_fn, p, x, y, 1, cfg_scale=cfg_scale),
                 in_shardings=(parallel.state_shardings(shapes), parallel.data, parallel.data),
                 out_shardings=parallel.data)
    t0 = time.perf_counter()
    compiled = fn.lower(shapes, noise, labels).compile()
    return {"eval_batch": eval_batch, "cfg_scale": cfg_scale, "flops_per_device": _flops(compiled),
            "memory": _memory(compiled), "compile_s": time.perf_counter() - t0}


def compile_vae_decode(spec, devices: list, eval_batch: int) -> dict | None:
    """sd-vae-ft-mse decode of one evaluation batch of latents (a latent spec's samples become images)."""
    if spec.data.latent is None:
        return None
    import jax
    import numpy as np

    from shortcut.sharding import Parallel
    from shortcut.vae.model import SD_VAE_FT_MSE, AutoencoderKL, param_shapes

    parallel = Parallel.create(eval_batch, "dp", devices=devices)
    module = AutoencoderKL(SD_VAE_FT_MSE)
    params = param_shapes(SD_VAE_FT_MSE)
    z = jax.ShapeDtypeStruct((eval_batch, *spec.input_shape), np.float32)
    fn = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"),
                 in_shardings=(parallel.replicated, parallel.data), out_shardings=parallel.data)
    t0 = time.perf_counter()
    compiled = fn.lower(params, z).compile()
    return {"eval_batch": eval_batch, "flops_per_device": _flops(compiled), "memory": _memory(compiled),
            "compile_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the plan


def _fits(result: dict, capacity: float | None) -> bool:
    if result["oom"]:
        return False
    return capacity is None or result["peak"] <= capacity


def largest_batch(try_batch: Callable[[int], dict], start: int, known: dict, capacity: float | None,
                  limit: int = 4096, max_compiles: int = 8) -> tuple[int | None, list[dict]]:
    """The largest per-device batch that fits: doubling (or halving) from `start`, then bisecting, on
    compiles; at most `max_compiles` beyond those in `known` (batch -> result). None when even 1 does not fit."""
    tried: dict[int, dict] = dict(known)
    budget = [max_compiles]

    def fits(b: int) -> bool | None:
        if b not in tried:
            if budget[0] <= 0:
                return None
            budget[0] -= 1
            tried[b] = try_batch(b)
        return _fits(tried[b], capacity)

    lo, hi = None, None  # largest known fitting, smallest known failing
    b = start
    if fits(b):
        lo = b
        while hi is None and b < limit:
            b = min(limit, b * 2)
            ok = fits(b)
            if ok is None:
                break
            lo, hi = (b, hi) if ok else (lo, b)
    else:
        hi = b
        while lo is None and b > 1:
            b = max(1, b // 2)
            ok = fits(b)
            if ok is None:
                break
            lo, hi = (b, hi) if ok else (lo, b)
    while lo is not None and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        ok = fits(mid)
        if ok is None:
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
    trail = [{"per_device_batch": k, "fits": _fits(v, capacity), "peak": v.get("peak"),
              "flops_per_device": v.get("flops_per_device")} for k, v in sorted(tried.items())]
    return lo, trail


def _capacity(topology: Topology) -> tuple[float | None, str]:
    if topology.platform == "cpu":
        from shortcut.memory import host_available_bytes

        host = host_available_bytes()
        return (None, "unknown") if host is None else (host / topology.num_devices,
                                                       f"host MemAvailable / {topology.num_devices}")
    return topology.device.memory_bytes, topology.device.source


def _seconds(flops_per_device: float | None, device: Device, mfu: float) -> float | None:
    if not flops_per_device or not device.peak_flops:
        return None
    return flops_per_device / (device.peak_flops * mfu)


def plan(spec, topology: Topology, *, strategy: str | None = None, mfu: float = DEFAULT_MFU, bisect: bool = True,
         sampling: bool = True, alternative: bool = True, max_compiles: int = 8,
         log: Callable[[str], None] = print) -> dict:
    """The plan of `spec` on `topology` (see the module docstring); JAX must have been prepared (prepare_jax)."""
    import jax

    strategy = strategy or spec.resources.sharding
    devices = topology_devices(topology)
    n = len(devices)
    if spec.train.batch_size % n:
        raise PlanError(f"train.batch_size {spec.train.batch_size} is not divisible by the {n} devices of "
                        f"{topology.name}")
    capacity, capacity_source = _capacity(topology)
    device = topology.device
    t0 = time.perf_counter()
    b = build(spec)
    per_device = spec.train.batch_size // n
    log(f"plan {spec.name} on {topology.name} ({n} x {devices[0].device_kind}), {strategy}, batch "
        f"{spec.train.batch_size} ({per_device} per device): compiling the train step ...")
    main = compile_train_step(b, devices, strategy, per_device)
    fits = _fits(main, capacity)
    report: dict[str, Any] = {
        "spec": spec.name, "spec_hash": spec.hash(), "topology": topology.name, "sharding": strategy,
        "num_devices": n, "device_kind": devices[0].device_kind, "device": dataclasses.asdict(device),
        "estimate": ("CPU estimate: compiled by XLA's CPU backend for fake host devices; TPU or GPU memory and FLOPs "
                     "differ" if topology.platform == "cpu" else
                     f"compiled by libtpu for {topology.slice_name} ({n} devices) on a machine without one"),
        "jax": jax.__version__, "libtpu": _libtpu_version() if topology.platform == "tpu" else None,
        **record.git_provenance(),
        "num_params": main.get("state_bytes", {}).get("num_params") or _num_params(b.state),
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
    step_s = _seconds(main.get("flops_per_device"), device, mfu)
    train["step_time_s"] = step_s
    train["run_days"] = None if step_s is None else step_s * spec.train.steps / 86400
    if bisect:
        log("  searching the largest per-device batch that fits ...")
        best, trail = largest_batch(lambda bb: compile_train_step(b, devices, strategy, bb), per_device,
                                    {per_device: main}, capacity, max_compiles=max_compiles)
        train["max_per_device_batch"], train["batch_search"] = best, trail
        if train["flops_per_device"] is None and best:  # the spec's batch did not compile: scale a batch that did
            flops_best = next((x["flops_per_device"] for x in trail if x["per_device_batch"] == best), None)
            if flops_best:
                train["flops_per_device"] = flops_best * per_device / best
                train["flops_per_step"] = train["flops_per_device"] * n
                train["flops_source"] = (f"the compiled program at {best} per device, scaled linearly to "
                                         f"{per_device} (the spec's batch ran out of memory)")
                step_s = _seconds(train["flops_per_device"], device, mfu)
                train["step_time_s"] = step_s
                train["run_days"] = None if step_s is None else step_s * spec.train.steps / 86400
    report["train"] = train
    if alternative and not fits and n > 1:  # would the other strategy fit?
        alt = "fsdp" if strategy == "dp" else "dp"
        log(f"  {strategy} does not fit: compiling {alt} ...")
        other = compile_train_step(b, devices, alt, per_device)
        report["alternative"] = {"sharding": alt, "fits": _fits(other, capacity), "peak": other["peak"],
                                 "oom": other["oom"], "flops_per_device": other["flops_per_device"]}
        if train["flops_per_device"] is None and other["flops_per_device"] and not other["oom"]:
            train["flops_per_device"] = other["flops_per_device"]  # the same step, sharded the other way
            train["flops_per_step"] = other["flops_per_device"] * n
            train["flops_source"] = f"the compiled {alt} program of the same step ({strategy} ran out of memory)"
            step_s = _seconds(train["flops_per_device"], device, mfu)
            train["step_time_s"] = step_s
            train["run_days"] = None if step_s is None else step_s * spec.train.steps / 86400
        report["advice"] = (f"{strategy} does not fit ({_gib(main['peak'])} per device); {alt} would "
                            f"({_gib(other['peak'])}): --set resources.sharding={alt}"
                            if _fits(other, capacity) else
                            f"neither {strategy} ({_gib(main['peak'])}) nor {alt} ({_gib(other['peak'])}) fits; "
                            "lower train.batch_size or use more devices")
    if sampling:
        report["sampling"] = _sampling(spec, b, devices, strategy, device, mfu, log)
    report["compile_s_total"] = time.perf_counter() - t0
    return report


def _num_params(state) -> int:
    import jax

    return int(sum(math.prod(a.shape) for a in jax.tree.leaves(state.params)))


def _sampling(spec, b: Built, devices: list, strategy: str, device: Device, mfu: float, log) -> dict:
    n = len(devices)
    eval_batch = math.ceil(spec.eval.batch_size / n) * n
    log(f"  compiling one sampling step at the eval batch {eval_batch} ...")
    scales = sorted({s.cfg_scale for s in spec.eval.settings()})
    steps = {w: compile_sampling_step(b, devices, strategy, eval_batch, w) for w in scales}
    decode = compile_vae_decode(spec, devices, eval_batch)
    batches = math.ceil(FID_SAMPLES / eval_batch)
    decode_s = _seconds(decode and decode["flops_per_device"], device, mfu)
    fid = {}
    for s in spec.eval.settings():
        one = steps[s.cfg_scale]
        evals = b.objective.network_evaluations(s.num_steps, s.cfg_scale) / b.objective.network_evaluations(1, s.cfg_scale)
        step_s = _seconds(one["flops_per_device"], device, mfu)
        sample_s = None if step_s is None else batches * evals * step_s
        fid[s.key] = {"num_steps": s.num_steps, "cfg_scale": s.cfg_scale, "network_steps": evals,
                      "sampling_s": sample_s, "vae_decode_s": None if decode_s is None else batches * decode_s,
                      "total_s": None if sample_s is None else sample_s + (batches * decode_s if decode_s else 0.0)}
    return {"eval_batch": eval_batch, "steps": {str(w): v for w, v in steps.items()}, "vae_decode": decode,
            "fid50k": fid, "note": "FID-50k time: sampling and VAE decode at the stated MFU; Inception features, "
                                   "statistics and host transfers are not included"}


def _libtpu_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return None


def _gib(n: float | None) -> str:
    from shortcut.memory import gib

    return "?" if n is None else gib(n)


def _tflop(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3g} GFLOP"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.3g} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def summary(r: dict) -> str:
    """The report as text."""
    t = r["train"]
    lines = [f"# {r['spec']} on {r['topology']} ({r['num_devices']} x {r['device_kind']}), {r['sharding']}: "
             f"{r['num_params']:,} parameters",
             f"  {r['estimate']}; jax {r['jax']}" + (f", libtpu {r['libtpu']}" if r.get("libtpu") else "")]
    a = t["arguments"]
    lines.append(f"train step, batch {t['global_batch']} ({t['per_device_batch']} per device), per device:")
    lines.append(f"  arguments: params {_gib(a['params'])}, EMA {_gib(a['ema'])}, optimizer {_gib(a['opt_state'])}"
                 + (f", teacher/aux {_gib(a['aux'])}" if a.get("aux") else "") + f", batch {_gib(a['batch'])}"
                 + (f" (XLA: {_gib(a['xla_total'])} in all)" if a.get("xla_total") is not None else ""))
    if not t["oom"]:
        m = t["memory"]
        lines.append(f"  temporaries {_gib(m['temp'])}, outputs {_gib(m['output'])} ({_gib(m['alias'])} of them "
                     f"written over donated arguments)")
    cap = r["device_memory"]
    lines.append(f"  total {_gib(t['peak'])} of {_gib(cap)} per device ({r['device']['label']}): "
                 + ("FITS" if t["fits"] else "DOES NOT FIT") + (f" [{t['message']}]" if t.get("message") else ""))
    if "max_per_device_batch" in t:
        best = t["max_per_device_batch"]
        lines.append(f"  largest per-device batch that fits: {best if best is not None else 'none'} "
                     f"(global {best * r['num_devices'] if best else '-'}; searched "
                     f"{', '.join(str(x['per_device_batch']) for x in t['batch_search'])})")
    lines.append(f"  FLOPs per step: {_tflop(t.get('flops_per_step'))} ({_tflop(t.get('flops_per_device'))} per device"
                 + (f"; from {t['flops_source']}" if t["oom"] and t.get("flops_per_step") else "") + ")")
    peak = r["device"]["peak_flops"]
    lines.append(f"  at {r['mfu']:.0%} MFU of {peak / 1e12:.1f} TFLOP/s per device: "
                 f"{_duration(t['step_time_s'])} per step, {_duration(t['run_days'] * 86400 if t['run_days'] else None)} "
                 f"for {t['steps']:,} steps [projection]" if peak else
                 "  no step-time projection: no peak FLOP/s for this device")
    if r.get("advice"):
        lines.append(f"  {r['advice']}")
    if peak:
        lines.append(f"  device figures: {r['device']['source']}")
    s = r.get("sampling")
    if s and not peak:
        lines.append(f"sampling at the eval batch {s['eval_batch']}: one step "
                     + ", ".join(f"at w={w} {_tflop(st['flops_per_device'])} per device" for w, st in s["steps"].items())
                     + "; no FID-50k time projection without a peak FLOP/s")
        s = None
    if s:
        lines.append(f"sampling at the eval batch {s['eval_batch']}:")
        for w, st in s["steps"].items():
            lines.append(f"  one step at w={w}: {_tflop(st['flops_per_device'])} per device, "
                         f"{_gib(st['memory']['peak'])} per device")
        if s["vae_decode"]:
            lines.append(f"  VAE decode of one batch: {_tflop(s['vae_decode']['flops_per_device'])} per device")
        for key, f in s["fid50k"].items():
            lines.append(f"  FID-50k {key}: {_duration(f['total_s'])} (sampling {_duration(f['sampling_s'])}, VAE "
                         f"decode {_duration(f['vae_decode_s']) if f['vae_decode_s'] is not None else '-'}) [projection]")
    return "\n".join(lines)


def default_out(r: dict) -> Path:
    return REPO_ROOT / "results" / "plans" / f"{r['spec']}_{r['topology'].replace(':', '-')}_{r['sharding']}.json"


def write(r: dict, path: Path | None = None) -> Path:
    path = Path(path) if path else default_out(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(r, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


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
    path = write(report, Path(out) if out else None)
    print(summary(report))
    print(f"written to {path}")
    return 0
