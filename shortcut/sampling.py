"""Batched, jit-compiled generation with any objective's sampler, EMA parameters by default."""

from __future__ import annotations

import functools
from typing import Callable, Iterator

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


def sample_labels(start: int, count: int, num_classes: int) -> np.ndarray:
    """Intended classes cycle 0..C-1 (so grids show every class); unconditional data uses the null class 0."""
    if num_classes == 0:
        return np.zeros((count,), np.int32)
    return (np.arange(start, start + count) % num_classes).astype(np.int32)


def generate(sampler: Callable, params, *, shape: tuple[int, ...], num_classes: int, num_samples: int,
             batch_size: int, num_steps: int, cfg_scale: float, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (samples, intended labels) batches. Sample i's noise depends only on (seed, i), so every
    step count starts from the same noise and a resumed generation reproduces the same samples."""
    key = jax.random.PRNGKey(seed)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + batch_size))
        noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
        labels = jnp.asarray(sample_labels(start, batch_size, num_classes))
        out = sampler(params, noise, labels, num_steps=num_steps, cfg_scale=cfg_scale)
        yield np.asarray(out[:n]), np.asarray(labels[:n])
