"""`fashion_mnist_local`: Fashion-MNIST from Debian's `dataset-fashion-mnist` package, as a TFDS dataset.

The package installs the original idx files (60,000 train + 10,000 test labelled 28x28 grey images)
under /usr/share/datasets/fashion-mnist/; the dataset is built from them on first use, offline.
`$SHORTCUT_FASHION_MNIST_DIR` names another folder holding the same four files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from shortcut.data.errors import DatasetNotReadyError
from shortcut.data.tfenv import tfds

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DIR = "SHORTCUT_FASHION_MNIST_DIR"
INSTALL_CMD = "apt-get install dataset-fashion-mnist"
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def missing_message() -> str:
    d = idx_dir()
    missing = [f for pair in FILES.values() for f in pair if not (d / f).is_file()]
    return (f"Fashion-MNIST idx files not found in {d} (missing: {', '.join(missing)}). Install them with\n"
            f"    {INSTALL_CMD}\n(Debian/Ubuntu, as root), or set ${ENV_DIR} to a folder holding the four files.")


def check_files(manual_dir: str | None = None) -> None:
    """Raise DatasetNotReadyError with the apt-get line when an idx file is missing (they come from a Debian
    package, not a manual directory)."""
    d = idx_dir()
    if not all((d / f).is_file() for pair in FILES.values() for f in pair):
        raise DatasetNotReadyError(missing_message())


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} bytes of data, header says {shape}")
    return data.reshape(shape)


def fashion_mnist_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int64 [N]) of split 'train' or 'test'."""
    check_files()
    images_file, labels_file = FILES[split]
    images = read_idx(idx_dir() / images_file)[..., None]
    labels = read_idx(idx_dir() / labels_file).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Xiao et al. 2017), 28x28 grey, 10 classes, splits train (60,000) and test (10,000)."""

    name = "fashion_mnist_local"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The idx files of Debian's dataset-fashion-mnist package."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Fashion-MNIST: Zalando article images, 28x28 grey-scale, 10 classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(LABELS)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the files come from the Debian package
        check_files()
        return {split: self._generate_examples(split) for split in FILES}

    def _generate_examples(self, split):
        images, labels = fashion_mnist_uint8(split)
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
