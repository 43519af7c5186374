"""DiT (Peebles & Xie, 2023) conditioned on time t, step size d and class label.

The network is the velocity model s(x_t, t, d, y) of the shortcut objective. Compared with
the original DiT it has one extra conditioning input, the step size d, embedded by its own
timestep-style embedder (separate weights) and summed into the adaLN conditioning vector:
c = t_emb + d_emb + y_emb.

How d enters its embedder is set by ``DiT.d_conditioning`` (see ``d_embedder_input``):
"level" feeds k = -log2(d) (what the official code does: d = 1/128 -> 7.0, d = 1 -> 0.0);
"step_size" feeds d itself (the paper's notation). Both require d > 0.

Layouts: images are NHWC. Tokens are patches in row-major order (token index = row * gw + col),
and each token's p*p*C values are ordered (row-in-patch, col-in-patch, channel), the same
order the patch-embedding convolution reads them in.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MODEL_SIZES",
    "D_CONDITIONING_MODES",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "PatchEmbed",
    "TimestepEmbedder",
    "count_params",
    "d_embedder_input",
    "get_2d_sincos_pos_embed",
    "make_dit",
    "patchify",
    "timestep_embedding",
    "unpatchify",
]

MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, depth=3, num_heads=4, mlp_ratio=4.0),
    "S": dict(hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "B": dict(hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0),
}

D_CONDITIONING_MODES = ("level", "step_size")

# Initialisers as in DiT's PyTorch code.
_xavier = nn.initializers.xavier_uniform()
# The patch conv is initialised like a Linear over the flattened [p*p*C_in] -> hidden view,
# i.e. fan_out = hidden, not hidden * p * p as a conv-style xavier would use.
_xavier_patch = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)
_normal02 = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding (MAE / DiT formula), shape [grid_h*grid_w, embed_dim].

    Tokens are row-major. The first half of the channels encodes the column (w) coordinate,
    the second half the row (h) coordinate; each half is [sin(pos*omega), cos(pos*omega)]
    with omega_i = 10000^(-i / (embed_dim/4)). Requires embed_dim % 4 == 0.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb_w = _1d_sincos(embed_dim // 2, cols)
    emb_h = _1d_sincos(embed_dim // 2, rows)
    return np.concatenate([emb_w, emb_h], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos(t*f), sin(t*f)] of a [B] float array, in float32, shape [B, dim].

    t is used unscaled (t in [0, 1] is not multiplied by 1000), as in the official shortcut code.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def d_embedder_input(d: jax.Array, mode: str = "level") -> jax.Array:
    """Map a step size d in (0, 1] to the scalar the d-embedder sees.

    "level": k = -log2(d) (d = 1 -> 0, d = 1/128 -> 7), the official code's encoding.
    "step_size": d itself, the paper's notation. d must be > 0 in "level" mode.
    """
    d = jnp.asarray(d, jnp.float32)
    if mode == "level":
        return -jnp.log2(d)
    if mode == "step_size":
        return d
    raise ValueError(f"d_conditioning must be one of {D_CONDITIONING_MODES}, got {mode!r}")


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], the token layout of ``PatchEmbed``'s conv."""
    b, h, w, c = x.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, grid_h: int, grid_w: int) -> jax.Array:
    """Inverse of ``patchify``: [B, grid_h*grid_w, p*p*C] -> [B, grid_h*p, grid_w*p, C]."""
    b, n, f = tokens.shape
    p = patch_size
    c = f // (p * p)
    if n != grid_h * grid_w or c * p * p != f:
        raise ValueError(f"cannot unpatchify tokens {tokens.shape} with p={p}, grid {grid_h}x{grid_w}")
    x = tokens.reshape(b, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * p, grid_w * p, c)


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> hidden tokens via a stride-p conv; [B,H,W,C] -> [B,N,hidden]."""

    hidden_size: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(
            self.hidden_size, (p, p), strides=(p, p), padding="VALID",
            kernel_init=_xavier_patch, bias_init=_zeros, dtype=self.dtype, name="proj",
        )(x)
        b, gh, gw, h = x.shape
        return x.reshape(b, gh * gw, h)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid(256) -> Dense -> SiLU -> Dense, shape [B, hidden]. Used for t and for d."""

    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, s):
        x = timestep_embedding(s, self.frequency_embedding_size)
        x = nn.Dense(self.hidden_size, kernel_init=_normal02, bias_init=_zeros, dtype=self.dtype)(x)
        x = nn.silu(x)
        return nn.Dense(self.hidden_size, kernel_init=_normal02, bias_init=_zeros, dtype=self.dtype)(x)


