"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset (offline), split into
`train` (1,437 images) and `heldout` (360: 20 % of every class, data/heldout.py), which training never sees."""

from __future__ import annotations

import numpy as np

from shortcut.data.heldout import stratified_split
from shortcut.data.tfenv import tfds

SPLITS = ("train", "heldout")


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images uint8 [1797, 8, 8, 1], labels int64 [1797]).

    Pixel values 0..16 are mapped to 0..255 by round(v * 255 / 16).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices into `digits_uint8()` of a split: `train`, `heldout` or `all`."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    if split == "all":
        return np.arange(len(labels))
    if split not in SPLITS:
        raise ValueError(f"digits has the splits {', '.join(SPLITS)} (and 'all'), not {split!r}")
    return dict(zip(SPLITS, stratified_split(labels)))[split]


class Digits(tfds.core.GeneratorBasedBuilder):
    """The 1,797 8x8 grey-scale digits of `sklearn.datasets.load_digits`: `train` and `heldout` splits."""

    name = "digits"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn load_digits, values mapped 0..16 -> 0..255.",
                     "2.0.0": "a stratified 20 % `heldout` split; `train` is the other 80 %."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn's 8x8 handwritten digits (UCI optdigits test set).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        images, labels = digits_uint8()
        for i in split_indices(split):
            yield int(i), {"image": images[i], "label": int(labels[i])}
