"""A Flax (linen) port of diffusers' ``AutoencoderKL``, the Stable Diffusion "kl-f8" VAE.

The layout of the network and the names of its parameters follow diffusers (``encoder.down_blocks.0
.resnets.1.conv1`` becomes ``encoder/down_blocks_0/resnets_1/conv1``), so a diffusers state dict maps
onto the Flax params by renaming and transposing (see :mod:`shortcut.vae.weights`). Tensors are
NHWC; images are in [-1, 1].

``dtype`` is the compute dtype (float32 or bfloat16); parameters are always float32. GroupNorm
statistics, the attention softmax and the returned moments / images are float32 in either case.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

GROUP_NORM_EPS = 1e-6  # diffusers' resnet_eps for every VAE norm
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture of an ``AutoencoderKL`` (the fields of a diffusers ``config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 256
    scaling_factor: float = 0.18215
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4

    SD_VAE_FT_MSE: ClassVar["VAEConfig"]

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n or self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(
                f"only {n} DownEncoderBlock2D / UpDecoderBlock2D blocks are supported, got "
                f"{self.down_block_types} / {self.up_block_types}"
            )
        if self.act_fn != "silu":
            raise ValueError(f"only act_fn='silu' is supported, got {self.act_fn!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int]) -> tuple[int, int, int]:
        """(h, w, latent_channels) of the latent of an (H, W) image."""
        f = self.downsample_factor
        h, w = image_shape
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the VAE's downsample factor {f}")
        return h // f, w // f, self.latent_channels

    @classmethod
    def smoke(cls) -> "VAEConfig":
        """Narrow VAE with the real structure (4 blocks, factor 8, 4 latent channels), for CPU tests."""
        return cls(block_out_channels=(8, 8, 16, 16), norm_num_groups=4)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> "VAEConfig":
        """Build from a diffusers ``config.json`` dict (unknown keys are ignored)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in config:
                value = config[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


SD_VAE_FT_MSE = VAEConfig()  # stabilityai/sd-vae-ft-mse, config.json of revision 31f26fde
VAEConfig.SD_VAE_FT_MSE = SD_VAE_FT_MSE


def _group_norm(cfg: VAEConfig, dtype, name: str) -> nn.GroupNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2, which loses precision on
    # the decoder's large activations.
    return nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=GROUP_NORM_EPS, dtype=dtype,
                        use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: GN-SiLU-conv twice, plus the (1x1) shortcut."""

    cfg: VAEConfig
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.cfg, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(_group_norm(self.cfg, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """The mid-block self-attention: one head over the H*W positions, GroupNorm first, residual added."""

    cfg: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _group_norm(self.cfg, self.dtype, "group_norm")(x).reshape(b, hgt * wid, c)
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(h)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(h)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v)
        h = nn.Dense(c, dtype=self.dtype, name="to_out_0")(h)
        return x + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv with no padding (diffusers' ``padding=0`` case)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    cfg: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(self.cfg, c, self.dtype, name="resnets_0")(x)
        x = Attention(self.cfg, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.cfg, c, self.dtype, name="resnets_1")(x)


class DownBlock(nn.Module):
    """diffusers ``DownEncoderBlock2D``: ``layers_per_block`` resnets, then an optional Downsample."""

    cfg: VAEConfig
    out_channels: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.cfg.layers_per_block):
            x = ResnetBlock(self.cfg, self.out_channels, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpBlock(nn.Module):
    """diffusers ``UpDecoderBlock2D``: ``layers_per_block + 1`` resnets, then an optional Upsample."""

    cfg: VAEConfig
    out_channels: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.cfg.layers_per_block + 1):
            x = ResnetBlock(self.cfg, self.out_channels, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels), before quant_conv."""

    cfg: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = _conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownBlock(cfg, channels, i != last, self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, self.dtype, name="mid_block")(x)
        x = nn.silu(_group_norm(cfg, self.dtype, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Latent (B, h, w, latent_channels), after post_quant_conv -> image (B, h*f, w*f, out_channels)."""

    cfg: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.cfg
        x = _conv(cfg.block_out_channels[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = MidBlock(cfg, self.dtype, name="mid_block")(x)
        reversed_channels = cfg.block_out_channels[::-1]
        last = len(reversed_channels) - 1
        for i, channels in enumerate(reversed_channels):
            x = UpBlock(cfg, channels, i != last, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(cfg, self.dtype, "conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (a pytree; float32)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split (..., 2L) moments into mean (first L channels) and logvar, clipped like diffusers."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x`` (unscaled latents).

    Use with ``module.apply(params, x, method="encode")``. Calling the module runs
    ``decode(encode(x).mode())`` (which also creates every parameter, for ``init``).
    """

    config: VAEConfig = SD_VAE_FT_MSE
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, None)
        self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, None)

    def moments(self, x: jax.Array) -> jax.Array:
        """Images (B, H, W, C) in [-1, 1] -> float32 (B, H/8, W/8, 2 * latent_channels): mean, then raw logvar."""
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B, H, W, C) in [-1, 1] -> the posterior over latents (B, H/8, W/8, latent_channels)."""
        return DiagonalGaussian.from_moments(self.moments(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent_channels) -> images (B, 8h, 8w, C), float32, not clipped."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x).mode())


def init_params(config: VAEConfig, seed: int = 0) -> dict:
    """Random float32 params for ``config``: kernels N(0, 1/fan_in), biases 0, norm scales 1.

    Drawn with numpy from ``param_shapes`` (fast, and the same on every platform) rather than by
    tracing ``init``, which takes seconds to compile.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))
        return jnp.ones(leaf.shape, jnp.float32) if name == "scale" else jnp.zeros(leaf.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


@functools.lru_cache(maxsize=8)
def param_shapes(config: VAEConfig) -> dict:
    """The params tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]
