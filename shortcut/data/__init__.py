"""Input pipelines: TFDS datasets through tf.data on the CPU, as batches in [-1, 1].

    info = check_dataset("digits")                  # raises DatasetNotReadyError with instructions
    it = make_train_iterator("digits", batch_size=128, seed=0)
    batch = next(it)                                # {"image": f32 [B,H,W,C], "label": i32 [B]}
    state = it.get_state(); it.set_state(state)     # exact position, for checkpoints

Names: digits (scikit-learn, built offline on first use), celebahq256 (a local image folder),
imagenet256 (TFDS imagenet2012 + ADM centre crop), or any TFDS image dataset.
TensorFlow is imported lazily, on first use of a name that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from shortcut.data.errors import DatasetNotReadyError
from shortcut.data.info import DatasetInfo

_LAZY = {
    "check_dataset": "shortcut.data.catalog",
    "make_train_iterator": "shortcut.data.pipeline",
    "iterate_split": "shortcut.data.pipeline",
    "make_mock_iterator": "shortcut.data.iterators",
    "BatchIterator": "shortcut.data.iterators",
    "prepare_dataset": "shortcut.data.prepare",
}

__all__ = ["DatasetInfo", "DatasetNotReadyError", *_LAZY]

if TYPE_CHECKING:
    from shortcut.data.catalog import check_dataset
    from shortcut.data.iterators import BatchIterator, make_mock_iterator
    from shortcut.data.pipeline import iterate_split, make_train_iterator
    from shortcut.data.prepare import prepare_dataset


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
