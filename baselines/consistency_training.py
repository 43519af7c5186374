"""Consistency training (Song et al. 2023; the paper's "Consistency Training" row), no teacher.

Consistency function. The network's velocity output s(x, t) defines the predicted endpoint
    f(x, t) = x + (1 - t) s(x, t),
so f(x, 1) = x holds by construction (the boundary condition of consistency models in our time, where
t = 1 is data). A perfect model maps every point of an ODE trajectory to the trajectory's data endpoint;
then s(x, t) is the average velocity from t to 1.

Curriculum (the official code's, checked): the discretisation N doubles over training in K = log2(M)
equal stages, N = 1, 2, 4, .., M/2 (1 .. 64 for M = 128): stage k = floor(step * K / train.steps),
N = 2^k. Stage 0 (N = 1, t = 0 only) is flow matching at t = 0.

Targets. With t uniform on {0, 1/N, .., (N-1)/N}, t2 = t + 1/N, and x_t, x_t2 on the same noise/data
pair (x_t = (1-t) x0 + t x1), the target endpoint is the EMA model's f at the next grid point:
    f_target = x_t2 + (1 - t2) s_ema(x_t2, t2)            (stop-gradient)
The consistency loss ||f_theta(x_t, t) - f_target||^2 equals (1-t)^2 ||s_theta(x_t, t) - v||^2 with
    v = (f_target - x_t) / (1 - t),
so it is a v-space MSE against Targets.v. `loss_space`: "v" trains on ||s - v||^2 unweighted, as the
official code does; "f" weights each row by (1 - t)^2, which is exactly the f-space consistency loss.

Conditioning. The network is conditioned on the finest level d = 1/M throughout (the official code
builds this baseline with `ignore_dt`); labels are dropped to the null class with `class_dropout` so
classifier-free guidance works at sampling (the official code keeps them).

Sampling (`sampler`): "consistency" is multistep consistency sampling (Song et al. 2023, and the
official code): at t = i/N, x1_hat = f(x, t), then x <- (t + 1/N) x1_hat + (1 - t - 1/N) eps with fresh
noise eps (none after the last step, which returns x1_hat). The fresh noise of each sample is derived
from that sample's starting noise, so a sample depends only on its own starting noise. "euler" is plain
Euler x <- x + s(x, t)/N. Both use N network calls (2N with guidance).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from shortcut.methods import MethodConfig
from shortcut.objective import (ApplyFn, Context, Objective, Targets, drop_labels, euler_sample, expand,
                                guided_velocity, interpolate)


class ConsistencyConfig(MethodConfig):
    """Settings shared by consistency training and consistency distillation."""

    loss_space: Literal["v", "f"] = Field(default="v", description="v: unweighted v-space MSE (official); "
                                          "f: weight (1-t)^2, the f-space consistency loss")
    sampler: Literal["consistency", "euler"] = Field(default="consistency", description="multistep sampler")
    target_ema: bool = Field(default=True, description="build targets with the EMA parameters")


class ConsistencyTrainingConfig(ConsistencyConfig):
    pass


def row_keys(noise: jax.Array) -> jax.Array:
    """One PRNG key per sample, a function of that sample's starting noise only (its first two values)."""
    flat = noise.reshape(noise.shape[0], -1)[:, :2].astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)

    def key(row_bits):
        k = jax.random.PRNGKey(0)
        for j in range(row_bits.shape[0]):
            k = jax.random.fold_in(k, row_bits[j])
        return k

    return jax.vmap(key)(bits)


def consistency_sample(apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
                       d_cond: float, cfg_scale: float, null_class: int) -> jax.Array:
    """Multistep consistency sampling with f(x, t) = x + (1 - t) s(x, t); N network calls (see module doc)."""
    b, n = noise.shape[0], num_steps
    d = jnp.full((b,), d_cond, jnp.float32)
    keys = row_keys(noise)

    def step(i, x):
        t = jnp.full((b,), i / n, jnp.float32)
        x1_hat = x + expand(1 - t, x) * guided_velocity(apply_fn, params, x, t, d, labels, cfg_scale, null_class)
        t_next = expand(t + 1.0 / n, x)
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(keys)
        return jnp.where(i == n - 1, x1_hat, t_next * x1_hat + (1 - t_next) * eps)

    return jax.lax.fori_loop(0, n, step, noise)


def consistency_velocity(f_target: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The v whose f-space image at (x_t, t) is f_target: (f_target - x_t) / (1 - t)."""
    return (f_target - x_t) / expand(1 - t, x_t)


class ConsistencyObjective(Objective):
    """The part consistency training and distillation share: the target at the next point, the samplers."""

    groups = ("consistency",)

    @property
    def d_cond(self) -> float:
        return 1.0 / self.config.denoise_timesteps

    def consistency_targets(self, ctx: Context, x_t, t, x_next, t_next, d, labels) -> Targets:
        """Regress s(x_t, t) onto the v whose endpoint is the (EMA) model's f at (x_next, t_next)."""
        cfg = self.config
        params = ctx.ema_params if cfg.target_ema else ctx.params
        f_target = x_next + expand(1 - t_next, x_next) * ctx.apply_fn(params, x_next, t_next, d, labels)
        v = jax.lax.stop_gradient(consistency_velocity(f_target, x_t, t))
        weight = jnp.square(1 - t) if cfg.loss_space == "f" else None
        return Targets(x_t, t, d, labels, v, jnp.zeros((x_t.shape[0],), jnp.int32), weight)

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        kw = dict(d_cond=self.d_cond, cfg_scale=cfg_scale, null_class=self.null_class)
        if self.config.sampler == "euler":
            return euler_sample(apply_fn, params, noise, labels, num_steps, **kw)
        return consistency_sample(apply_fn, params, noise, labels, num_steps, **kw)


class ConsistencyTrainingObjective(ConsistencyObjective):
    Config = ConsistencyTrainingConfig
    display_name = "Consistency Training"
    table_order = 30

    def __init__(self, config: ConsistencyTrainingConfig, *, num_classes: int, total_steps: int):
        super().__init__(config, num_classes=num_classes)
        self.total_steps = int(total_steps)
        self.num_stages = int(np.log2(config.denoise_timesteps))  # N = 1 .. M/2

    @classmethod
    def from_spec(cls, spec) -> "ConsistencyTrainingObjective":
        return cls(spec.method, num_classes=spec.data.num_classes, total_steps=spec.train.steps)

    def stage(self, step) -> jax.Array:
        """Curriculum stage k = floor(step * K / total_steps) in 0 .. K-1 (K = log2 M)."""
        step = jnp.asarray(step, jnp.int32)
        return jnp.minimum((step * self.num_stages) // self.total_steps, self.num_stages - 1)

    def discretisation(self, step) -> jax.Array:
        """N = 2^stage at this training step."""
        return 2 ** self.stage(step)

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        x1, labels = batch["image"], batch["label"]
        k_t, k_noise, k_label = jax.random.split(key, 3)
        b = x1.shape[0]
        n = self.discretisation(ctx.step)
        t = jax.random.randint(k_t, (b,), 0, n).astype(jnp.float32) / n
        t2 = t + 1.0 / n
        x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
        x_t = interpolate(x0, x1, t)
        x_t2 = interpolate(x0, x1, t2)
        y = drop_labels(k_label, labels, cfg.class_dropout, self.null_class)
        d = jnp.full((b,), self.d_cond, jnp.float32)
        return self.consistency_targets(ctx, x_t, t, x_t2, t2, d, y)
