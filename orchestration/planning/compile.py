"""Compiling for a plan: the spec's real train step, one sampling step and the VAE decode, lowered with abstract
inputs for a topology's devices; XLA's `memory_analysis()` gives the bytes per device and its cost analysis the
FLOPs (shortcut/compute.py `xla_flops`); `largest_batch` searches the per-device batch that fits."""

from __future__ import annotations

import math
import re
import time
from typing import Callable

from orchestration.planning.devices import first_line
from shortcut.compute import xla_flops


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


def compile_train_step(parts, state, devices: list, strategy: str, per_device_batch: int) -> dict:
    """Compile the real train step of a spec's `parts` (shortcut/assembly.py) and abstract `state`
    (shortcut/memory.py) for `devices` at this per-device batch: memory, FLOPs and seconds, or `oom` with
    libtpu's figures when the program cannot fit."""
    from shortcut import memory
    from shortcut.sharding import Parallel
    from shortcut.train import make_train_step

    global_batch = per_device_batch * len(devices)
    spec = parts.spec.model_copy(update={"train": parts.spec.train.model_copy(update={"batch_size": global_batch})})
    parallel = Parallel.create(global_batch, strategy, devices=devices)
    step = make_train_step(parts.apply_fn, parts.objective, parts.optimizer, spec, parallel, state)
    batch = memory.abstract_batch(spec, global_batch, parts.objective)
    held = memory.state_bytes(spec, parallel, strategy, state=state)
    batch_bytes = sum(math.prod(parallel.data.shard_shape(a.shape)) * a.dtype.itemsize for a in batch.values())
    arguments = {"params": held["params"], "ema": held["ema"], "opt_state": held["opt_state"], "aux": held["aux"],
                 "other": held["other"], "batch": batch_bytes}
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
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
                "message": first_line(e), "arguments": arguments, "flops_per_device": xla_flops(lowered),
                "flops_source": "the lowered program before XLA's optimisations (the compile ran out of memory)"}
    out = {"per_device_batch": per_device_batch, "global_batch": global_batch, "oom": False,
           "compile_s": time.perf_counter() - t0, "memory": _memory(compiled), "flops_per_device": xla_flops(compiled),
           "flops_source": "XLA cost analysis of the compiled per-device program"}
    out["peak"] = out["memory"]["peak"]
    out["state_bytes"] = held
    out["arguments"] = dict(arguments, xla_total=out["memory"]["argument"])
    return out


def compile_sampling_step(parts, state, devices: list, strategy: str, eval_batch: int, cfg_scale: float) -> dict:
    """One sampling step (the objective's own sampler with N = 1) at the evaluation batch, parameters placed as
    the trained state's, noise and labels split over the devices."""
    import jax
    import numpy as np

    from shortcut.sharding import Parallel

    parallel = Parallel.create(eval_batch, strategy, devices=devices)
    shapes = state.params
    noise = jax.ShapeDtypeStruct((eval_batch, *parts.spec.input_shape), np.float32)
    labels = jax.ShapeDtypeStruct((eval_batch,), np.int32)
    fn = jax.jit(lambda p, x, y: parts.objective.sample(parts.apply_fn, p, x, y, 1, cfg_scale=cfg_scale),
                 in_shardings=(parallel.state_shardings(shapes), parallel.data, parallel.data),
                 out_shardings=parallel.data)
    t0 = time.perf_counter()
    compiled = fn.lower(shapes, noise, labels).compile()
    return {"eval_batch": eval_batch, "cfg_scale": cfg_scale, "flops_per_device": xla_flops(compiled),
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
    return {"eval_batch": eval_batch, "flops_per_device": xla_flops(compiled), "memory": _memory(compiled),
            "compile_s": time.perf_counter() - t0}


def result_fits(result: dict, capacity: float | None) -> bool:
    """Whether a compile result fits `capacity` bytes per device (None: whatever compiled fits)."""
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
        return result_fits(tried[b], capacity)

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
    trail = [{"per_device_batch": k, "fits": result_fits(v, capacity), "peak": v.get("peak"),
              "flops_per_device": v.get("flops_per_device")} for k, v in sorted(tried.items())]
    return lo, trail


