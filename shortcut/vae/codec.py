"""Batched, jit-compiled image <-> latent conversion with a VAE, data-parallel over the local devices."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from shortcut.evaluation.sharded_features import ShardedFeatureFn
from shortcut.vae.model import LOGVAR_RANGE, SD_VAE_FT_MSE, AutoencoderKL, VAEConfig

RANDOM_DESCRIPTION = "random reduced-width VAE (smoke test, NOT sd-vae-ft-mse)"


def _as_key(key) -> jax.Array:
    return jax.random.key(key) if isinstance(key, (int, np.integer)) else key


@jax.jit
def _sample(moments: jax.Array, key: jax.Array, first_index: jax.Array, scale: jax.Array) -> jax.Array:
    # The noise of image i depends only on (key, i), so the latents do not depend on the chunking.
    mean, logvar = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))
    idx = first_index + jnp.arange(mean.shape[0])
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), mean.shape[1:], mean.dtype))(idx)
    return (mean + std * eps) * scale


class LatentCodec:
    """``encode(images) -> scaled latents`` and ``decode(latents) -> images in [-1, 1]``, numpy in and out.

    Inputs are processed in chunks of ``batch_size`` (the last one zero-padded), so each function
    compiles once. Latents are ``scale * z`` (diffusers' ``scaling_factor``); ``decode`` divides
    by ``scale`` and clips the images to [-1, 1]. ``description`` and ``weights_sha256`` say which
    VAE this is, for run records.
    """

    def __init__(self, module: AutoencoderKL, params: Any, *, scale: float = SD_VAE_FT_MSE.scaling_factor,
                 dtype: Any = None, batch_size: int = 8, devices=None, description: str = "",
                 weights_sha256: str | None = None):
        if dtype is not None:
            module = module.clone(dtype=jnp.dtype(dtype))
        self.module, self.scale, self.batch_size = module, float(scale), int(batch_size)
        self.description, self.weights_sha256 = description, weights_sha256
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        variables = {"params": params}
        self._moments = ShardedFeatureFn(
            lambda v, x: module.apply(v, x, method="moments"), variables, devices)
        self._decode = ShardedFeatureFn(
            lambda v, z: jnp.clip(module.apply(v, z / self.scale, method="decode"), -1.0, 1.0),
            variables, devices)

    @property
    def config(self) -> VAEConfig:
        return self.module.config

    def latent_shape(self, image_shape: tuple[int, int]) -> tuple[int, int, int]:
        return self.config.latent_shape(image_shape)

    def _chunks(self, x: np.ndarray, fn: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
        outs = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start:start + self.batch_size]
            n = chunk.shape[0]
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(fn(chunk, start)[:n])
        return np.concatenate(outs)

    def _check(self, x, channels: int, what: str) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be (N, H, W, {channels}), got shape {x.shape}")
        return x

    def moments(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, H, W, C) in [-1, 1] -> the posterior's mean and log-variance (N, H/8, W/8, 4),
        unscaled (z space), logvar clipped like the posterior's. For datasets encoded once."""
        x = self._check(images, self.config.in_channels, "images")
        mean, logvar = np.split(self._chunks(x, lambda chunk, _: self._moments(chunk)), 2, axis=-1)
        return mean, np.clip(logvar, *LOGVAR_RANGE)

    def encode(self, images, key=None, *, mode: bool = False) -> np.ndarray:
        """Images (N, H, W, C) in [-1, 1] -> latents (N, H/8, W/8, 4) = scale * z.

        z is a posterior sample drawn with ``key`` (a jax key or an int seed; image i's noise
        depends only on the key and i), or the posterior mean with ``mode=True``.
        """
        x = self._check(images, self.config.in_channels, "images")
        h, w, c = self.latent_shape(x.shape[1:3])
        if x.shape[0] == 0:
            return np.zeros((0, h, w, c), np.float32)
        if mode:
            return self._chunks(x, lambda chunk, _: np.split(self._moments(chunk), 2, axis=-1)[0]) * np.float32(self.scale)
        if key is None:
            raise ValueError("encode needs a key to sample the posterior (or mode=True for its mean)")
        key = _as_key(key)
        scale = jnp.float32(self.scale)
        return self._chunks(x, lambda chunk, start: np.asarray(
            _sample(jnp.asarray(self._moments(chunk)), key, jnp.int32(start), scale)))

    def decode(self, latents) -> np.ndarray:
        """Latents (N, h, w, 4) = scale * z -> images (N, 8h, 8w, C), clipped to [-1, 1]."""
        z = self._check(latents, self.config.latent_channels, "latents")
        f = self.config.downsample_factor
        if z.shape[0] == 0:
            return np.zeros((0, z.shape[1] * f, z.shape[2] * f, self.config.out_channels), np.float32)
        return self._chunks(z, lambda chunk, _: self._decode(chunk))

    @classmethod
    def from_spec(cls, latent_spec, smoke: bool, *, batch_size: int = 8, dtype: Any = None, seed: int = 0,
                  path=None, devices=None) -> "LatentCodec":
        """The codec a ``LatentSpec`` (autoencoder, scale, downsample, channels) asks for.

        ``smoke=False`` loads the verified sd-vae-ft-mse weights (:func:`shortcut.vae.weights.load_vae_weights`);
        ``smoke=True`` uses a random reduced-width VAE (seeded, so deterministic) with the same
        downsample factor and latent channels, for tests without the weights.
        """
        from shortcut.vae.weights import load_vae_weights, random_vae

        if latent_spec.autoencoder != "sd-vae-ft-mse":
            raise ValueError(f"unknown autoencoder {latent_spec.autoencoder!r} (only 'sd-vae-ft-mse')")
        config = VAEConfig.smoke() if smoke else SD_VAE_FT_MSE
        if (latent_spec.downsample, latent_spec.channels) != (config.downsample_factor, config.latent_channels):
            raise ValueError(
                f"latent spec downsample={latent_spec.downsample}, channels={latent_spec.channels} does not match "
                f"the VAE (downsample {config.downsample_factor}, {config.latent_channels} channels)")
        if smoke:
            module, params = random_vae(config, seed)
            description, sha = f"{RANDOM_DESCRIPTION}, seed {seed}", None
        else:
            loaded = load_vae_weights(config, path, verify=True)
            module, params = AutoencoderKL(config), loaded.params
            description, sha = f"sd-vae-ft-mse ({loaded.path.name})", loaded.sha256
        return cls(module, params, scale=latent_spec.scale, dtype=dtype, batch_size=batch_size, devices=devices,
                   description=description, weights_sha256=sha)
