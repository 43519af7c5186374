"""Image preprocessing ops (TensorFlow, run inside tf.data on the CPU)."""

from __future__ import annotations

from shortcut.data.tfenv import tf


def _box_kernel(x):
    return tf.cast((x > -0.5) & (x <= 0.5), x.dtype)


def _bicubic_kernel(x, a=-0.5):
    x = tf.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


_KERNELS = {"box": (_box_kernel, 0.5), "bicubic": (_bicubic_kernel, 2.0)}


def _pil_resample_rows(x: tf.Tensor, out_size: tf.Tensor, kernel: str) -> tf.Tensor:
    """One pass of PIL's separable resampling (ImagingResample) along axis 0 of [h, w, c].

    Same taps and weights as PIL (kernel widened by the scale when downscaling, weights
    normalised per output pixel), and like PIL's 8-bit path the result is rounded half up and
    clipped to 0..255. Taps and weights are computed in float64; x holds integer values
    0..255 (float32 is exact enough: PIL itself uses 22-bit fixed-point weights).
    """
    fn, support = _KERNELS[kernel]
    in_size = tf.shape(x)[0]
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    support = support * filter_scale
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    first = tf.maximum(tf.cast(tf.floor(center - support + 0.5), tf.int32), 0)
    stop = tf.minimum(tf.cast(tf.floor(center + support + 0.5), tf.int32), in_size)
    taps = first[:, None] + tf.range(ksize)[None, :]  # [out, k]
    weights = fn((tf.cast(taps, tf.float64) - center[:, None] + 0.5) / filter_scale)
    weights = tf.where(taps < stop[:, None], weights, tf.zeros_like(weights))
    weights = tf.cast(weights / tf.reduce_sum(weights, axis=1, keepdims=True), x.dtype)
    gathered = tf.gather(x, tf.minimum(taps, in_size - 1))  # [out, k, w, c]
    y = tf.reduce_sum(gathered * weights[:, :, None, None], axis=1)
    return tf.clip_by_value(tf.floor(y + 0.5), 0.0, 255.0)


def _pil_resample_columns(x: tf.Tensor, out_size: tf.Tensor, kernel: str) -> tf.Tensor:
    # Gathering along axis 0 is much faster in TF than along axis 1, hence the transposes.
    x = tf.transpose(x, [1, 0, 2])
    return tf.transpose(_pil_resample_rows(x, out_size, kernel), [1, 0, 2])


def pil_resize(x: tf.Tensor, new_hw: tf.Tensor, kernel: str) -> tf.Tensor:
    """PIL `Image.resize(size, resample=BOX|BICUBIC)` of an 8-bit image held as float [h,w,c]."""
    hw = tf.shape(x)[:2]
    # PIL resamples horizontally first, then vertically, each pass rounded to 8 bits.
    x = tf.cond(hw[1] != new_hw[1], lambda: _pil_resample_columns(x, new_hw[1], kernel), lambda: x)
    return tf.cond(hw[0] != new_hw[0], lambda: _pil_resample_rows(x, new_hw[0], kernel), lambda: x)


def adm_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """ADM's centre crop of one uint8 image [h, w, c] to uint8 [size, size, c].

    A TF transcription of `center_crop_arr` in openai/guided-diffusion (the ImageNet 256
    preprocessing of ADM / DiT): while the shorter side >= 2 * size, halve both sides with
    PIL's BOX filter; then resize with PIL's BICUBIC so the shorter side is `size` (sides
    `round(side * size / shorter)`, rounding half to even as Python does); then centre crop
    (offsets floor((side - size) / 2)). The resampling reproduces PIL's (see `pil_resize`);
    results match PIL to within 1 grey level.
    """
    channels = image.shape[-1]
    x = tf.cast(image, tf.float32)

    def too_big(v):
        return tf.reduce_min(tf.shape(v)[:2]) >= 2 * size

    def halve(v):
        return (pil_resize(v, tf.shape(v)[:2] // 2, "box"),)

    (x,) = tf.while_loop(
        too_big, halve, (x,), shape_invariants=(tf.TensorShape([None, None, channels]),)
    )
    hw = tf.cast(tf.shape(x)[:2], tf.float64)
    new_hw = tf.cast(tf.round(hw * (size / tf.reduce_min(hw))), tf.int32)
    x = pil_resize(x, new_hw, "bicubic")
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    x = tf.ensure_shape(x[top : top + size, left : left + size], [size, size, channels])
    return tf.cast(x, tf.uint8)


def finish_batch(
    images: tf.Tensor,
    step: tf.Tensor,
    *,
    resize_to: int | None,
    flip_seed: int | None,
) -> tf.Tensor:
    """uint8 [B, H, W, C] -> float32 in [-1, 1]: optional resize, optional seeded flips, scaling.

    Resizing is antialiased bilinear. Flips are stateless: image b of batch number `step` is
    mirrored iff uniform(seed=(flip_seed, step))[b] < 0.5, so the flip pattern does not
    disturb the example order and is restored exactly with the iterator position.
    """
    x = tf.cast(images, tf.float32)
    if resize_to is not None:
        x = tf.image.resize(x, (resize_to, resize_to), method="bilinear", antialias=True)
    if flip_seed is not None:
        seed = tf.stack([tf.constant(flip_seed, tf.int64), tf.cast(step, tf.int64)])
        u = tf.random.stateless_uniform(tf.shape(x)[:1], seed=seed)
        x = tf.where(u[:, None, None, None] < 0.5, tf.reverse(x, axis=[2]), x)
    return tf.clip_by_value(x / 127.5 - 1.0, -1.0, 1.0)
