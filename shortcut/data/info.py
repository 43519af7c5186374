"""`DatasetInfo`: what the batches of a dataset look like (importable without TensorFlow)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Shape and size of a dataset as the train loop sees it.

    Attributes:
        name: the dataset name as given to `check_dataset` ("digits", "celebahq256", ...).
        image_shape: (H, W, C) after preprocessing, i.e. what batches contain.
        num_classes: number of classes; 0 for unconditional data (labels are then all 0).
        num_examples: number of examples in the requested split (all processes together).
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    num_examples: int
