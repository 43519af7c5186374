"""Reflow (Liu et al. 2023, 2-rectified flow; the paper's "Reflow" row).

Three stages, all declared by the spec:
  1. the teacher (`teacher: digits_flow`), a trained flow-matching model, trained first by the driver's graph
     and loaded by shortcut/teacher.py;
  2. a stored dataset of `num_pairs` (noise, sample, label) triples, generated with the teacher's own
     sampler at `pair_steps` steps (M = 128 by default) in chunks of `pair_chunk_size` under
     <run dir>/pairs/, resumable after a kill (finished chunks are kept): the objective's `training_data`,
     baselines/reflow_pairs.py;
  3. flow matching on the pairs: the batch's "image" is the teacher's sample and "noise" the noise it was
     generated from, so x_t = (1 - t) noise + t sample and v = sample - noise (t on the 1/M grid,
     d = 1/M). The student starts from the teacher's weights (`init_from_teacher`), as in Liu et al.

Labels: pair i is generated for the class i mod C (unconditional data: the null class), with guidance
`pair_cfg_scale` (1 = none); during training labels are dropped to the null class with `class_dropout`
like in flow matching, so the student learns a conditional and an unconditional reflowed field.
Sampling: N Euler steps with d = 1/M (as naive flow matching); N network calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from pydantic import Field, ValidationInfo, field_validator

from shortcut.methods import MethodConfig
from shortcut.objective import ApplyFn, Context, Objective, Targets, drop_labels, euler_sample, interpolate

from baselines import reflow_pairs


class ReflowConfig(MethodConfig):
    num_pairs: int = Field(default=16384, ge=2, description="size of the generated (noise, sample) dataset")
    pair_chunk_size: int = Field(default=2048, ge=1, description="pairs generated (and saved) per chunk")
    pair_steps: int | None = Field(default=None, ge=1, description="teacher sampling steps; None = M")
    pair_cfg_scale: float = Field(default=1.0, description="guidance when generating the pairs (1 = none)")
    init_from_teacher: bool = Field(default=True, description="the student starts from the teacher's weights")

    @field_validator("pair_steps")
    @classmethod
    def _pair_steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        m = info.data.get("denoise_timesteps", 128)
        if steps is not None and (steps > m or steps & (steps - 1)):
            raise ValueError(f"must be a power of two <= M={m}")
        return steps


class ReflowObjective(Objective):
    Config = ReflowConfig
    display_name = "Reflow"
    table_order = 80

    @property
    def init_from_teacher(self) -> bool:
        return self.config.init_from_teacher

    @property
    def teacher_in_student_network(self) -> bool:
        return self.config.init_from_teacher  # else the teacher only samples the pairs, with its own network

    def training_data(self, dataset, *, spec, teacher, rundir, log):
        """The teacher's generated pairs (baselines/reflow_pairs.py), not the dataset."""
        return reflow_pairs.training_data(spec, teacher, rundir, log=log)

    def batch_inputs(self, image, label) -> dict:
        return {"image": image, "label": label, "noise": image}  # each pair's noise, shaped like its sample

    def preparation_flops(self, spec, teacher) -> dict[str, float | None]:
        return {"pairs_flops": reflow_pairs.pairs_flops(spec, teacher)}

    @staticmethod
    def smoke_method(method: dict) -> dict:
        """--smoke: a pair dataset of two smoke batches (the smoke batch size is 8)."""
        return dict(method, num_pairs=16, pair_chunk_size=8)

    @property
    def pair_steps(self) -> int:
        return self.config.pair_steps or self.config.denoise_timesteps

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        x1, x0, labels = batch["image"], batch["noise"], batch["label"]
        k_t, k_label = jax.random.split(key)
        b, m = x1.shape[0], cfg.denoise_timesteps
        t = jax.random.randint(k_t, (b,), 0, m).astype(jnp.float32) / m
        x_t = interpolate(x0, x1, t)
        return Targets(x_t, t, jnp.full((b,), 1.0 / m, jnp.float32),
                       drop_labels(k_label, labels, cfg.class_dropout, self.null_class), x1 - x0,
                       jnp.zeros((b,), jnp.int32))

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=1.0 / self.config.denoise_timesteps,
                            cfg_scale=cfg_scale, null_class=self.null_class)
