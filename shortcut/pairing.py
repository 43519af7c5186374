"""Minibatch optimal transport between noise and data: which noise row goes with which data row.

Independent pairing (`none`) draws noise and data independently; `exact` reorders the noise rows by the
assignment that minimises the summed squared distance to the data rows (minibatch OT: Pooladian et al.
2023, arXiv 2304.14772; Tong et al. 2023, arXiv 2302.00482; iSM's "scaling optimal transport", arXiv
2510.21250); `sinkhorn` draws, for each data row, a noise row from the entropic OT plan's conditional.

Solvers: `exact` is SciPy's `linear_sum_assignment` (a shortest augmenting path solver, exact, O(n^3)),
called from inside the jit-compiled step through `jax.pure_callback`; `sinkhorn` is OTT-JAX's Sinkhorn
solver, traced into the step itself. A permutation keeps the noise marginal exactly N(0, I) (every noise
row is used once); a Sinkhorn draw may reuse a noise row, as in Tong et al.'s OT-CFM.

Classes (`ot_classes`): a class-blind pairing (`across`) sends the noise nearest each class's images to that
class, so the noise a class is trained from is no longer N(0, I) while its samples start from N(0, I)
(`python benchmarks/ot_class_shift.py` measures how far on the digits). `within` tags noise row i with data row i's class (the
noise rows are i.i.d., so which rows a class gets does not depend on their values) and allows only pairs of
one class, which keeps every class's noise N(0, I), as in Tong et al.'s class-conditional OT-CFM.

Pooling (`ot_pool` K > 1, iSM's "scaling optimal transport", arXiv 2510.21250, as secondary summaries of
the paper describe it): `PooledNoise` takes K consecutive batches of B from the data stream, draws K*B
noise rows, solves one pairing over the K*B noise and data rows, and hands the K batches back in their
order, each with its paired noise under "noise": one solve every K steps, every data row used once, each
in its own batch. The pool is per process (K times the per-process batch).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from shortcut.data.iterators import Batch, BatchIterator, pack_state, unpack_state

Pairing = Literal["none", "exact", "sinkhorn"]


def squared_distances(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """[B, B] matrix of ||x0_i - x1_j||^2 over the flattened rows."""
    a, b = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
    return jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T


def _assignment(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.asarray(cost, np.float64))  # an infinite cost is a forbidden pair
    order = np.empty_like(cols)
    order[cols] = rows  # data row j gets noise row order[j]
    return order.astype(np.int32)


def exact_order(cost: jax.Array, forbidden: jax.Array | None = None) -> jax.Array:
    """For each data row j (a column of `cost`), the noise row i of the optimal assignment (a permutation);
    pairs where `forbidden` [B, B] is true are never made."""
    if forbidden is not None:
        cost = jnp.where(forbidden, jnp.inf, cost)
    shape = jax.ShapeDtypeStruct((cost.shape[1],), jnp.int32)
    return jax.pure_callback(_assignment, shape, cost, vmap_method="sequential")


def sinkhorn_order(key: jax.Array, cost: jax.Array, epsilon: float, forbidden: jax.Array | None = None) -> jax.Array:
    """For each data row j, a noise row drawn from the entropic OT plan's column j (OTT-JAX Sinkhorn,
    epsilon relative to the mean cost, of the allowed pairs where `forbidden` [B, B] marks some)."""
    from ott.geometry import geometry
    from ott.solvers import linear

    if forbidden is None:
        plan = linear.solve(geometry.Geometry(cost, epsilon=epsilon, relative_epsilon="mean")).matrix
        return jax.random.categorical(key, jnp.log(jnp.maximum(plan.T, 1e-30)), axis=-1).astype(jnp.int32)
    eps = epsilon * jnp.sum(jnp.where(forbidden, 0.0, cost)) / jnp.maximum(jnp.sum(~forbidden), 1)
    # a forbidden pair costs 10^4 mean costs: exp(-cost / eps) is 0 there, so the plan keeps to the allowed pairs
    far = jnp.where(forbidden, 1e4 * eps / epsilon, cost)
    plan = linear.solve(geometry.Geometry(far, epsilon=eps)).matrix
    logits = jnp.where(forbidden.T, -jnp.inf, jnp.log(jnp.maximum(plan.T, 1e-30)))
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pair_noise(key: jax.Array, x0: jax.Array, x1: jax.Array, pairing: Pairing, *, epsilon: float = 0.05,
               labels: jax.Array | None = None) -> jax.Array:
    """The noise rows reordered to go with the data rows x1 (unchanged for `none`). With the data rows'
    `labels`, noise row i belongs to labels[i]'s class and is paired only within it (module docstring)."""
    if pairing == "none":
        return x0
    cost = jax.lax.stop_gradient(squared_distances(x0, x1))
    forbidden = None if labels is None else labels[:, None] != labels[None, :]
    order = exact_order(cost, forbidden) if pairing == "exact" else sinkhorn_order(key, cost, epsilon, forbidden)
    return x0[order]


class PooledNoise(BatchIterator):
    """The batches of `inner`, each with "noise" paired with its "image" rows by one `pairing` solved over
    the pool of `pool` consecutive batches (module docstring). Pool n's noise and pairing key come from
    (seed, process index, n), so a restored position rebuilds its pool and skips the batches already consumed."""

    def __init__(self, inner: BatchIterator, *, pool: int, pairing: Pairing, epsilon: float, seed: int,
                 within_class: bool = False):
        if pool < 2 or pairing == "none":
            raise ValueError(f"a noise pool needs pool >= 2 and a pairing, got pool {pool}, pairing {pairing!r}")
        fingerprint = {"kind": "ot_pool", "pool": pool, "pairing": pairing, "epsilon": epsilon, "seed": seed}
        super().__init__(inner.info, fingerprint | ({"within_class": True} if within_class else {}))
        self.inner, self._k, self._seed, self._within = inner, pool, seed, within_class
        self._pair = jax.jit(lambda key, x0, x1, y: pair_noise(key, x0, x1, pairing, epsilon=epsilon, labels=y))
        self._next, self._current, self._start, self._ready = 0, 0, b"", []

    def __next__(self) -> Batch:
        if not self._ready:
            self._fill()
        return self._ready.pop(0)

    def _fill(self) -> None:
        """Take the next `pool` batches from `inner` and pair their rows with fresh noise in one solve."""
        self._start, self._current = self.inner.get_state(), self._next
        self._next += 1
        batches = [next(self.inner) for _ in range(self._k)]
        data = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches]) if self._within else None
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self._seed), jax.process_index()), self._current)
        k_draw, k_pair = jax.random.split(key)
        noise = np.asarray(self._pair(k_pair, jax.random.normal(k_draw, data.shape, data.dtype), data, labels))
        self._ready = [{**b, "noise": part} for b, part in zip(batches, np.split(noise, self._k))]

    def get_state(self) -> bytes:
        if not self._ready:  # between pools
            meta, inner = {"index": self._next, "used": 0}, self.inner.get_state()
        else:
            meta, inner = {"index": self._current, "used": self._k - len(self._ready)}, self._start
        return pack_state({"kind": "ot_pool", "fingerprint": self._fingerprint, **meta}, {"inner": inner})

    def set_state(self, state: bytes) -> None:
        meta, files = unpack_state(state)
        if meta.get("kind") != "ot_pool":
            raise ValueError(f"Iterator state of kind {meta.get('kind')!r}, expected 'ot_pool'")
        self._check_fingerprint(meta)
        self.inner.set_state(files["inner"])
        self._next, self._ready = int(meta["index"]), []
        if meta["used"]:
            self._fill()
            del self._ready[: int(meta["used"])]
