"""A full disk loses nothing: files are replaced atomically, and running out of space is one line.

* `write_atomic(path, data)`: a temporary file beside `path`, fsync-ed, then renamed over it: a reader
  (or a run resumed after a crash or a full disk) finds the old file or the new one, never half of one;
  a failed write removes its temporary file.
* `DiskFull`: the one-line error of a run whose work directory ran out of space (`full`, the one place
  that recognises it, whatever raised it: a record, a checkpoint, a sample grid).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path

from shortcut.errors import ShortcutError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")  # how TensorStore (Orbax) words it


class DiskFull(ShortcutError):
    """The disk of a run directory is full; the message names the directory and the space needed."""


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` atomically and durably (its folder made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, says the disk is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull):
            return True
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        if any(text in str(error) for text in _NO_SPACE_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DropFullDiskReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_full(record.exc_info[1]))


def quiet_full_disk_reports() -> None:
    """Orbax logs a background save that failed with its traceback (absl, ERROR), and asyncio each of its
    write tasks' errors ("Task exception was never retrieved"); a full disk is reported once, in DiskFull's
    line, so drop those log records (only those of a full disk)."""
    for logger in map(logging.getLogger, ("absl", "asyncio")):
        if not any(isinstance(f, _DropFullDiskReports) for f in logger.filters):
            logger.addFilter(_DropFullDiskReports())


def size(path: str | Path) -> int:
    """Bytes of a file or of everything under a folder (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def full(error: BaseException, rundir: str | Path) -> DiskFull | None:
    """The one-line DiskFull for `error` if it means the disk of the run directory `rundir` is full, else None."""
    if not is_full(error):
        return None
    if isinstance(error, DiskFull):
        return error
    directory, need = Path(rundir), space_needed(Path(rundir))
    free = shutil.disk_usage(_existing(directory)).free
    return DiskFull(f"the disk of {directory} is full ({_mb(free)} free): the run needs about {_mb(need)} more "
                    "for its next checkpoint and record; free some space and run the same command again, which "
                    "resumes from the last complete checkpoint")


def space_needed(rundir: Path) -> int:
    """About what a run still writes: one more checkpoint (the size of its largest) and its record."""
    steps = [p for p in (rundir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(map(size, steps), default=0) + size(rundir / "run.json")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
