"""Minibatch optimal transport between noise and data: which noise row goes with which data row.

Independent pairing (`none`) draws noise and data independently; `exact` reorders the noise rows by the
assignment that minimises the summed squared distance to the data rows (minibatch OT: Pooladian et al.
2023, arXiv 2304.14772; Tong et al. 2023, arXiv 2302.00482; iSM's "scaling optimal transport", arXiv
2510.21250); `sinkhorn` draws, for each data row, a noise row from the entropic OT plan's conditional.

Solvers: `exact` is SciPy's `linear_sum_assignment` (a shortest augmenting path solver, exact, O(n^3)),
called from inside the jit-compiled step through `jax.pure_callback`; `sinkhorn` is OTT-JAX's Sinkhorn
solver, traced into the step itself. A permutation keeps the noise marginal exactly N(0, I) (every noise
row is used once); a Sinkhorn draw may reuse a noise row, as in Tong et al.'s OT-CFM.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Pairing = Literal["none", "exact", "sinkhorn"]


def squared_distances(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """[B, B] matrix of ||x0_i - x1_j||^2 over the flattened rows."""
    a, b = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
    return jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T


def _assignment(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.asarray(cost, np.float64))
    order = np.empty_like(cols)
    order[cols] = rows  # data row j gets noise row order[j]
    return order.astype(np.int32)


def exact_order(cost: jax.Array) -> jax.Array:
    """For each data row j (a column of `cost`), the noise row i of the optimal assignment (a permutation)."""
    shape = jax.ShapeDtypeStruct((cost.shape[1],), jnp.int32)
    return jax.pure_callback(_assignment, shape, cost, vmap_method="sequential")


def sinkhorn_order(key: jax.Array, cost: jax.Array, epsilon: float) -> jax.Array:
    """For each data row j, a noise row drawn from the entropic OT plan's column j (OTT-JAX Sinkhorn,
    epsilon relative to the mean cost)."""
    from ott.geometry import geometry
    from ott.solvers import linear

    plan = linear.solve(geometry.Geometry(cost, epsilon=epsilon, relative_epsilon="mean")).matrix
    return jax.random.categorical(key, jnp.log(jnp.maximum(plan.T, 1e-30)), axis=-1).astype(jnp.int32)


def pair_noise(key: jax.Array, x0: jax.Array, x1: jax.Array, pairing: Pairing, *, epsilon: float = 0.05) -> jax.Array:
    """The noise rows reordered to go with the data rows x1 (unchanged for `none`)."""
    if pairing == "none":
        return x0
    cost = jax.lax.stop_gradient(squared_distances(x0, x1))
    order = exact_order(cost) if pairing == "exact" else sinkhorn_order(key, cost, epsilon)
    return x0[order]
