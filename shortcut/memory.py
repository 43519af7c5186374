"""The training state's memory, from shapes alone: the one estimator a run's start-up check and the planner share.

`abstract_state(spec)` is `jax.eval_shape` of exactly what a run builds (shortcut/train.py `init_state`: model
parameters, their EMA copy, the optimiser state, and the objective's `aux`, e.g. a distillation teacher's
parameters), so nothing is allocated. `state_bytes(spec, devices, strategy)` splits it per device with the
placement rule of shortcut/sharding.py (`Parallel.array_sharding`: replicated under dp; under fsdp each array
split along its largest dimension the device count divides, arrays under `MIN_SHARD_BYTES` replicated).

`check_fits(spec, available_bytes, ...)` raises `MemoryPlanError` with one line when the state and one batch
alone exceed a device's memory; `check_run_fits(spec, parts=)` does it against this machine's devices before a run
allocates anything (shortcut/run.py). The check is a lower bound: activations and XLA's temporaries come on
top (the planner, `run_experiment SPEC --plan TOPOLOGY`, compiles the real step to measure those), so a run it
lets through may still run out of memory, but one it stops could never have fitted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from shortcut.errors import InputError
from shortcut.sharding import Parallel
from shortcut.spec import Spec


class MemoryPlanError(InputError, RuntimeError):
    """A spec cannot fit the devices it would run on; the one-line message gives both figures and the remedy."""


def abstract_teacher_params(parts) -> Any:
    """Shapes of the teacher's parameters (what `init_state(..., teacher_params=)` receives) of a run whose
    parts (assembly.Parts) are `parts`, None without a teacher."""
    if parts.teacher is None:
        return None
    from shortcut.model import example_inputs

    tspec, model = parts.teacher.spec, parts.teacher.model
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_inputs(model, tspec.input_shape))["params"])


def abstract_state(spec: Spec, *, parts=None):
    """The run's TrainState as `jax.ShapeDtypeStruct` leaves: params, EMA, optimiser state, step, rng and aux
    (the objective's own state; a teacher's parameters for the distillation methods). `parts`: the spec's
    assembly.Parts when the caller has them already."""
    from shortcut import assembly
    from shortcut.train import init_state

    parts = parts if parts is not None else assembly.build(spec)
    teacher = abstract_teacher_params(parts)
    return jax.eval_shape(lambda tp: init_state(spec, parts.model, parts.optimizer, parts.objective,
                                                teacher_params=tp), teacher)


def abstract_batch(spec: Spec, batch_size: int | None = None, objective=None) -> dict:
    """One global training batch as the train step receives it (the objective's `batch_inputs`)."""
    b = spec.train.batch_size if batch_size is None else batch_size
    image = jax.ShapeDtypeStruct((b, *spec.input_shape), np.float32)
    label = jax.ShapeDtypeStruct((b,), np.int32)
    return {"image": image, "label": label} if objective is None else objective.batch_inputs(image, label)


class _CountedDevices:
    """`Parallel`'s placement rule for a device count alone (an abstract mesh: no devices needed)."""

    def __init__(self, num_devices: int, strategy: str):
        self.strategy, self.num_devices = strategy, num_devices
        self.mesh = AbstractMesh((num_devices,), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    array_sharding = Parallel.array_sharding


def _placement(devices: Parallel | int, strategy: str | None):
    if isinstance(devices, Parallel):
        return devices
    return _CountedDevices(int(devices), strategy or "dp")


def _tree_bytes(tree: Any, placement) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = placement.array_sharding(leaf.shape, leaf.dtype).shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def state_bytes(spec: Spec, devices: Parallel | int = 1, strategy: str | None = None, *, state=None,
                batch_size: int | None = None) -> dict:
    """Bytes per device of the training state, by part: params, ema (every EMA decay's), opt_state, aux (a
    teacher's parameters where the method keeps one), other (step, rng), state (their sum), batch (one global
    batch split over the devices) and total (state + batch). `devices` is a `Parallel` or a device count (then
    `strategy`, default the spec's `resources.sharding`); `state` an abstract state to reuse."""
    strategy = strategy or spec.resources.sharding
    placement = _placement(devices, strategy)
    state = abstract_state(spec) if state is None else state
    parts = {"params": _tree_bytes(state.params, placement),
             "ema": _tree_bytes((state.ema_params, state.more_ema), placement),
             "opt_state": _tree_bytes(state.opt_state, placement), "aux": _tree_bytes(state.aux, placement),
             "other": _tree_bytes((state.step, state.rng), placement)}
    parts["state"] = sum(parts.values())
    n = placement.num_devices
    b = spec.train.batch_size if batch_size is None else batch_size
    per_example = math.prod(spec.input_shape) * 4 + 4  # float32 image/latent + int32 label
    parts["batch"] = math.ceil(b / n) * per_example
    parts["total"] = parts["state"] + parts["batch"]
    parts["num_params"] = int(sum(math.prod(a.shape) for a in jax.tree.leaves(state.params)))
    parts["num_devices"], parts["strategy"] = n, placement.strategy
    return parts


def gib(n: float) -> str:
    """Bytes as a short human figure (GiB, or MiB / KiB when small)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def check_fits(spec: Spec, available_bytes: float, *, devices: Parallel | int = 1, strategy: str | None = None,
               where: str = "each device", state=None) -> dict:
    """The per-device estimate (`state_bytes`); raises MemoryPlanError when it exceeds `available_bytes`."""
    strategy = strategy or spec.resources.sharding
    state = abstract_state(spec) if state is None else state
    need = state_bytes(spec, devices, strategy, state=state)
    if need["total"] <= available_bytes:
        return need
    n = need["num_devices"]
    parts = ", ".join(f"{k} {gib(need[k])}" for k in ("params", "ema", "opt_state", "aux") if need[k])
    remedy = []
    if strategy == "dp" and n > 1:
        fsdp = state_bytes(spec, n, "fsdp", state=state)
        if fsdp["total"] <= available_bytes:
            remedy.append(f"--set resources.sharding=fsdp ({gib(fsdp['total'])} per device over {n} devices)")
        else:
            remedy.append(f"--set resources.sharding=fsdp still needs {gib(fsdp['total'])} per device")
    elif strategy == "dp":
        remedy.append("more devices with --set resources.sharding=fsdp")
    if need["batch"] > need["state"]:
        remedy.append("a smaller train.batch_size")
    remedy.append(f"a smaller model (model.size / model.hidden_size; this one has {need['num_params']:,} "
                  "parameters)")
    raise MemoryPlanError(
        f"{spec.name} does not fit: the training state and one batch alone need {gib(need['total'])} per device "
        f"({parts}; {strategy} over {n} device{'s' if n > 1 else ''}), {where} has {gib(available_bytes)}; "
        f"try {' or '.join(remedy)}")


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_available_bytes(devices=None) -> tuple[float | None, str]:
    """(bytes one device can hold, what the figure is): the smallest `memory_stats()['bytes_limit']` of the
    local devices, or on a CPU the host's MemAvailable shared by its devices (None when neither is known)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - some backends do not implement it
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if limits and len(limits) == len(devices):
        return float(min(limits)), f"each {devices[0].device_kind} device"
    host = host_available_bytes()
    if host is None:
        return None, ""
    return host / max(1, len(devices)), ("this host" if len(devices) == 1 else
                                         f"each of this host's {len(devices)} devices (sharing {gib(host)})")


def check_run_fits(spec: Spec, *, parts=None) -> dict | None:
    """Before a run allocates: raise MemoryPlanError when its state cannot fit this machine's devices
    (`parts`: the run's assembly.Parts). SHORTCUT_SKIP_MEMORY_CHECK=1 skips the check."""
    if os.environ.get("SHORTCUT_SKIP_MEMORY_CHECK") == "1":
        return None
    available, where = device_available_bytes()
    if available is None:
        return None
    n = jax.device_count()
    return check_fits(spec, available, devices=n, where=where, state=abstract_state(spec, parts=parts))
