"""Diffusion (the paper's "Diffusion" row): a DDPM-style variance-preserving model sampled with DDIM (eta = 0).

Process. Diffusion time tau in [0, 1] runs from data (tau = 0) to noise (tau = 1):
    x_tau = alpha(tau) x_data + sigma(tau) eps,    alpha^2 + sigma^2 = 1,   alpha_bar = alpha^2.
Time convention. The network's time input is the framework's t = 1 - tau (t = 0 noise, t = 1 data), so
every method's network sees the same time axis and the same t values: training draws t on the grid
{0, 1/M, .., (M-1)/M} (tau in {1/M, .., 1}, i.e. M = `denoise_timesteps` DDPM timesteps), and DDIM with N
steps evaluates the network at t = i/N, all on that grid for N | M. The d input is held at the finest level
d = 1/M, as for naive flow matching.

Schedules (continuous in tau, so any grid works):
  * cosine (Nichol & Dhariwal 2021): alpha_bar = cos^2(pi/2 (tau + s)/(1 + s)) / cos^2(pi/2 s/(1 + s)), s = 0.008;
  * linear (Ho et al. 2020), as its continuous limit (Song et al. 2021): alpha_bar = exp(-(b0 tau +
    (b1 - b0) tau^2 / 2)), b0 = 0.1, b1 = 20, i.e. DDPM's betas 1e-4 .. 0.02 over 1000 steps.
  alpha_bar is clipped to >= `min_alpha_bar` so x_data = (x - sigma eps) / alpha stays finite at tau = 1
  (the cosine schedule reaches 0 there; the linear one ends at 4.3e-5, above the default clip).

Parameterisations (`prediction`): "eps" (DDPM's epsilon, loss ||eps_hat - eps||^2) or "v" (Salimans & Ho
2022: v = alpha eps - sigma x_data, loss ||v_hat - v||^2; x_data = alpha x - sigma v_hat). Both unweighted.
Default: v with the cosine schedule, the combination that stays well conditioned at few DDIM steps (with
eps a 1-step DDIM divides the network's error by alpha(1) ~ 0.003-0.007).

DDIM (Song et al. 2021, eta = 0), N steps from tau_0 = 1 to tau_N = 0, tau_i = 1 - i/N:
    x_data_hat, eps_hat from the network at (x, t = i/N);   x <- alpha(tau_{i+1}) x_data_hat + sigma(tau_{i+1}) eps_hat.
The last step lands on x_data_hat (alpha(0) = 1). N network calls (2N with classifier-free guidance, which
mixes the conditional and unconditional outputs, eps or v alike, before the update).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from shortcut.methods import MethodConfig
from shortcut.objective import ApplyFn, Context, Objective, Targets, drop_labels, expand, guided_velocity

COSINE_S = 0.008
LINEAR_BETA_MIN, LINEAR_BETA_MAX = 0.1, 20.0


class DiffusionConfig(MethodConfig):
    prediction: Literal["eps", "v"] = Field(default="v", description="what the network predicts")
    schedule: Literal["cosine", "linear"] = Field(default="cosine", description="alpha_bar(tau), see module docstring")
    min_alpha_bar: float = Field(default=1e-5, gt=0, lt=1, description="alpha_bar is clipped to at least this")


def alpha_bar(tau: jax.Array, schedule: str, min_alpha_bar: float = 0.0) -> jax.Array:
    """alpha_bar(tau) of the named schedule (tau = 0 data, tau = 1 noise), clipped to >= min_alpha_bar."""
    tau = jnp.asarray(tau, jnp.float32)
    if schedule == "cosine":
        f = lambda s: jnp.cos(jnp.pi / 2 * (s + COSINE_S) / (1 + COSINE_S)) ** 2
        ab = f(tau) / f(jnp.zeros(()))
    elif schedule == "linear":
        ab = jnp.exp(-(LINEAR_BETA_MIN * tau + 0.5 * (LINEAR_BETA_MAX - LINEAR_BETA_MIN) * tau**2))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return jnp.clip(ab, min_alpha_bar, 1.0)


class DiffusionObjective(Objective):
    Config = DiffusionConfig
    groups = ("diffusion",)
    display_name = "Diffusion"
    table_order = 10

    def alpha_sigma(self, tau: jax.Array) -> tuple[jax.Array, jax.Array]:
        ab = alpha_bar(tau, self.config.schedule, self.config.min_alpha_bar)
        return jnp.sqrt(ab), jnp.sqrt(1 - ab)

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        data, labels = batch["image"], batch["label"]
        k_t, k_noise, k_label = jax.random.split(key, 3)
        b, m = data.shape[0], cfg.denoise_timesteps
        t = jax.random.randint(k_t, (b,), 0, m).astype(jnp.float32) / m
        alpha, sigma = (expand(a, data) for a in self.alpha_sigma(1 - t))
        eps = jax.random.normal(k_noise, data.shape, data.dtype)
        x = alpha * data + sigma * eps
        target = eps if cfg.prediction == "eps" else alpha * eps - sigma * data
        return Targets(x, t, jnp.full((b,), 1.0 / m, jnp.float32),
                       drop_labels(k_label, labels, cfg.class_dropout, self.null_class), target,
                       jnp.zeros((b,), jnp.int32))

    def predict(self, x: jax.Array, out: jax.Array, tau: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x_data_hat, eps_hat) from the network output at diffusion time tau ([B])."""
        alpha, sigma = (expand(a, x) for a in self.alpha_sigma(tau))
        if self.config.prediction == "eps":
            return (x - sigma * out) / alpha, out
        return alpha * x - sigma * out, sigma * x + alpha * out

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        """DDIM (eta = 0) with N steps, tau = 1 - i/N; network at t = i/N, d = 1/M."""
        b, n = noise.shape[0], num_steps
        d = jnp.full((b,), 1.0 / self.config.denoise_timesteps, jnp.float32)

        def step(i, x):
            t = jnp.full((b,), i / n, jnp.float32)
            out = guided_velocity(apply_fn, params, x, t, d, labels, cfg_scale, self.null_class)
            x_data, eps = self.predict(x, out, 1 - t)
            alpha, sigma = (expand(a, x) for a in self.alpha_sigma(1 - (t + 1.0 / n)))
            return alpha * x_data + sigma * eps

        return jax.lax.fori_loop(0, n, step, noise)
