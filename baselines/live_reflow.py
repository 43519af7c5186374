"""Live reflow (the paper's "Live Reflow" row): reflow pairs regenerated online, in one training phase.

Each batch is split like the shortcut objective's (official targets_livereflow.py, checked):
  * the first `reflow_fraction` of the rows (default 0.25, the paper's Table 3 empirical:bootstrap
    0.75:0.25; the official code uses 1/8, as do the CelebA-HQ / ImageNet specs) get reflow targets:
    fresh noise z is carried to a sample x by `generation_steps` (8) Euler steps of the current model
    (online parameters, as in the official code; `generation_ema` for the EMA ones), conditioned on
    the finest level d = 1/M, with the rows' true labels and guidance `generation_cfg_scale`
    (1 = none); then t uniform on the 1/M grid, x_t = (1 - t) z + t x, target v = x - z
    (stop-gradient), conditioned on the coarsest step d = 1 and the true labels (no dropout, as in
    the official code);
  * the rest get flow-matching targets (t on the 1/M grid, d = 1/M, labels dropped with class_dropout).
The reflow rows use their own noise, independent of the flow rows' (the official code reuses the flow
rows' noise draw for them).

Sampling (`sample_level`), N Euler steps of size 1/N; only d = 1 (reflow rows) and d = 1/M (flow rows)
are trained, and the official code conditions the steps in two different ways:
  * `step_size` (default): each step conditioned on d = 1/N, like the shortcut model (the official
    inference script, helper_inference.py). Levels between 1 and 1/M were never trained, which is
    part of what this baseline measures.
  * `trained`: every N < M conditioned on the reflow level d = 1, N = M on d = 1/M (the official
    training-time evaluation, helper_eval.py, the FIDs its training runs log); the CelebA-HQ and
    ImageNet specs use it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from shortcut.methods import MethodConfig
from shortcut.objective import ApplyFn, Context, Objective, Targets, euler_sample, flow_targets, interpolate


class LiveReflowConfig(MethodConfig):
    reflow_fraction: float = Field(default=0.25, gt=0, lt=1, description="share of each batch with reflow targets")
    generation_steps: int = Field(default=8, ge=1, description="Euler steps that generate the online pairs")
    generation_cfg_scale: float = Field(default=1.0, description="guidance when generating the pairs (1 = none)")
    generation_ema: bool = Field(default=False, description="generate with the EMA (else online) parameters")
    sample_level: Literal["step_size", "trained"] = Field(
        default="step_size", description="sampling with N steps: step_size conditions each on d = 1/N (official "
        "inference script); trained conditions N < M on the reflow level d = 1 (official training-time evaluation)")


class LiveReflowObjective(Objective):
    Config = LiveReflowConfig
    display_name = "Live Reflow"
    table_order = 40
    groups = ("flow", "reflow")

    def reflow_size(self, batch_size: int) -> int:
        return max(1, int(round(batch_size * self.config.reflow_fraction)))

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        images, labels = batch["image"], batch["label"]
        m = cfg.denoise_timesteps
        nr = self.reflow_size(images.shape[0])
        k_flow, k_noise, k_t = jax.random.split(key, 3)
        flow = flow_targets(k_flow, images[nr:], labels[nr:], m=m, class_dropout=cfg.class_dropout,
                            null_class=self.null_class)

        y = labels[:nr]
        z = jax.random.normal(k_noise, images[:nr].shape, images.dtype)
        params = ctx.ema_params if cfg.generation_ema else ctx.params
        x = jax.lax.stop_gradient(euler_sample(ctx.apply_fn, params, z, y, cfg.generation_steps, d_cond=1.0 / m,
                                               cfg_scale=cfg.generation_cfg_scale, null_class=self.null_class))
        t = jax.random.randint(k_t, (nr,), 0, m).astype(jnp.float32) / m
        x_t = interpolate(z, x, t)
        reflow = Targets(x_t, t, jnp.ones((nr,), jnp.float32), y, x - z, jnp.ones((nr,), jnp.int32))
        return Targets(*(jnp.concatenate([a, f]) for a, f in zip(reflow[:6], flow[:6])))

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        """N Euler steps, conditioned on d = 1/N, or on d = 1 for N < M with `sample_level: trained`."""
        m = self.config.denoise_timesteps
        d_cond = 1.0 if self.config.sample_level == "trained" and num_steps < m else 1.0 / num_steps
        return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=d_cond, cfg_scale=cfg_scale,
                            null_class=self.null_class)
