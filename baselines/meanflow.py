"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"; beyond the paper's table).

The network learns the average velocity over an interval. In our convention (x_t = (1 - t) x0 + t x1,
t = 0 noise, t = 1 data, velocity v = x1 - x0) the interval [t, t + d] is conditioned exactly like a
shortcut step, so the model is s(x_t, t, d) = u = (1/d) int_t^{t+d} v(x_tau, tau) dtau = (Phi_t^d(x_t) - x_t) / d.
MeanFlow writes u(z_t, r, t) with its time running from data (0) to noise (1); the mapping is
    our t = 1 - t_MF (the interval's noisier end),  d = t_MF - r,  our velocity = -(MeanFlow's velocity).

MeanFlow identity in our variables (differentiate d * u = int_t^{t+d} v along the trajectory, keeping the
interval's end t + d fixed):
    u(x_t, t, d) = v(x_t, t) + d * (du/dt),   du/dt = (d/dx u) v + d/dt u - d/dd u,
so the regression target is u_tgt = v + d * jvp(u, (x, t, d), tangents (v, 1, -1)), computed in forward mode
(shortcut/forward_mode.py: jax.jvp, or a central finite difference with `derivative: finite_difference`)
of the network at the current parameters under stop-gradient, with the conditional velocity v = x1 - x0
(its conditional mean given x_t is the true velocity and the target is affine in v).

Batch split and times (MeanFlow's ImageNet choices): `mean_fraction` (25%) of the rows have r != t,
the rest r = t (then d = 0 and the target is plain flow matching, v). Times are logit-normal in
MeanFlow's time (mean -0.4, std 1), two draws per row, r = min and t_MF = max.
d = 0 rows: with d_conditioning "level" the level -log2(d) must stay finite, so r = t rows are
conditioned on the finest step d = 1/M (the framework's flow-row convention; their target has no
derivative term, so only the conditioning changes). r != t rows: d is raised to at least 1/M (and the
start moved so t + d <= 1) to stay in the trained range of levels 0 .. log2(M); the identity holds for
any interval, so this only reshapes the interval distribution slightly.

Loss: adaptive weighting w = 1 / (||u - u_tgt||^2 + c)^p (stop-gradient; p = 1, c = 1e-3, with the
squared norm summed over the sample like MeanFlow), passed as Targets.weight on the framework's
per-row mean squared error (a constant factor away from MeanFlow's summed loss).
Sampling: N Euler steps x <- x + (1/N) u(x, i/N, 1/N) (MeanFlow's 1-step sampler for N = 1);
N network calls (2N with guidance, which is applied to u).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from pydantic import Field

from shortcut.forward_mode import Derivative, DerivativeConfig, directional_derivative
from shortcut.losses import adaptive_weight
from shortcut.objective import ApplyFn, Context, Objective, Targets, drop_labels, euler_sample, expand, interpolate


class MeanFlowConfig(DerivativeConfig):
    mean_fraction: float = Field(default=0.25, ge=0, le=1, description="share of rows with r != t (d > 0)")
    time_mean: float = Field(default=-0.4, description="logit-normal mean, in MeanFlow's time (1 = noise)")
    time_std: float = Field(default=1.0, gt=0, description="logit-normal standard deviation")
    adaptive_p: float = Field(default=1.0, ge=0, description="adaptive loss weight power p (0 = plain MSE)")
    adaptive_c: float = Field(default=1e-3, gt=0, description="adaptive loss weight constant c")


def meanflow_target(apply_fn: ApplyFn, params, x_t: jax.Array, t: jax.Array, d_cond: jax.Array, labels: jax.Array,
                    v: jax.Array, d: jax.Array, *, tangent: jax.Array | None = None, cond: dict | None = None,
                    derivative: Derivative = "jvp", step: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """(u, u_tgt): the network's u(x_t, t, d_cond) and the MeanFlow target v + d * du/dt (not yet stop-gradient).

    d is the interval length in the identity (0 for r = t rows); d_cond what the network is conditioned on;
    `tangent`: the direction of x in the derivative (default v; improved MeanFlow passes its own); `cond`: the
    network's extra conditioning inputs; `derivative` and `step` as shortcut/forward_mode.py's
    directional_derivative.
    """
    kw = {} if cond is None else {"cond": cond}
    fn = lambda x, tt, dd: apply_fn(params, x, tt, dd, labels, **kw)
    ones = jnp.ones_like(t)
    direction = v if tangent is None else tangent
    u, dudt = directional_derivative(fn, (x_t, t, d_cond), (direction, ones, -ones), method=derivative, step=step)
    return u, v + expand(d, v) * dudt


class MeanFlowObjective(Objective):
    Config = MeanFlowConfig
    display_name = "MeanFlow"
    table_order = 90
    groups = ("flow", "mean")

    def mean_size(self, batch_size: int) -> int:
        return int(round(batch_size * self.config.mean_fraction))

    def sample_times(self, key: jax.Array, b: int, nm: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(t, d, d_cond) per row: the first nm rows have r != t, the rest r = t (d = 0, d_cond = 1/M)."""
        cfg = self.config
        d_min = 1.0 / cfg.denoise_timesteps
        mf = jax.nn.sigmoid(cfg.time_mean + cfg.time_std * jax.random.normal(key, (2, b)))  # MeanFlow time
        ours = 1 - mf
        start, end = jnp.min(ours, axis=0), jnp.max(ours, axis=0)
        d_mean = jnp.maximum(end - start, d_min)
        t_mean = jnp.minimum(start, 1 - d_mean)
        is_mean = jnp.arange(b) < nm
        t = jnp.where(is_mean, t_mean, ours[0])
        d = jnp.where(is_mean, d_mean, 0.0)
        d_cond = jnp.where(is_mean, d_mean, d_min)
        return t, d, d_cond

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        x1, labels = batch["image"], batch["label"]
        k_t, k_noise, k_label = jax.random.split(key, 3)
        b = x1.shape[0]
        nm = self.mean_size(b)
        t, d, d_cond = self.sample_times(k_t, b, nm)
        x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
        x_t = interpolate(x0, x1, t)
        y = drop_labels(k_label, labels, cfg.class_dropout, self.null_class)
        u, target = meanflow_target(ctx.apply_fn, ctx.params, x_t, t, d_cond, y, x1 - x0, d,
                                    derivative=cfg.derivative, step=cfg.finite_difference_step)
        target = jax.lax.stop_gradient(target)
        weight = None
        if cfg.adaptive_p > 0:
            err = jnp.sum(jnp.square(u - target), axis=tuple(range(1, u.ndim)))
            weight = adaptive_weight(err, cfg.adaptive_p, cfg.adaptive_c)
        group = (jnp.arange(b) < nm).astype(jnp.int32)
        return Targets(x_t, t, d_cond, y, target, group, weight)

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        """N Euler steps with the average velocity over each step: x <- x + (1/N) u(x, i/N, 1/N)."""
        return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=1.0 / num_steps, cfg_scale=cfg_scale,
                            null_class=self.null_class)
