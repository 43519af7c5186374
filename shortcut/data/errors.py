"""Errors raised by the input pipelines (importable without TensorFlow)."""

from __future__ import annotations

from shortcut.errors import ShortcutError


class DatasetNotReadyError(ShortcutError):
    """The dataset is not prepared on this machine.

    The message says where the files go and the exact command that prepares the data.
    Raised by `check_dataset` / `make_train_iterator` before any model is built.
    """
