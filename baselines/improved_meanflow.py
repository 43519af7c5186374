"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter, He, "Improved Mean Flows: On the Challenges of
Fastforward Generative Models", arXiv 2512.02012; official JAX code github.com/Lyy-iiis/imeanflow, `imf.py`
at bf60cd7, read for the definitions below). Beyond the paper's table.

The network is MeanFlow's average velocity u(x_t, t, d) over [t, t + d] (baselines/meanflow.py has the
mapping from MeanFlow's time, where 1 is noise, to ours: our t = 1 - t_MF, d = t_MF - r). iMF changes
MeanFlow in two ways:

1. A v-loss re-parametrised by u. The compound V = u + d * sg(du/dt) is regressed onto the flow target,
   where du/dt is the derivative along the trajectory with the interval's end fixed, taken with the
   network's own velocity v_theta(x_t, t) = u(x_t, t, 0) as the tangent (MeanFlow uses x1 - x0), so the
   target no longer depends on the network through the tangent of a noisy sample. In our variables
       u_tgt = v_g + d * sg(jvp(u, (x, t, d), tangents (v_theta, 1, -1)))       loss ||u - sg(u_tgt)||^2
   (the same squared error as ||V - v_g||^2, since sg(du/dt) carries no gradient), derivative by
   shortcut/forward_mode.py (`derivative: jvp` or `finite_difference`).
