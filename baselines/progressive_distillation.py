"""Progressive distillation (Salimans & Ho 2022; the paper's "Progressive Distillation" row).

From a trained flow-matching teacher (`teacher: digits_flow` in the spec, loaded by shortcut/teacher.py),
K = log2(M) stages halve the step count M -> M/2 -> .. -> 1 (128 -> 1 in 7 stages for M = 128). Stage k
covers training steps [k T / K, (k+1) T / K) of T = train.steps (stage = floor(step K / T), as in the
official code), and its student learns N_k = M / 2^(k+1) steps of size d = 1/N_k:

    t uniform on {0, d, .., 1 - d}, x_t = (1 - t) x0 + t x1
    v1 = teacher(x_t, t);  x' = clip(x_t + (d/2) v1);  v2 = teacher(x', t + d/2);  v = (v1 + v2) / 2

i.e. one student step reproduces two teacher half-steps. The teacher of stage 0 is the flow model (its EMA
parameters, whose Euler step size 1/M is exactly d/2); at every stage boundary the teacher is refreshed to
the current student (its EMA parameters, `refresh_with_ema`; the official code copies the whole train
state and queries its EMA). The student is not reset between stages and starts from the teacher's weights
(`init_from_teacher`). The teacher lives in the objective's `aux` (init_aux / next_aux), which is in the
checkpointed train state, so a killed run resumes inside its stage with the right teacher.

Conditioning: student and teacher are always conditioned on d = 1/M (the official code builds this
baseline with `ignore_dt`), so stage 0 starts exactly at the teacher's function and each refreshed teacher
is queried at the input it was trained on. Sampling: N Euler steps of 1/N with d = 1/M; the final student
is a 1-step model, so N = 1 is the setting it was distilled for. Labels: dropped to the null class with
`class_dropout`; the teacher sees the same label.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from shortcut.methods import MethodConfig
from shortcut.objective import ApplyFn, Context, Objective, Targets, drop_labels, euler_sample, interpolate

from baselines.consistency_distillation import require_teacher


class ProgressiveDistillationConfig(MethodConfig):
    init_from_teacher: bool = Field(default=True, description="the student starts from the teacher's weights")
    refresh_with_ema: bool = Field(default=True, description="the refreshed teacher is the student's EMA "
                                   "(else its online) parameters")
    teacher_clip: float | None = Field(default=4.0, gt=0, description="clip the intermediate point (official: 4)")


class ProgressiveDistillationObjective(Objective):
    Config = ProgressiveDistillationConfig
    groups = ("distill",)
    display_name = "Progressive Distillation"
    table_order = 60

    @property
    def init_from_teacher(self) -> bool:
        return self.config.init_from_teacher

    def __init__(self, config: ProgressiveDistillationConfig, *, num_classes: int, total_steps: int):
        super().__init__(config, num_classes=num_classes)
        self.total_steps = int(total_steps)
        self.num_stages = int(np.log2(config.denoise_timesteps))  # with fewer train steps, some stages are skipped

    @classmethod
    def from_spec(cls, spec) -> "ProgressiveDistillationObjective":
        return cls(spec.method, num_classes=spec.data.num_classes, total_steps=spec.train.steps)

    @property
    def d_cond(self) -> float:
        return 1.0 / self.config.denoise_timesteps

    def stage(self, step) -> jax.Array:
        """Stage k = floor(step * K / total_steps) in 0 .. K-1 at training step `step` (steps done so far)."""
        step = jnp.asarray(step, jnp.int32)
        return jnp.minimum((step * self.num_stages) // self.total_steps, self.num_stages - 1)

    def student_steps(self, step) -> jax.Array:
        """N_k = M / 2^(k+1): the student's step count in the stage of training step `step`."""
        return 2 ** (self.num_stages - 1 - self.stage(step))

    def init_aux(self, params, teacher_params=None) -> Any:
        """aux = the current teacher's parameters; at first the flow teacher's EMA parameters."""
        return require_teacher(self.config.name, teacher_params)

    def next_aux(self, aux, *, params, step: jax.Array, ema_params=None) -> Any:
        """After `step` optimizer steps: at a stage boundary the teacher becomes the current student."""
        new = ema_params if self.config.refresh_with_ema else params
        if new is None:
            raise ValueError("refresh_with_ema needs the EMA parameters in next_aux")
        boundary = self.stage(step) != self.stage(step - 1)
        return jax.lax.cond(boundary, lambda: jax.tree.map(jnp.copy, new), lambda: aux)

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        x1, labels = batch["image"], batch["label"]
        k_t, k_noise, k_label = jax.random.split(key, 3)
        b = x1.shape[0]
        n = self.student_steps(ctx.step)
        t = jax.random.randint(k_t, (b,), 0, n).astype(jnp.float32) / n
        half = 0.5 / n.astype(jnp.float32)
        x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
        x_t = interpolate(x0, x1, t)
        y = drop_labels(k_label, labels, cfg.class_dropout, self.null_class)
        d = jnp.full((b,), self.d_cond, jnp.float32)
        v1 = ctx.apply_fn(ctx.aux, x_t, t, d, y)
        x_mid = x_t + half * v1
        if cfg.teacher_clip is not None:
            x_mid = jnp.clip(x_mid, -cfg.teacher_clip, cfg.teacher_clip)
        v2 = ctx.apply_fn(ctx.aux, x_mid, t + half, d, y)
        v = jax.lax.stop_gradient((v1 + v2) / 2)
        return Targets(x_t, t, d, y, v, jnp.zeros((b,), jnp.int32))

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=self.d_cond, cfg_scale=cfg_scale,
                            null_class=self.null_class)
