"""TensorFlow for input pipelines only: CPU, quiet, never holding an accelerator.

Every module of `shortcut.data` imports TF and TFDS from here, so the device hiding happens
before TF can initialise a GPU/TPU that JAX needs.
"""

from __future__ import annotations

import os

from shortcut.quiet import native_stderr_hidden, quiet_tfds  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

with native_stderr_hidden():  # TF's C++ start-up lines (oneDNN, absl::InitializeLog) ignore the log level
    import tensorflow as tf  # noqa: E402

for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):
        # RuntimeError: devices already initialised (someone imported TF earlier);
        # ValueError: no such device type in this build (tensorflow-cpu).
        pass

import tensorflow_datasets as tfds  # noqa: E402

quiet_tfds()

__all__ = ["tf", "tfds"]
