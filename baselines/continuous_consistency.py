"""Continuous-time consistency models: sCT and sCD (Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", ICLR 2025, arXiv 2410.11081, Algorithm 1). Beyond the paper's table.

TrigFlow. x_t = cos(t) x1 + sin(t) z with data x1, z ~ N(0, sigma_d^2 I), t in [0, pi/2] (0 = data,
pi/2 = noise); the probability-flow ODE is dx_t/dt = sigma_d F(x_t, t) and the consistency function
f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t, t).

Our network read as TrigFlow (the conversion). Our path x_s = s x1 + (1 - s) eps (s = 1 data; eps = z / sigma_d)
is TrigFlow's up to a scale and a change of time: x_t = alpha(t) x_s with
    alpha(t) = cos t + sigma_d sin t,     s(t) = cos t / alpha(t)     (t(s) = arctan((1 - s) / (sigma_d s))).
A velocity v(x_s, s) on our path predicts x1 = x_s + (1 - s) v and eps = x_s - s v, so the TrigFlow
velocity -sin(t) x1 + sigma_d cos(t) eps is sigma_d F with
    F(x_t, t) = [(cos t - sin t / sigma_d) x_t - v(x_t / alpha(t), s(t))] / alpha(t).
This one conversion turns the digits / paper flow teacher into sCD's TrigFlow teacher and defines the
student's F_theta from the DiT every method uses (conditioned on d = 1/M). With it
f(x_t, t) = x_s + (1 - s) v(x_s, s): the consistency function of baselines/consistency_training.py, so a
student started from its teacher begins at the teacher's denoiser (the paper's sCD initialisation) and
sampling is that module's multistep consistency sampler (one step: x1 = eps + v(eps, 0); the grid s = i/N
is t = t(s), and N = 2 puts the intermediate point at t = arctan(2) = 1.107 for sigma_d = 0.5, the paper's 1.1).

Training (Algorithm 1), per row: tau ~ N(time_mean, time_std^2), t = arctan(e^tau / sigma_d);
x_t = cos(t) x1 + sin(t) z; the trajectory's velocity dx_t/dt is cos(t) z - sin(t) x1 (sCT) or the
teacher's sigma_d F_teacher(x_t, t) (sCD); F- and its total derivative dF-/dt along (dx_t/dt, 1) in (x_t, t)
come from one forward-mode derivative (shortcut/forward_mode.py) at the current parameters, no gradient;
    g = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt)
        with the tangent warm-up r = min(1, step / tangent_warmup_steps),
    g <- g / (||g|| + c)                                (tangent normalisation, per sample, c = 0.1)
    loss = e^{w(t)} / D ||F_theta - F- - g||^2 - w(t)   (adaptive weighting, w a learned log-variance)
In v-space F_theta - (F- + g) = -(v_theta - v_tgt) / alpha with v_tgt = (cos t - sin t / sigma_d) x_t
- alpha (F- + g): each row regresses the DiT at (x_t / alpha, s(t), 1/M) onto v_tgt with weight 1 / alpha^2,
and `loss` multiplies by e^{w} and subtracts w, w read from the network's log-variance head
(shortcut/model.py `log_variance`, a function of the network's time input s(t)).

Defaults are the paper's CIFAR-10 settings (sigma_d = 0.5, P_mean = -1.0, P_std = 1.4, c = 0.1,
tangent warm-up over 10k iterations); its ImageNet ones are P_mean = -0.8, P_std = 1.6. Not built: the
paper's network changes (adaptive double normalisation, positional time embeddings) and the teacher's
classifier-free guidance in sCD.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from baselines.consistency_distillation import require_teacher
from baselines.consistency_training import ConsistencyObjective
from shortcut.forward_mode import DerivativeConfig, directional_derivative
from shortcut.model import loss_log_variance
from shortcut.objective import ApplyFn, Context, Targets, drop_labels, expand, row_mse


def trig_alpha(t: jax.Array, sigma_d: float) -> jax.Array:
    """alpha(t) = cos t + sigma_d sin t: x_t (TrigFlow) = alpha(t) x_s (our path)."""
    return jnp.cos(t) + sigma_d * jnp.sin(t)


def flow_time(t: jax.Array, sigma_d: float) -> jax.Array:
    """Our path's time s(t) = cos t / alpha(t) of TrigFlow's t (s = 1 data, s = 0 noise)."""
    return jnp.cos(t) / trig_alpha(t, sigma_d)


def trig_time(s: jax.Array, sigma_d: float) -> jax.Array:
    """TrigFlow's time t(s) = arctan((1 - s) / (sigma_d s)) of our path's s (inverse of flow_time)."""
    return jnp.arctan2(1 - s, sigma_d * s)


def trigflow_F(velocity: Callable, x_t: jax.Array, t: jax.Array, sigma_d: float) -> jax.Array:
    """F(x_t, t) of a velocity v(x_s, s) on our path (the conversion in the module docstring)."""
    a = expand(trig_alpha(t, sigma_d), x_t)
    v = velocity(x_t / a, flow_time(t, sigma_d))
    return ((jnp.cos(expand(t, x_t)) - jnp.sin(expand(t, x_t)) / sigma_d) * x_t - v) / a


def normalised_tangent(F: jax.Array, dFdt: jax.Array, x_t: jax.Array, dxdt: jax.Array, t: jax.Array, *,
                       sigma_d: float, warmup: jax.Array | float, c: float) -> jax.Array:
    """g = -cos^2 t (sigma_d F - dx/dt) - r cos t sin t (x_t + sigma_d dF/dt), then g / (||g|| + c) per sample."""
    cos, sin = jnp.cos(expand(t, x_t)), jnp.sin(expand(t, x_t))
    g = -cos**2 * (sigma_d * F - dxdt) - warmup * cos * sin * (x_t + sigma_d * dFdt)
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
    return g / expand(norm + c, g)


class ContinuousConsistencyConfig(DerivativeConfig):
    sampler: Literal["consistency", "euler"] = Field(default="consistency", description="multistep sampler "
                                                     "(baselines/consistency_training.py)")
    sigma_data: float = Field(default=0.5, gt=0, description="sigma_d, the data's standard deviation in TrigFlow")
    time_mean: float = Field(default=-1.0, description="P_mean: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d)")
    time_std: float = Field(default=1.4, gt=0, description="P_std")
    tangent_c: float = Field(default=0.1, gt=0, description="c of the tangent normalisation g / (||g|| + c)")
    tangent_warmup_steps: int = Field(default=10000, ge=0, description="r rises linearly from 0 to 1 over these "
                                      "steps (0: r = 1 throughout)")
    adaptive_weighting: bool = Field(default=True, description="weight rows by e^{w(t)} with a learned "
                                     "log-variance w, minus w")


class ContinuousConsistencyTrainingObjective(ConsistencyObjective):
    """sCT: the trajectory's velocity is the sample's own, cos(t) z - sin(t) x1."""

    Config = ContinuousConsistencyConfig
    display_name = "sCT"
    table_order = 94

    @classmethod
    def network_options(cls, config: ContinuousConsistencyConfig) -> dict:
        return {"log_variance": True} if config.adaptive_weighting else {}

    def warmup(self, step) -> jax.Array:
        """The tangent warm-up factor r = min(1, step / tangent_warmup_steps)."""
        n = self.config.tangent_warmup_steps
        return jnp.float32(1.0) if n == 0 else jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / n)

    def trajectory_velocity(self, ctx: Context, x_t, t, x1, z, labels, d) -> jax.Array:
        """dx_t/dt along the trajectory the row is on."""
        return jnp.cos(expand(t, x1)) * z - jnp.sin(expand(t, x1)) * x1

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        sd = cfg.sigma_data
        x1, labels = batch["image"], batch["label"]
        k_t, k_noise, k_label = jax.random.split(key, 3)
        b = x1.shape[0]
        tau = cfg.time_mean + cfg.time_std * jax.random.normal(k_t, (b,))
        t = jnp.arctan(jnp.exp(tau) / sd)
        z = sd * jax.random.normal(k_noise, x1.shape, x1.dtype)
        x_t = jnp.cos(expand(t, x1)) * x1 + jnp.sin(expand(t, x1)) * z
        y = drop_labels(k_label, labels, cfg.class_dropout, self.null_class)
        d = jnp.full((b,), self.d_cond, jnp.float32)
        dxdt = self.trajectory_velocity(ctx, x_t, t, x1, z, y, d)
        student = lambda x, tt: trigflow_F(lambda xs, s: ctx.apply_fn(ctx.params, xs, s, d, y), x, tt, sd)
        F, dFdt = directional_derivative(student, (x_t, t), (dxdt, jnp.ones_like(t)), method=cfg.derivative,
                                         step=cfg.finite_difference_step)
        g = normalised_tangent(F, dFdt, x_t, dxdt, t, sigma_d=sd, warmup=self.warmup(ctx.step), c=cfg.tangent_c)
        a = expand(trig_alpha(t, sd), x_t)
        v = (jnp.cos(expand(t, x_t)) - jnp.sin(expand(t, x_t)) / sd) * x_t - a * (F + g)
        return Targets(x_t / a, flow_time(t, sd), d, y, jax.lax.stop_gradient(v), jnp.zeros((b,), jnp.int32),
                       1 / trig_alpha(t, sd) ** 2)

    def loss(self, apply_fn: ApplyFn, params, tg: Targets) -> tuple[jax.Array, jax.Array]:
        """mean(e^{w} ||F_theta - F_tgt||^2 / D - w), with ||F_theta - F_tgt||^2 / D = weight * the v-space MSE."""
        mse = row_mse(apply_fn, params, tg)
        if not self.config.adaptive_weighting:
            return jnp.mean(tg.weight * mse), mse
        w = loss_log_variance(params, tg.t)
        return jnp.mean(jnp.exp(w) * tg.weight * mse - w), mse


class ContinuousConsistencyDistillationConfig(ContinuousConsistencyConfig):
    init_from_teacher: bool = Field(default=True, description="the student starts from the teacher's weights")


class ContinuousConsistencyDistillationObjective(ContinuousConsistencyTrainingObjective):
    """sCD: the trajectory's velocity is the flow teacher's, converted to TrigFlow (sigma_d F_teacher)."""

    Config = ContinuousConsistencyDistillationConfig
    display_name = "sCD"
    table_order = 96

    def init_aux(self, params, teacher_params=None) -> Any:
        """aux = the teacher's (EMA) parameters, fixed for the whole run."""
        return require_teacher(self.config.name, teacher_params)

    def trajectory_velocity(self, ctx: Context, x_t, t, x1, z, labels, d) -> jax.Array:
        teacher = lambda xs, s: ctx.apply_fn(ctx.aux, xs, s, d, labels)
        return self.config.sigma_data * trigflow_F(teacher, x_t, t, self.config.sigma_data)
