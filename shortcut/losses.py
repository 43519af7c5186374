"""Per-row regression losses: plain MSE, a multi-level Haar wavelet loss, and adaptive loss weighting.

Each function maps a batch [B, H, W, C] to one value per row [B]; the train loop averages the rows
(shortcut/train.py) after the objective's `row_loss` (shortcut/objective.py) has picked and weighted them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mse_rows(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error of each row over all its other axes."""
    return jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))


def haar_level(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """One level of the orthonormal 2-D Haar transform of [B, H, W, C] (H, W even): the approximation
    (LL) and the details (LH, HL, HH), each [B, H/2, W/2, C]. `pywt.dwt2(x, "haar", axes=(1, 2))`
    gives the same four bands (tests/test_shortcut_recipe.py checks it)."""
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]  # rows 2i: columns 2j, 2j+1
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]  # rows 2i+1
    ll = (a + b + c + d) / 2
    lh = (a + b - c - d) / 2  # high-pass down the rows (horizontal edges)
    hl = (a - b + c - d) / 2  # high-pass along the columns (vertical edges)
    hh = (a - b - c + d) / 2
    return ll, (lh, hl, hh)


def wavelet_rows(pred: jax.Array, target: jax.Array, levels: int) -> jax.Array:
    """Multi-level Haar wavelet loss of each row (iSM, arXiv 2510.21250, "multi-level wavelet loss").

    The error e = pred - target is decomposed `levels` times with the orthonormal 2-D Haar transform;
    the loss is the sum over the 3 * levels detail bands and the last approximation band of each band's
    mean squared coefficient. Every band weighs the same, whatever its size, so the fine detail bands
    (the high frequencies, few in number but 3/4 of the coefficients at level 1) count as much as the
    coarse ones do; a plain sum of all squared coefficients would be the L2 loss again (the transform
    is orthonormal). iSM's exact band weighting is not given by a primary source we could read: this is
    our definition, stated in docs/methods.md.
    """
    err = pred - target
    bands = []
    for _ in range(levels):
        err, details = haar_level(err)
        bands.extend(details)
    bands.append(err)
    return sum(jnp.mean(jnp.square(b), axis=tuple(range(1, b.ndim))) for b in bands)


def adaptive_weight(squared_error: jax.Array, p: float, c: float) -> jax.Array:
    """Adaptive loss weight w = 1 / (L + c)^p of a per-row loss L, under stop-gradient (MeanFlow, Geng et
    al. 2025, arXiv 2505.13447; ESC, arXiv 2512.11831, `loss_type: adaptive`): the weighted loss w * L
    has the gradient of L^(1-p), so p = 1 trains on log-like errors and p = 0 is the plain loss. Both
    papers take L as the squared error summed over the sample; so do the callers here."""
    return jax.lax.stop_gradient(1.0 / (squared_error + c) ** p)
