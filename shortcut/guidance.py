"""Guidance as a network input: what improved MeanFlow and the shortcut model's intrinsic guidance share.

Classifier-free guidance at scale w is the velocity v_u + w (v_c - v_u) (unconditional v_u, conditional v_c;
w = 1 is plain conditional). A method that makes w an input of the network trains, per row, a w drawn from
a range and a guided regression target built from the network's own velocities without gradient, so that
sampling at scale w is one network call per step instead of two. The pieces here:

  * `guided_target(v, v_c, v_u, scale)`: v + scale (v_c - v_u), per-row scale. Improved MeanFlow uses
    scale = 1 - 1/w with v_c the network at w (its fixed point is the guided velocity); the shortcut model's
    intrinsic guidance uses scale = w - 1 with v_c, v_u the network at w = 1 (unguided conditional and
    unconditional), whose expectation over the data is v_u + w (v_c - v_u).
  * the draws of w: `sample_guidance` (improved MeanFlow's power law on [1, 1 + s_max]) and `grid_guidance`
    (uniform on a grid, the shortcut model's intrinsic guidance).
  * the guidance interval (`interval_scale`): guidance only while t is inside [t_lo, t_hi] (Kynkäänniemi et
    al. 2024, "Applying guidance in a limited interval improves sample and distribution quality", arXiv
    2404.07724; used by iSM, arXiv 2510.21250), w = 1 outside, in this framework's time (t = 0 noise, t = 1 data).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GUIDANCE = "guidance"  # improved MeanFlow's extra network input: 1 - 1/w
GUIDANCE_SCALE = "guidance_scale"  # the shortcut model's extra network input (intrinsic guidance): w itself


def guidance_input(w: jax.Array) -> jax.Array:
    """The scalar improved MeanFlow's network sees for guidance scale w: 1 - 1/w (0 without guidance)."""
    return 1 - 1 / w


def sample_guidance(key: jax.Array, b: int, s_max: float, beta: float) -> jax.Array:
    """Guidance scales w in [1, 1 + s_max], one per row (improved MeanFlow's official sample_cfg_scale)."""
    u = jax.random.uniform(key, (b,))
    if beta == 1.0:
        return jnp.exp(u * jnp.log1p(s_max))
    return jnp.exp(jnp.log1p(u * jnp.expm1((1 - beta) * jnp.log1p(s_max))) / (1 - beta))


def guidance_grid(w_min: float, w_max: float, step: float) -> np.ndarray:
    """The grid {w_min, w_min + step, .., w_max} (w_max included when it is on the grid)."""
    n = int(np.floor((w_max - w_min) / step + 1e-6)) + 1
    return (w_min + step * np.arange(n)).astype(np.float32)


def grid_guidance(key: jax.Array, b: int, w_min: float, w_max: float, step: float) -> jax.Array:
    """Guidance scales w, one per row, uniform on `guidance_grid(w_min, w_max, step)`."""
    grid = jnp.asarray(guidance_grid(w_min, w_max, step))
    return grid[jax.random.randint(key, (b,), 0, grid.shape[0])]


def in_interval(t: jax.Array, interval) -> jax.Array:
    """Whether each t lies in the closed guidance interval [t_lo, t_hi] (all true without an interval)."""
    t = jnp.asarray(t)
    if interval is None:
        return jnp.ones(t.shape, bool)
    return (t >= interval[0]) & (t <= interval[1])


def interval_scale(w: jax.Array, t: jax.Array, interval) -> jax.Array:
    """The guidance scale in effect at time t: w inside the interval, 1 (no guidance) outside."""
    return jnp.where(in_interval(t, interval), w, 1.0)


def guided_target(v: jax.Array, v_cond: jax.Array, v_uncond: jax.Array, scale: jax.Array) -> jax.Array:
    """v + scale (v_cond - v_uncond), `scale` one per row ([B]) or a scalar."""
    scale = jnp.asarray(scale)
    return v + scale.reshape(scale.shape + (1,) * (v.ndim - scale.ndim)) * (v_cond - v_uncond)
