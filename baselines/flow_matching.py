"""Naive flow matching (the paper's "Flow Matching" row): every row gets a flow-matching target.

The network still has a d input (one architecture for every method) but is only ever conditioned on
the finest level d = 1/M, in training and in sampling at any number of steps.
"""

from __future__ import annotations

import jax

from shortcut.methods import MethodConfig
from shortcut.objective import ApplyFn, Context, Objective, Targets, euler_sample, flow_targets


class FlowMatchingConfig(MethodConfig):
    pass


class FlowMatchingObjective(Objective):
    Config = FlowMatchingConfig
    display_name = "Flow Matching"
    table_order = 20

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        return flow_targets(key, batch["image"], batch["label"], m=cfg.denoise_timesteps,
                            class_dropout=cfg.class_dropout, null_class=self.null_class)

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        """N Euler steps of size 1/N, always conditioned on d = 1/M."""
        return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=1.0 / self.config.denoise_timesteps,
                            cfg_scale=cfg_scale, null_class=self.null_class)
