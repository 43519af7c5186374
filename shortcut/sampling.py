"""Batched, jit-compiled generation with any objective's sampler, EMA parameters by default."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shortcut.objective import ApplyFn, Objective


def make_sampler(objective: Objective, apply_fn: ApplyFn) -> Callable:
    """(params, noise, labels, num_steps, cfg_scale) -> samples, compiled once per (shape, N, w)."""

    @functools.partial(jax.jit, static_argnames=("num_steps", "cfg_scale"))
    def sample(params, noise, labels, num_steps: int, cfg_scale: float = 1.0):
        return objective.sample(apply_fn, params, noise, labels, num_steps, cfg_scale=cfg_scale)

    return sample


def sample_labels(start: int, count: int, num_classes: int, classes: Sequence[int] | None = None) -> np.ndarray:
    """Intended classes cycle 0..C-1 (so grids show every class), or through `classes` when given;
    unconditional data uses the null class 0."""
    if num_classes == 0:
        return np.zeros((count,), np.int32)
    cycle = np.arange(num_classes) if classes is None else np.asarray(classes)
    return cycle[np.arange(start, start + count) % len(cycle)].astype(np.int32)


def noise_for(start: int, count: int, shape: tuple[int, ...], seed: int, stream: int | None = None) -> jax.Array:
    """Starting noise of samples start..start+count-1: sample i's noise depends only on (seed, i), so
    every step count and every method starts from the same noise, and a resumed job regenerates
    exactly the samples it is missing. `stream`, folded into the seed, draws another such sequence (a
    method's own noise, never equal to the evaluation's)."""
    key = jax.random.PRNGKey(seed)
    if stream is not None:
        key = jax.random.fold_in(key, stream)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + count))
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def sample_range(sampler: Callable, params, start: int, count: int, *, shape: tuple[int, ...], num_classes: int,
                 num_steps: int, cfg_scale: float, seed: int,
                 classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples start..start+count-1 and their intended labels (see sample_labels), as numpy arrays."""
    labels = sample_labels(start, count, num_classes, classes)
    out = sampler(params, noise_for(start, count, shape, seed), jnp.asarray(labels), num_steps=num_steps,
                  cfg_scale=cfg_scale)
    return np.asarray(out), labels
