"""Inception-v3 in its FID variant (the 2015-12-05 TensorFlow graph), in Flax linen.

The structure follows the TF FID graph as ported to PyTorch by pytorch-fid
(torchvision's Inception3 with FIDInceptionA/C/E blocks):

* every 3x3 average pool inside the mixed blocks excludes the zero padding from the
  average (TF semantics, ``count_include_pad=False``);
* the last block (Mixed_7c) pools its pool branch with a 3x3 *max* pool, stride 1,
  padding 1, where torchvision uses an average pool;
* batch norm epsilon is 1e-3; convolutions have no bias;
* the output is "pool3": the global spatial mean of Mixed_7c, 2048 channels.

Module and variable names mirror pytorch-fid's state dict (``Mixed_5b/branch1x1/conv``,
``.../bn``), so weight conversion is a rename plus a kernel transpose.
Input: NHWC float images in [-1, 1], already at the size wanted (299x299 for FID,
see :func:`fid_preprocess`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

FID_IMAGE_SIZE = 299
POOL3_DIM = 2048


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3, running statistics) + ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # (pad_h, pad_w), symmetric, as in torch
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    # TF's AvgPool with SAME padding divides by the number of valid inputs only.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b3 = BasicConv2d(384, (3, 3), strides=(2, 2), precision=p, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), precision=p, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), precision=p, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=(2, 2), precision=p, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), (0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), (3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), (0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), (0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b3 = BasicConv2d(192, (1, 1), precision=p, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=(2, 2), precision=p, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), precision=p, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), precision=p, name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), precision=p, name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=(2, 2), precision=p, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``) and Mixed_7c (``pool="max"``, the FID graph's quirk)."""

    pool: str = "avg"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [conv(384, (1, 3), (0, 1), name="branch3x3_2a")(b3), conv(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [conv(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd), conv(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 up to pool3. ``__call__(x)`` maps NHWC images in [-1, 1] to [N, 2048]."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        x = BasicConv2d(32, (3, 3), strides=(2, 2), precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def fid_preprocess(images, size: int = FID_IMAGE_SIZE):
    """The paper's FID input protocol: NHWC images in [-1, 1] of any size -> [N, size, size, 3].

    Resizes with ``jax.image.resize(method="bilinear", antialias=False)`` (half-pixel
    centres, the same as torch ``F.interpolate(mode="bilinear", align_corners=False)``
    and as the official shortcut-models evaluation), then clips to [-1, 1].
    ``antialias`` only matters when shrinking: set to False to match the official code
    for inputs larger than 299 (e.g. 512x512). Grayscale (C=1) is repeated to 3 channels.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {x.shape}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[-1]}")
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
    return jnp.clip(x, -1.0, 1.0)


def init_shapes(image_size: int = FID_IMAGE_SIZE) -> dict:
    """Abstract (shape-only) variables of FIDInceptionV3, without computing anything."""
    model = FIDInceptionV3()
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))


def random_inception_variables(seed: int = 0) -> dict:
    """Randomly initialised, well-scaled variables for tests and pipeline checks (NOT a metric).

    He-normal kernels and batch-norm statistics/affines jittered around identity, so
    activations stay O(1) through the 94 conv layers and every variable is exercised.
    """
    shapes = init_shapes(75)
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.7, 1.3, shape).astype(np.float32)
        if name in ("bias", "mean"):
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        raise KeyError(f"unexpected variable {name}")

    return jax.tree_util.tree_map_with_path(make, shapes)
