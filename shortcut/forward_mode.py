"""Forward-mode derivatives of the network along a direction in its inputs and times.

The continuous-time methods (MeanFlow, improved MeanFlow, sCT / sCD) need the derivative of a network
output along a trajectory, d/de F(x + e x', t + e t', ...) at e = 0: one Jacobian-vector product. Every
one of them computes it here, with one of two methods (the method key `derivative`):

  * "jvp" (default): `jax.jvp`, exact and about the cost of three forward passes; every layer of the DiT
    (patch embedding, sinusoidal embedders, adaLN, layer norms, both attention paths, GELU MLP) has a
    forward-mode rule in JAX (tests/test_forward_mode.py checks it against a finite difference).
  * "finite_difference": the central difference (F(p + h p') - F(p - h p')) / (2h) with
    h = `finite_difference_step` (small enough that every input moved by h stays in the network's domain:
    with `d_conditioning: level`, d - h > 0, so h < 1/M), two more forward passes and no forward-mode rule needed: the fallback
    for a layer or kernel without one (e.g. a fused attention kernel), as NVIDIA's FastGen offers.

The function is applied to the whole batch at once, with a per-row tangent, inside the jit-compiled train
step: its inputs keep the batch's sharding (dp or fsdp, shortcut/sharding.py), and XLA partitions the
derivative like the forward pass.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import jax
from pydantic import Field

from shortcut.methods import MethodConfig

Derivative = Literal["jvp", "finite_difference"]


class DerivativeConfig(MethodConfig):
    """The method keys of every method that differentiates its network in forward mode."""

    derivative: Derivative = Field(default="jvp", description="how the network's derivative along a trajectory "
                                   "is computed: jvp (exact forward mode) or finite_difference (central, fallback)")
    finite_difference_step: float = Field(default=1e-3, gt=0, description="h of the central difference; inputs "
                                          "moved by h must stay in the network's domain (level conditioning: h < 1/M)")


def directional_derivative(fn: Callable, primals: Sequence, tangents: Sequence, *, method: Derivative = "jvp",
                           step: float = 1e-3) -> tuple:
    """(fn(*primals), d/de fn(*(p + e t)) at e = 0), by `jax.jvp` or a central finite difference.

    `tangents` match `primals` in structure, shape and dtype (one tangent row per batch row).
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if method == "jvp":
        return jax.jvp(fn, primals, tangents)
    if method == "finite_difference":
        moved = lambda sign: fn(*(jax.tree.map(lambda p, t: p + sign * step * t, p, t)
                                  for p, t in zip(primals, tangents)))
        return fn(*primals), jax.tree.map(lambda a, b: (a - b) / (2 * step), moved(1.0), moved(-1.0))
    raise ValueError(f"derivative must be jvp or finite_difference, got {method!r}")

