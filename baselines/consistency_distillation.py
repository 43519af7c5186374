"""Consistency distillation (Song et al. 2023; the paper's "Consistency Distillation" row).

Needs a trained flow-matching teacher: the spec names it (`teacher: digits_flow`), the run loads it
(shortcut/teacher.py) and its EMA parameters arrive through `init_aux` (kept in the checkpointed state).
The student starts from the teacher's weights (`init_from_teacher`, as the official code loads the
teacher checkpoint into the student).

Targets (official code, checked), with t on {0, 1/M, .., (M-1)/M} and dt = 1/M:
    x_t = (1 - t) x0 + t x1
    x_t2 = clip(x_t + dt * teacher(x_t, t))                  one Euler step of the teacher
    f_target = x_t2 + (1 - t - dt) * s_ema(x_t2, t + dt)      the EMA student's endpoint at the next point
    v = (f_target - x_t) / (1 - t)                            (stop-gradient)
with the consistency function f(x, t) = x + (1 - t) s(x, t) and the loss expressed in v-space exactly as
in baselines/consistency_training.py (`loss_space` "f" weights rows by (1 - t)^2). Teacher and student
are conditioned on d = 1/M, the teacher's own level. Labels are dropped to the null class with
`class_dropout` and the teacher sees the same (possibly null) label.

Sampling: multistep consistency sampling by default (see consistency_training.py); the official code
sampled this baseline with Euler steps (`sampler: euler`). Both make N network calls.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from pydantic import Field

from baselines.consistency_training import ConsistencyConfig, ConsistencyObjective
from shortcut.objective import Context, Targets, drop_labels, interpolate


class ConsistencyDistillationConfig(ConsistencyConfig):
    init_from_teacher: bool = Field(default=True, description="the student starts from the teacher's weights")
    teacher_clip: float | None = Field(default=4.0, gt=0, description="clip the teacher's Euler step (official: 4)")


def require_teacher(name: str, teacher_params) -> Any:
    """A copy of the teacher's parameters (the train step donates the state that will hold them)."""
    if teacher_params is None:
        raise ValueError(f"method {name} needs a trained teacher: name its spec with `teacher:` in the spec "
                         "(e.g. `teacher: digits_flow`)")
    return jax.tree.map(lambda a: jnp.array(a, copy=True), teacher_params)


class ConsistencyDistillationObjective(ConsistencyObjective):
    Config = ConsistencyDistillationConfig
    display_name = "Consistency Distillation"
    table_order = 70

    @property
    def init_from_teacher(self) -> bool:
        return self.config.init_from_teacher

    def init_aux(self, params, teacher_params=None) -> Any:
        """aux = the teacher's (EMA) parameters, fixed for the whole run."""
        return require_teacher(self.config.name, teacher_params)

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        x1, labels = batch["image"], batch["label"]
        k_t, k_noise, k_label = jax.random.split(key, 3)
        b, m = x1.shape[0], cfg.denoise_timesteps
        dt = 1.0 / m
        t = jax.random.randint(k_t, (b,), 0, m).astype(jnp.float32) / m
        x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
        x_t = interpolate(x0, x1, t)
        y = drop_labels(k_label, labels, cfg.class_dropout, self.null_class)
        d = jnp.full((b,), self.d_cond, jnp.float32)
        x_t2 = x_t + dt * ctx.apply_fn(ctx.aux, x_t, t, d, y)
        if cfg.teacher_clip is not None:
            x_t2 = jnp.clip(x_t2, -cfg.teacher_clip, cfg.teacher_clip)
        return self.consistency_targets(ctx, x_t, t, x_t2, t + dt, d, y)
