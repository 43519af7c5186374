"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset (offline)."""

from __future__ import annotations

import numpy as np

from shortcut.data.tfenv import tfds


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images uint8 [1797, 8, 8, 1], labels int64 [1797]).

    Pixel values 0..16 are mapped to 0..255 by round(v * 255 / 16).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """The 1,797 8x8 grey-scale digits of `sklearn.datasets.load_digits`, one `train` split."""

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn load_digits, values mapped 0..16 -> 0..255."}

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
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        images, labels = digits_uint8()
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
