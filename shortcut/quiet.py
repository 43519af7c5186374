"""Quiet by default: the start-up chatter of TensorFlow, absl and Ray is hidden, so a run's output is
the run. `SHORTCUT_VERBOSE=1` (or `run_experiment --verbose`, which sets it for the workers too)
shows all of it again."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

VERBOSE_VAR = "SHORTCUT_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_VAR, "").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def native_stderr_hidden():
    """Hide what native code writes straight to file descriptor 2 inside the block (TensorFlow's C++
    start-up lines, which no log level reaches); shown after all if the block raises."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))


class _DropBelowError(logging.Filter):
    def __init__(self, path_part: str):
        super().__init__()
        self.path_part = path_part

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or self.path_part not in record.pathname


def quiet_tfds() -> None:
    """No TFDS progress bars (they garble a worker's log) and no absl warnings from TFDS itself."""
    if verbose():
        return
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    logging.getLogger("absl").addFilter(_DropBelowError(os.path.join("site-packages", "tensorflow_datasets")))


def quiet_ray() -> None:
    """No warning that a new local Ray instance uses token authentication (it is Ray's default)."""
    if not verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