class LabelEmbedder(nn.Module):
    """Class-label table with num_classes + 1 rows; row ``num_classes`` is the null (CFG) class."""

    num_classes: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels):
        table = nn.Embed(
            self.num_classes + 1, self.hidden_size, embedding_init=_normal02,
            dtype=self.dtype, name="embedding_table",
        )
        return table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: gated self-attention and gated MLP, modulated by c."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        h, nh = self.hidden_size, self.num_heads
        mod = nn.Dense(6 * h, kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype, name="adaLN_modulation")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod(nn.silu(c)), 6, axis=-1)

        y = nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = _modulate(y, shift_msa, scale_msa)
        # One fused qkv projection, xavier over [h, 3h] exactly as DiT/timm's Attention.
        qkv = nn.Dense(3 * h, kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, name="qkv")(y)
        b, n, _ = qkv.shape
        q, k, v = jnp.split(qkv.reshape(b, n, 3, nh, h // nh), 3, axis=2)
        y = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        y = nn.Dense(h, kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, name="proj")(y.reshape(b, n, h))
        x = x + gate_msa[:, None] * y

        y = nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = _modulate(y, shift_mlp, scale_mlp)
        y = nn.Dense(int(h * self.mlp_ratio), kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, name="fc1")(y)
        y = nn.gelu(y, approximate=True)
        y = nn.Dense(h, kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, name="fc2")(y)
        return x + gate_mlp[:, None] * y


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-initialised linear to p*p*out_channels per token."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        mod = nn.Dense(2 * self.hidden_size, kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype, name="adaLN_modulation")
        shift, scale = jnp.split(mod(nn.silu(c)), 2, axis=-1)
        x = nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=self.dtype, name="norm_final")(x)
        x = _modulate(x, shift, scale)
        p = self.patch_size
        return nn.Dense(p * p * self.out_channels, kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype, name="linear")(x)


class DiT(nn.Module):
    """Diffusion transformer conditioned on time t, step size d and class label.

    Parameters are always float32; ``dtype`` is the compute dtype (float32 or bfloat16);
    the output is always float32. The residual stream is kept in float32 as well.
    """

    hidden_size: int
    depth: int
    num_heads: int
    out_channels: int
    num_classes: int  # 0 = unconditional; the label table has num_classes + 1 rows (last = null)
    patch_size: int = 2
    mlp_ratio: float = 4.0
    d_conditioning: str = "level"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, d, labels):
        """x: [B,H,W,C]; t: [B] in [0,1]; d: [B] step size in (0,1]; labels: [B] int32
        (num_classes = null class). Returns the velocity, [B,H,W,out_channels] float32."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        b, hgt, wid, _ = x.shape
        p = self.patch_size
        if hgt % p or wid % p:
            raise ValueError(f"image size {hgt}x{wid} not divisible by patch size {p}")
        gh, gw = hgt // p, wid // p

        # Constant, not a parameter: computed with numpy from static shapes at trace time.
        pos = get_2d_sincos_pos_embed(self.hidden_size, gh, gw)
        self.sow("intermediates", "pos_embed", pos)
        h = PatchEmbed(self.hidden_size, p, dtype=self.dtype, name="x_embedder")(x)
        h = h.astype(jnp.float32) + jnp.asarray(pos)[None]

        t_emb = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder")(t)
        d_in = d_embedder_input(d, self.d_conditioning)
        d_emb = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="d_embedder")(d_in)
        y_emb = LabelEmbedder(self.num_classes, self.hidden_size, dtype=self.dtype, name="y_embedder")(labels)
        c = t_emb + d_emb + y_emb

        for i in range(self.depth):
            h = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, dtype=self.dtype, name=f"block_{i}")(h, c)
        h = FinalLayer(self.hidden_size, p, self.out_channels, dtype=self.dtype, name="final_layer")(h, c)
        return unpatchify(h.astype(jnp.float32), p, gh, gw)


def make_dit(
    size: str,
    *,
    out_channels: int,
    num_classes: int,
    patch_size: int = 2,
    d_conditioning: str = "level",
    dtype: Any = jnp.float32,
    **overrides,
) -> DiT:
    """Build a DiT of a named size ("tiny", "S", "B", "XL"); ``overrides`` replace any field."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    if d_conditioning not in D_CONDITIONING_MODES:
        raise ValueError(f"d_conditioning must be one of {D_CONDITIONING_MODES}, got {d_conditioning!r}")
    kwargs = dict(MODEL_SIZES[size])
    kwargs.update(
        out_channels=out_channels, num_classes=num_classes, patch_size=patch_size,
        d_conditioning=d_conditioning, dtype=dtype,
    )
    kwargs.update(overrides)
    return DiT(**kwargs)
