"""Training compute, counted in network FLOPs from XLA's cost analysis of the compiled programs.

A run's record carries `compute`: the FLOPs of one compiled train step (forward and backward, and every
bootstrap, teacher or pair-generating forward inside it) times the steps trained, plus, for a student, its
teacher's whole compute, and what its method spent on its training data first (reflow: the teacher's
sampling of its stored pairs). Equal steps are not equal
budgets: this is what makes two rows of a table comparable.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = "XLA cost analysis of the compiled program"


def xla_flops(stage) -> float | None:
    """FLOPs of a lowered or compiled program (jax's `Lowered` / `Compiled`) from XLA's cost analysis; None
    when the backend gives none."""
    try:
        cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis: compute is then unknown, not wrong
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def program_flops(jitted, *args, **kwargs) -> float | None:
    """FLOPs of one call of a jit-compiled function with these arguments (lowered and compiled, not run;
    JAX reuses the compilation for the call). None when the backend gives no cost analysis."""
    try:
        compiled = jitted.lower(*args, **kwargs).compile()
    except Exception:  # noqa: BLE001 - a backend that cannot compile it here: compute is unknown, not wrong
        return None
    return xla_flops(compiled)


def forward_flops_per_sample(apply_fn, params, input_shape: tuple[int, ...], batch_size: int = 64) -> float | None:
    """FLOPs of one network evaluation per sample, from a compiled forward at `batch_size`."""
    x = jnp.zeros((batch_size, *input_shape), jnp.float32)
    t = jnp.zeros((batch_size,))
    labels = jnp.zeros((batch_size,), jnp.int32)
    flops = program_flops(jax.jit(apply_fn), params, x, t, t, labels)
    return None if flops is None else flops / batch_size


def teacher_compute(teacher_run_dir: str | Path) -> dict | None:
    """The `compute` of a teacher's finished run record (None when the record has none)."""
    from shortcut import record

    return (record.read(teacher_run_dir) or {}).get("compute")


def run_compute(step_flops: float | None, steps: int, teacher: dict | None = None,
                preparation: dict[str, float | None] | None = None, has_teacher: bool = False) -> dict:
    """The `compute` section of a run record; `total_flops` is None when any part is unknown. `preparation`:
    what the method spent on its training data before the first step, by key (Objective.preparation_flops;
    an unknown figure is left out)."""
    train = None if step_flops is None else step_flops * steps
    teacher_total = (teacher or {}).get("total_flops")
    known = {k: v for k, v in (preparation or {}).items() if v is not None}
    parts = [train] + ([teacher_total] if has_teacher else []) + list(known.values())
    out = {"train_step_flops": step_flops, "steps": int(steps), "train_flops": train, "source": SOURCE}
    if has_teacher:
        out["teacher_flops"] = teacher_total
    out.update(known)
    out["total_flops"] = None if any(p is None for p in parts) else float(sum(parts))
    return out