2. Guidance as an input (`guidance: true`). Each row draws a guidance scale w in [1, 1 + guidance_max]
   (official `sample_cfg_scale`: w = (1 + s_max)^U for beta = 1, else the power law of `guidance_beta`), the
   network is conditioned on it (the scalar input "guidance" = 1 - 1/w, as the official omega embedder sees
   it; shortcut/model.py's extra conditioning), and the target is the guided velocity
       v_g = (x1 - x0) + (1 - 1/w) (v_theta(x_t, t | w, y) - v_theta(x_t, t | w = 1, null))
   with both velocities from the network without gradient (official `guidance_fn`). Labels are dropped to
   the null class on the first Binomial(B, class_dropout) rows (official `cond_drop`), whose target is then
   x1 - x0; the tangent keeps the conditional v_theta(x_t, t | w, y). Sampling with scale w is one network
   call per step: x <- x + (1/N) u(x, i/N, 1/N | w). The draw of w and the guided target are
   shortcut/guidance.py's, shared with the shortcut model's intrinsic guidance.

Times (official `sample_tr`): t_MF and r are two logit-normal draws (mean -0.4, std 1), t_MF the larger;
the first `flow_fraction` (official data_proportion, 0.5) of the rows have r = t (d = 0: plain flow
matching onto v_g). d = 0 is an input of the network, so the spec must condition on d itself
(`model.d_conditioning: step_size`). Loss weight: adaptive, 1 / (||u - u_tgt||^2 + c)^p with the squared
norm summed over the sample (official norm_p = 1, norm_eps = 0.01).

Not built (differences from the official code): its network (in-context conditioning tokens, RoPE, RMSNorm,
SwiGLU, no t input beside h = t - r) is replaced by the framework's DiT, conditioned on t and d; the
auxiliary v-head (a second branch of the last 8 blocks trained on ||v - v_g||^2) is replaced by the boundary
u(x, t, 0), which the r = t rows train; and the guidance interval [t_min, t_max] is not an input (guidance
applies at every t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from pydantic import Field

from baselines.meanflow import meanflow_target
from shortcut.errors import KeyedValueError
from shortcut.forward_mode import DerivativeConfig
from shortcut.guidance import GUIDANCE, guidance_input, guided_target, sample_guidance  # noqa: F401 (re-exported)
from shortcut.objective import ApplyFn, Context, Objective, Targets, euler_sample, expand, interpolate

class ImprovedMeanFlowConfig(DerivativeConfig):
    flow_fraction: float = Field(default=0.5, ge=0, le=1, description="share of rows with r = t (official "
                                 "data_proportion)")
    time_mean: float = Field(default=-0.4, description="logit-normal mean, in MeanFlow's time (1 = noise)")
    time_std: float = Field(default=1.0, gt=0, description="logit-normal standard deviation")
    adaptive_p: float = Field(default=1.0, ge=0, description="adaptive loss weight power p (0 = plain MSE)")
    adaptive_c: float = Field(default=0.01, gt=0, description="adaptive loss weight constant c (official norm_eps)")
    guidance: bool = Field(default=True, description="the guidance scale w is an input of the network and the "
                           "target is guided (needs classes)")
    guidance_max: float = Field(default=7.0, gt=0, description="w is drawn in [1, 1 + guidance_max] (official s_max)")
    guidance_beta: float = Field(default=1.0, ge=0, description="power of w's distribution (official cfg_beta; "
                                 "1: w = (1 + guidance_max)^U)")


def imf_target(apply_fn: ApplyFn, params, x_t, t, d, labels, v_g, tangent, cond=None, *, derivative="jvp",
               step: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """(u, u_tgt): the network's u(x_t, t, d) and the iMF target v_g + d * du/dt with the derivative along
    (tangent, 1, -1) in (x, t, d) (not yet stop-gradient)."""
    return meanflow_target(apply_fn, params, x_t, t, d, labels, v_g, d, tangent=tangent, cond=cond,
                           derivative=derivative, step=step)


class ImprovedMeanFlowObjective(Objective):
    Config = ImprovedMeanFlowConfig
    display_name = "Improved MeanFlow"
    table_order = 92
    groups = ("flow", "mean")

    @classmethod
    def from_spec(cls, spec) -> "ImprovedMeanFlowObjective":
        if spec.model.d_conditioning != "step_size":
            raise KeyedValueError("model.d_conditioning", "improved_meanflow conditions on intervals of length 0 "
                                  "(r = t rows): needs step_size")
        if spec.method.guidance and spec.data.num_classes == 0:
            raise KeyedValueError("method.guidance", "guidance needs class labels; set false for unconditional data")
        return cls(spec.method, num_classes=spec.data.num_classes)

    @classmethod
    def network_options(cls, config: ImprovedMeanFlowConfig) -> dict:
        return {"conditioning": (GUIDANCE,)} if config.guidance else {}

    def flow_size(self, batch_size: int) -> int:
        return int(batch_size * self.config.flow_fraction)

    def sample_times(self, key: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
        """(t, d) per row: the first flow_size(b) rows have d = 0 (r = t)."""
        cfg = self.config
        mf = jax.nn.sigmoid(cfg.time_mean + cfg.time_std * jax.random.normal(key, (2, b)))
        t_mf, r = jnp.max(mf, axis=0), jnp.min(mf, axis=0)
        r = jnp.where(jnp.arange(b) < self.flow_size(b), t_mf, r)
        return 1 - t_mf, t_mf - r

    def _cond(self, w: jax.Array) -> dict | None:
        return {GUIDANCE: guidance_input(w)} if self.config.guidance else None

    def velocity(self, apply_fn: ApplyFn, params, x, t, labels, w) -> jax.Array:
        """The network's instantaneous velocity u(x, t, 0 | w, labels)."""
        cond = self._cond(w)
        kw = {} if cond is None else {"cond": cond}
        return apply_fn(params, x, t, jnp.zeros_like(t), labels, **kw)

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        x1, labels = batch["image"], batch["label"]
        k_t, k_noise, k_w, k_drop = jax.random.split(key, 4)
        b = x1.shape[0]
        t, d = self.sample_times(k_t, b)
        x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
        x_t = interpolate(x0, x1, t)
        v_t = x1 - x0
        params = ctx.params
        w = sample_guidance(k_w, b, cfg.guidance_max, cfg.guidance_beta) if cfg.guidance else jnp.ones((b,))
        v_c = self.velocity(ctx.apply_fn, params, x_t, t, labels, w)
        v_g = v_t
        if cfg.guidance:
            v_u = self.velocity(ctx.apply_fn, params, x_t, t, jnp.full_like(labels, self.null_class), jnp.ones_like(w))
            v_g = guided_target(v_t, v_c, v_u, guidance_input(w))
        dropped = jnp.arange(b) < jnp.sum(jax.random.bernoulli(k_drop, cfg.class_dropout, (b,)))
        y = jnp.where(dropped, self.null_class, labels)
        v_g = jnp.where(expand(dropped, v_g), v_t, v_g)
        if not cfg.guidance:  # the tangent is the network's velocity for the label it is trained with
            v_c = self.velocity(ctx.apply_fn, params, x_t, t, y, w)
        cond = self._cond(w)
        u, target = imf_target(ctx.apply_fn, params, x_t, t, d, y, v_g, v_c, cond, derivative=cfg.derivative,
                               step=cfg.finite_difference_step)
        target = jax.lax.stop_gradient(target)
        weight = None
        if cfg.adaptive_p > 0:
            err = jnp.sum(jnp.square(u - target), axis=tuple(range(1, u.ndim)))
            weight = jax.lax.stop_gradient(1.0 / (err + cfg.adaptive_c) ** cfg.adaptive_p)
        group = (jnp.arange(b) >= self.flow_size(b)).astype(jnp.int32)
        return Targets(x_t, t, d, y, target, group, weight, cond)

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        """N Euler steps with the average velocity over each step, x <- x + (1/N) u(x, i/N, 1/N); with
        `guidance` the scale w = cfg_scale is the network's input (one call per step)."""
        if not self.config.guidance:
            return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=1.0 / num_steps,
                                cfg_scale=cfg_scale, null_class=self.null_class)
        b = noise.shape[0]
        cond = {GUIDANCE: jnp.full((b,), guidance_input(jnp.float32(cfg_scale)))}
        guided = lambda params, x, t, d, y: apply_fn(params, x, t, d, y, cond=cond)
        return euler_sample(guided, params, noise, labels, num_steps, d_cond=1.0 / num_steps, cfg_scale=1.0,
                            null_class=self.null_class)

    def network_evaluations(self, num_steps: int, cfg_scale: float = 1.0) -> int:
        return num_steps if self.config.guidance else super().network_evaluations(num_steps, cfg_scale)
