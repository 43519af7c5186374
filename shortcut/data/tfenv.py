"""TensorFlow for input pipelines only: CPU, quiet, never holding an accelerator.

Every module of `shortcut.data` imports TF and TFDS from here, so the device hiding happens
before TF can initialise a GPU/TPU that JAX needs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):
        # RuntimeError: devices already initialised (someone imported TF earlier);
        # ValueError: no such device type in this build (tensorflow-cpu).
        pass

import tensorflow_datasets as tfds  # noqa: E402

__all__ = ["tf", "tfds"]
