"""Sample files in the layout of the ADM / guided-diffusion evaluation suite, which most ImageNet-256
papers use: an .npz with `arr_0` = uint8 [N, H, W, 3] images and, for class-conditional samples,
`arr_1` = int labels [N]. Grey images are stored with their channel repeated three times.

A writer fills the arrays in any order into memory-mapped .npy files beside the target (so 50,000
ImageNet samples never sit in memory, and a killed writer keeps what it wrote), then zips them into
the .npz (stored, uncompressed, as numpy's np.savez writes them).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from shortcut.errors import ShortcutError
from shortcut.images import to_uint8


class SampleFileError(ShortcutError, ValueError):
    """A sample file that is not in the expected layout; the message says what is wrong."""


def to_sample_images(images) -> np.ndarray:
    """[-1, 1] float images [N, H, W, C] (C = 1 or 3) -> uint8 [N, H, W, 3]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [N, H, W, 1 or 3], got {x.shape}")
    u = to_uint8(x)
    return np.repeat(u, 3, axis=-1) if u.shape[-1] == 1 else u


def from_sample_images(arr: np.ndarray, channels: int = 3) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [-1, 1] [N, H, W, channels]. channels=1 needs grey images (all three
    channels equal, as `to_sample_images` writes them) and takes one: the exact inverse of the repeat."""
    x = np.asarray(arr)
    if channels == 1:
        if not (np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])):
            raise SampleFileError("the images are not grey (their three channels differ); this metric needs "
                                  "grey images")
        x = x[..., :1]
    return x.astype(np.float32) / 127.5 - 1.0


def read_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images [N, H, W, 3], labels [N] or None) of a sample file."""
    path = Path(path)
    if not path.is_file():
        raise SampleFileError(f"no such sample file: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise SampleFileError(f"{path}: a sample file holds arr_0 (uint8 [N, H, W, 3]), this one has {f.files}")
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f.files else None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        if isinstance(e, SampleFileError):
            raise
        raise SampleFileError(f"{path}: not a readable .npz ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise SampleFileError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise SampleFileError(f"{path}: arr_1 must be one label per image, got shape {list(labels.shape)}")
    return images, (None if labels is None else labels.astype(np.int64))


class SampleFileWriter:
    """Fill a sample file's images (and labels) by index range, then `finish()` to write the .npz.
    Unfinished work lives in `<path>.partial/` and is picked up again by a new writer for the same
    path and shape."""

    def __init__(self, path: str | os.PathLike, num: int, image_shape: tuple[int, int], with_labels: bool):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.partial.mkdir(parents=True, exist_ok=True)
        shape = (num, *image_shape, 3)

        def array(name, shape, dtype):
            f = self.partial / name
            if f.exists():
                a = np.load(f, mmap_mode="r+")
                if a.shape == shape and a.dtype == dtype:
                    return a
            return np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=shape)

        self.images = array("arr_0.npy", shape, np.uint8)
        self.labels = array("arr_1.npy", (num,), np.int64) if with_labels else None
        self.filled = array("filled.npy", (num,), np.bool_)

    def write(self, start: int, images, labels=None) -> None:
        """Samples start .. start+len(images)-1: [-1, 1] float images (or uint8 [.., 3]) and their labels."""
        u = images if images.dtype == np.uint8 else to_sample_images(images)
        self.images[start:start + len(u)] = u
        if self.labels is not None:
            self.labels[start:start + len(u)] = labels
        self.filled[start:start + len(u)] = True

    def missing(self, batch_size: int) -> list[tuple[int, int]]:
        """(start, count) ranges of at most batch_size samples not written yet."""
        holes = np.flatnonzero(~np.asarray(self.filled))
        out: list[tuple[int, int]] = []
        for i in holes:
            if out and out[-1][0] + out[-1][1] == i and out[-1][1] < batch_size:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((int(i), 1))
        return out

    def finish(self) -> Path:
        """Write the .npz (atomically) and remove the partial files."""
        if self.missing(1):
            raise RuntimeError(f"{self.path}: {len(self.missing(1))} sample range(s) not written yet")
        for a in (self.images, self.labels, self.filled):
            if a is not None:
                a.flush()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(self.partial / "arr_0.npy", "arr_0.npy")
            if self.labels is not None:
                zf.write(self.partial / "arr_1.npy", "arr_1.npy")
        os.replace(tmp, self.path)
        del self.images, self.labels, self.filled
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.path
