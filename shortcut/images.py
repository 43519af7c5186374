"""PNG grids of samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, clipping outliers."""
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile [N, H, W, C] images into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] array."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(to_uint8(images)):
        r, q = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return out


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, min_size: int = 256) -> Path:
    """Save a grid PNG; small images are upscaled (nearest) so the grid is at least `min_size` wide.
    Latents with more than 3 channels show their first 3."""
    images = images[..., :3] if images.shape[-1] > 3 else images
    g = grid(images, ncol)
    scale = max(1, math.ceil(min_size / g.shape[1]))
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    img = img.resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
