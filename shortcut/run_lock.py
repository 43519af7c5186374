"""One writer per run directory: an exclusive OS file lock on `<run dir>/.lock`.

A run takes the lock (flock(2), LOCK_EX) before it writes anything into its run directory and holds it
until it ends. The kernel drops the lock when the holder's process ends, however it ends (an error,
SIGKILL, the OOM killer), so a lock is never stale and never needs removing by hand. The holder writes
its pid, host, start time and command line into the lock file (and empties it when it lets go), so a
second run can say who holds the directory. The second run either waits (`run_experiment --wait`) or
stops at once with `RunLocked`, a one-line error; either way, before the lock is its own it writes and
deletes nothing in the run directory.

Tables and sweeps (orchestration/execution/graph.py, orchestration/sweep.py) treat a locked run directory as a
run going on elsewhere: they wait for its record instead of starting a second writer.

Limits: flock works between processes of one host, and across hosts on NFS (Linux maps it onto NFS
byte-range locks); some network and FUSE filesystems ignore it. A holder on another host cannot be
checked for liveness from here, only named.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from shortcut.errors import ShortcutError

LOCK_FILE = ".lock"
# A probe (`holder`) holds a shared lock for microseconds, and a new holder needs a moment to write who it
# is: a run that finds the lock taken and its holder not (yet) named tries again for this long.
GRACE_S = 2.0


class RunLocked(ShortcutError, RuntimeError):
    """Another process holds the run directory; the message (one line) names it and says what to do."""

    def __init__(self, rundir: Path, holder: dict | None):
        self.rundir, self.holder = Path(rundir), holder
        super().__init__(f"{rundir} is in use by another run ({describe(holder)}); wait for it with --wait, or "
                         f"stop that run first{_kill_hint(holder)}. Nothing was written")

    def __reduce__(self):  # pickled as it was made: a Ray worker's error reaches the driver intact
        return type(self), (self.rundir, self.holder)


def describe(holder: dict | None) -> str:
    """`pid 123 on host h since <UTC time>: <command>` of a lock file's content (or what is known)."""
    if not holder:
        return "a process that has not said who it is yet"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    command = holder.get("command")
    return text + (f": {command[:200]}" if command else "")


def _kill_hint(holder: dict | None) -> str:
    if holder and holder.get("host") == socket.gethostname() and holder.get("pid"):
        return f" (kill {holder['pid']}; its last checkpoint is kept and a rerun resumes from it)"
    return ""


def _read(path: Path) -> dict | None:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _alive_here(holder: dict | None) -> bool:
    """Whether the named holder is a live process of this host (True when it cannot be told: another host)."""
    if not holder or "pid" not in holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def last_holder(rundir: str | Path) -> dict:
    """Who last wrote its name into `rundir`'s lock file ({} when nobody): the holder now, or one that died
    holding it (a killed holder never empties the file)."""
    return _read(Path(rundir) / LOCK_FILE) or {}


def holder(rundir: str | Path) -> dict | None:
    """Who holds `rundir`'s lock now ({} when the holder has not written its name yet), None when it is
    free. Creates nothing: a run directory without a lock file is free."""
    path = Path(rundir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The exclusive lock of one run directory; `acquire()` takes it (creating the directory and the lock
    file if needed), `release()` or the end of the process lets it go. Also a context manager."""

    def __init__(self, rundir: str | Path):
        self.rundir = Path(rundir)
        self.path = self.rundir / LOCK_FILE
        self.waited = False  # whether acquire() found another holder and waited for it
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self, *, wait: bool = False, log: Callable[[str], None] = print, poll_s: float = 0.5) -> "RunLock":
        """Take the lock. Held by another process: with `wait`, say so once and wait until it is free;
        else raise RunLocked at once (after GRACE_S at most, while the holder is not named yet)."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        start, said = time.monotonic(), False
        while True:
            f = open(self.path, "a+")  # created if missing, never truncated: the holder's name stays readable
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.close()
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                who = _read(self.path)
                if wait:
                    self.waited = True
                    if not said:
                        log(f"waiting for {self.rundir}: in use by another run ({describe(who)})")
                        said = True
                    time.sleep(poll_s)
                elif time.monotonic() - start < GRACE_S and not _alive_here(who):
                    time.sleep(0.05)  # a probe, or a new holder about to write its name
                else:
                    raise RunLocked(self.rundir, who) from None
                continue
            if _same_file(f, self.path):
                break
            f.close()  # the lock file was replaced (its directory deleted and made again): lock the new one
        self._file = f
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": _command()}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(info) + "\n")
        f.flush()
        return self

    def release(self) -> None:
        """Let the lock go (emptying the lock file first: nobody holds it). Idempotent."""
        f, self._file = self._file, None
        if f is None:
            return
        with contextlib.suppress(OSError):
            f.truncate(0)
            f.flush()
        f.close()  # closing the only descriptor of this open file releases the flock

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a holder dropped without release() (e.g. an error before its run started)
        with contextlib.suppress(Exception):
            self.release()


def _command() -> str:
    """This process's command line, short: `run_experiment digits_flow --smoke`, or `a Ray worker`."""
    argv = list(sys.argv) or [""]
    if argv[0].endswith("default_worker.py"):
        return "a Ray worker"
    return " ".join([Path(argv[0]).name, *argv[1:]]).strip()


def _same_file(f, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except OSError:
        return False
