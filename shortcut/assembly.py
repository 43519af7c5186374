"""One place that turns a spec into the parts of a run: network, objective, optimiser, sampler, codec, and
its teacher's parts.

Every caller (a run, `generate`, `import_checkpoint`, the memory check and plan, the benchmarks) builds
through `build(spec)`, so none of them can assemble a run differently; a run builds them once and hands the
same parts to its memory check, its training and its teacher (whose network and sampler are `teacher`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from shortcut import methods
from shortcut.sampling import make_sampler
from shortcut.spec import Spec
from shortcut.train import build_model, make_apply_fn, make_optimizer


@dataclasses.dataclass(frozen=True)
class Parts:
    spec: Spec
    model: Any  # the DiT (flax module)
    apply_fn: Callable  # (params, x, t, d, labels) -> velocity
    objective: Any  # the method's Objective
    optimizer: Any  # optax GradientTransformation (AdamW, optional clipping)
    sampler: Callable  # sampler(params, noise, labels, num_steps=, cfg_scale=) -> samples

    @functools.cached_property
    def codec(self):
        """The VAE of a latent spec (a random reduced-width one under --smoke), None for pixel specs; built on
        first use (loading sd-vae-ft-mse's weights is not free)."""
        lat = self.spec.data.latent
        if lat is None:
            return None
        from shortcut.vae import LatentCodec

        return LatentCodec.from_spec(lat, self.spec.smoke, batch_size=lat.batch_size, seed=self.spec.seed,
                                     path=lat.weights)

    @functools.cached_property
    def teacher(self) -> "Parts | None":
        """The parts of the spec's teacher (its network, objective and sampler), None without one."""
        teacher = self.spec.teacher_spec()
        return None if teacher is None else build(teacher)


def build(spec: Spec) -> Parts:
    """The parts of a run of `spec`."""
    model = build_model(spec)
    apply_fn = make_apply_fn(model)
    objective = methods.make_objective(spec)
    return Parts(spec, model, apply_fn, objective, make_optimizer(spec.optimizer), make_sampler(objective, apply_fn))
