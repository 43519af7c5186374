"""DiT (Peebles & Xie, 2023) conditioned on time t, step size d and class label.

The network is the velocity model s(x_t, t, d, y) of the shortcut objective. Compared with
the original DiT it has one extra conditioning input, the step size d, embedded by its own
timestep-style embedder (separate weights) and summed into the adaLN conditioning vector:
c = t_emb + d_emb + y_emb.

Extra conditioning (``DiT.conditioning``): a method may ask for more scalar inputs (e.g. the guidance
scale w of improved MeanFlow), passed as ``cond={name: [B] values}``. Each has its own embedder like
t's, summed into c after the others, with its output layer zero-initialised: a new input changes
nothing until trained, and a network that asks for none has exactly today's parameters and outputs.
``DiT.log_variance`` adds the parameters of a learned loss log-variance u(t) (EDM2's uncertainty
weighting, used by sCT / sCD), read by ``loss_log_variance(params, t)``; the velocity never uses them.

How d enters its embedder is set by ``DiT.d_conditioning`` (see ``d_embedder_input``):
"level" feeds k = -log2(d) (what the official code does: d = 1/128 -> 7.0, d = 1 -> 0.0);
"step_size" feeds d itself (the paper's notation). Both require d > 0.

``DiT.architecture`` picks one of two networks with the same inputs and outputs:
"dit" is the standard DiT (adaLN-Zero, fused qkv, 1/sqrt(head_dim) attention, float32 residual
stream); "official" computes the function of the official shortcut code's ``model.DiT``
(kvfrans/shortcut-models @6010043): attention logits scaled by 1/head_dim with the softmax in
float32, separate q/k/v projections, xavier (not zero) adaLN kernels in the blocks, the residual
stream in the compute dtype and the t/d embedders' second layer and the conditioning in float32.
Its parameter tree is the official one renamed (orchestration/import_checkpoint.py maps it),
without the official ``Embed_0`` (a log-variance table the official network builds but never uses
in its output).

Attention runs in jax's fused cuDNN kernel on a CUDA GPU when it supports the call (see
``attention_implementation``) and in XLA otherwise; the XLA path of "official" is the official
code's own order of operations, so on CPU the two networks match the official one to rounding.

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
    "ARCHITECTURES",
    "MODEL_SIZES",
    "D_CONDITIONING_MODES",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "PatchEmbed",
    "TimestepEmbedder",
    "attention",
    "attention_implementation",
    "count_params",
    "example_inputs",
    "is_added_input",
    "loss_log_variance",
    "d_embedder_input",
    "default_platform",
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
ARCHITECTURES = ("official", "dit")


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


def _1d_sincos(embed_dim: int, pos, xp, dtype):
    omega = xp.arange(embed_dim // 2, dtype=dtype) / dtype(embed_dim / 2.0)
    omega = 1.0 / dtype(10000.0) ** omega
    out = pos.reshape(-1).astype(dtype)[:, None] * omega[None]
    return xp.concatenate([xp.sin(out), xp.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, in_float32: bool = False):
    """Fixed 2-D sin-cos positional embedding (MAE / DiT formula), shape [grid_h*grid_w, embed_dim].

    Tokens are row-major. The first half of the channels encodes the column (w) coordinate,
    the second half the row (h) coordinate; each half is [sin(pos*omega), cos(pos*omega)]
    with omega_i = 10000^(-i / (embed_dim/4)). Requires embed_dim % 4 == 0.
    Computed with numpy in float64 and returned as float32; with ``in_float32``, computed by jax in
    float32 throughout, as the official code does (it differs by up to ~1e-6).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos, got {embed_dim}")
    xp, dtype = (jnp, jnp.float32) if in_float32 else (np, np.float64)
    rows, cols = xp.meshgrid(xp.arange(grid_h), xp.arange(grid_w), indexing="ij")
    emb_w = _1d_sincos(embed_dim // 2, cols, xp, dtype)
    emb_h = _1d_sincos(embed_dim // 2, rows, xp, dtype)
    return xp.concatenate([emb_w, emb_h], axis=1).astype(np.float32)


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


def default_platform() -> str:
    """The default backend as "cuda", "rocm", "cpu" or "tpu" (jax calls both GPU kinds "gpu")."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return backend


def attention_implementation(platform: str, dtype: Any, head_dim: int) -> str:
    """"cudnn" (jax's fused cuDNN attention) where it supports the call: a CUDA GPU, float16/bfloat16
    inputs, head_dim a multiple of 8 and at most 128 (the limit before Hopper); "xla" otherwise."""
    fused_dtype = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform == "cuda" and fused_dtype and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, architecture: str = "dit",
              implementation: str = "xla") -> jax.Array:
    """Multi-head self-attention of [B, N, heads, head_dim] q, k, v (output of the same shape).

    "dit" scales the logits by 1/sqrt(head_dim), "official" by 1/head_dim. The "xla" path of
    "official" keeps the official order of operations (q divided in the compute dtype, logits cast
    to float32 for the softmax, probabilities times v in float32); "cudnn" computes the same
    function in one fused kernel, to the rounding of its bfloat16 inputs.
    """
    scale = 1.0 / q.shape[-1] if architecture == "official" else 1.0 / math.sqrt(q.shape[-1])
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"attention implementation must be xla or cudnn, got {implementation!r}")
    if architecture == "official":
        logits = jnp.einsum("bqhc,bkhc->bhqk", q / q.shape[-1], k).astype(jnp.float32)
        return jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


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
    out_dtype: Any = None  # the second layer's compute dtype; None: `dtype`
    zero_init: bool = False  # the second layer starts at zero (an extra input that changes nothing until trained)

    @nn.compact
    def __call__(self, s):
        x = timestep_embedding(s, self.frequency_embedding_size)
        x = nn.Dense(self.hidden_size, kernel_init=_normal02, bias_init=_zeros, dtype=self.dtype)(x)
        x = nn.silu(x)
        out_dtype = self.dtype if self.out_dtype is None else self.out_dtype
        return nn.Dense(self.hidden_size, kernel_init=_zeros if self.zero_init else _normal02, bias_init=_zeros,
                        dtype=out_dtype)(x)


class LogVariance(nn.Module):
    """A learned scalar function u(s) = Dense(sinusoid_128(s)), zero-initialised (u = 0: weight 1 at first)."""

    @nn.compact
    def __call__(self, s):
        x = timestep_embedding(s, 128)
        return nn.Dense(1, kernel_init=_zeros, bias_init=_zeros)(x)[:, 0]


def loss_log_variance(params: Any, t: jax.Array) -> jax.Array:
    """The learned log-variance u(t) [B] of a DiT built with ``log_variance=True``, from its parameters."""
    if "log_variance" not in params:
        raise ValueError("the network has no log-variance parameters: build it with log_variance=True")
    return LogVariance().apply({"params": params["log_variance"]}, t)


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
    """Transformer block: gated self-attention and gated MLP, modulated by c (adaLN-Zero for "dit";
    for "official" the modulation kernel is xavier-initialised and q, k, v are separate layers)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    architecture: str = "dit"
    attention_impl: str = "xla"  # "xla" or "cudnn", see attention_implementation

    @nn.compact
    def __call__(self, x, c):
        h, nh = self.hidden_size, self.num_heads
        official = self.architecture == "official"
        mod = nn.Dense(6 * h, kernel_init=_xavier if official else _zeros, bias_init=_zeros, dtype=self.dtype,
                       name="adaLN_modulation")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod(nn.silu(c)), 6, axis=-1)

        y = nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = _modulate(y, shift_msa, scale_msa)
        b, n, _ = y.shape
        if official:  # three projections, each xavier over [h, h]
            q, k, v = (nn.Dense(h, kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, name=name)(y)
                       .reshape(b, n, nh, h // nh) for name in ("query", "key", "value"))
        else:  # one fused qkv projection, xavier over [h, 3h] exactly as DiT/timm's Attention
            qkv = nn.Dense(3 * h, kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, name="qkv")(y)
            q, k, v = (a[:, :, 0] for a in jnp.split(qkv.reshape(b, n, 3, nh, h // nh), 3, axis=2))
        y = attention(q, k, v, self.architecture, self.attention_impl)
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

    Parameters are always float32; ``dtype`` is the compute dtype (float32 or bfloat16); the
    output is returned as float32. For "dit" the residual stream and the conditioning are float32
    too; for "official" the residual stream is in ``dtype`` (as is the output before the exact cast
    to float32) and the conditioning is float32, as in the official code.
    ``attention_impl``: "auto" (``attention_implementation`` for the default device), "xla" or "cudnn".
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
    architecture: str = "dit"
    attention_impl: str = "auto"
    conditioning: tuple[str, ...] = ()  # extra scalar inputs, each through its own zero-initialised embedder
    log_variance: bool = False  # also hold the parameters of a learned loss log-variance (loss_log_variance)

    @nn.compact
    def __call__(self, x, t, d, labels, cond=None):
        """x: [B,H,W,C]; t: [B] in [0,1]; d: [B] step size in (0,1]; labels: [B] int32
        (num_classes = null class); cond: {name: [B]} for each name in ``conditioning`` (None without).
        Returns the velocity, [B,H,W,out_channels] float32."""
        given = set(cond or ())
        if given != set(self.conditioning):
            raise ValueError(f"the network is conditioned on {sorted(self.conditioning)} besides t, d and the label; "
                             f"got cond for {sorted(given)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        official = self.architecture == "official"
        head_dim = self.hidden_size // self.num_heads
        impl = (attention_implementation(default_platform(), self.dtype, head_dim) if self.attention_impl == "auto"
                else self.attention_impl)
        b, hgt, wid, _ = x.shape
        p = self.patch_size
        if hgt % p or wid % p:
            raise ValueError(f"image size {hgt}x{wid} not divisible by patch size {p}")
        gh, gw = hgt // p, wid // p

        # Constant, not a parameter: computed from static shapes at trace time. `init` needs only its shape
        # (no parameter depends on its values), so there it is computed by jax, traced: nothing is allocated
        # however wide the model (shortcut/memory.py takes the state's shapes with jax.eval_shape of init).
        pos = get_2d_sincos_pos_embed(self.hidden_size, gh, gw, in_float32=official or self.is_initializing())
        self.sow("intermediates", "pos_embed", pos)
        h = PatchEmbed(self.hidden_size, p, dtype=self.dtype, name="x_embedder")(x)
        if official:  # the residual stream in the compute dtype from here on
            h = (h.astype(jnp.float32) + jnp.asarray(pos)[None]).astype(self.dtype)
        else:
            h = h.astype(jnp.float32) + jnp.asarray(pos)[None]

        out_dtype = jnp.float32 if official else None  # official: float32 second layer, float32 conditioning
        t_emb = TimestepEmbedder(self.hidden_size, dtype=self.dtype, out_dtype=out_dtype, name="t_embedder")(t)
        d_in = d_embedder_input(d, self.d_conditioning)
        d_emb = TimestepEmbedder(self.hidden_size, dtype=self.dtype, out_dtype=out_dtype, name="d_embedder")(d_in)
        y_emb = LabelEmbedder(self.num_classes, self.hidden_size, dtype=self.dtype, name="y_embedder")(labels)
        c = t_emb + y_emb + d_emb if official else t_emb + d_emb + y_emb  # the official summation order
        for name in self.conditioning:
            c = c + TimestepEmbedder(self.hidden_size, dtype=self.dtype, out_dtype=out_dtype, zero_init=True,
                                     name=f"{name}_embedder")(cond[name])
        if self.log_variance and self.is_initializing():  # parameters only: loss_log_variance reads them
            LogVariance(name="log_variance")(t)

        for i in range(self.depth):
            h = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                         architecture=self.architecture, attention_impl=impl, name=f"block_{i}")(h, c)
        h = FinalLayer(self.hidden_size, p, self.out_channels, dtype=self.dtype, name="final_layer")(h, c)
        return unpatchify(h.astype(jnp.float32), p, gh, gw)


CORE_PARAMETERS = ("x_embedder", "t_embedder", "d_embedder", "y_embedder", "final_layer")  # and block_i


def is_added_input(name: str) -> bool:
    """Whether a top-level parameter subtree is one a method adds (an extra input's embedder or the
    log-variance), zero-initialised so that the network's function is the same without it."""
    return name == "log_variance" or (name.endswith("_embedder") and name not in CORE_PARAMETERS)


def example_inputs(model: DiT, input_shape: tuple[int, ...], batch: int = 1) -> tuple:
    """Zero inputs (x, t, d, labels, cond) of the model's shapes, for ``model.init``."""
    zeros = jnp.zeros((batch,), jnp.float32)
    cond = {name: zeros for name in model.conditioning} or None
    return (jnp.zeros((batch, *input_shape), jnp.float32), zeros, jnp.ones((batch,), jnp.float32),
            jnp.zeros((batch,), jnp.int32), cond)


def make_dit(
    size: str,
    *,
    out_channels: int,
    num_classes: int,
    patch_size: int = 2,
    d_conditioning: str = "level",
    dtype: Any = jnp.float32,
    architecture: str = "dit",
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
        d_conditioning=d_conditioning, dtype=dtype, architecture=architecture,
    )
    kwargs.update(overrides)
    return DiT(**kwargs)
