"""A run whose Ray worker died without raising: what the driver says, and what the run's record keeps.

A worker killed by a signal (the kernel's out-of-memory killer sends SIGKILL), by Ray's memory monitor,
or by a crash in native code cannot write its own record: its `run.json` would say "running" forever.
Ray reruns such a task (`SHORTCUT_RAY_MAX_RETRIES` times, default 3: each rerun resumes from the last
checkpoint); when it gives up, `killed(error, rundir)` names the likely cause, marks the record "killed"
with it (only while the record still says "running" and no other process holds the run directory), and
returns the `WorkerKilled` error the command lines print as one line.

The cause: Ray's `OutOfMemoryError` names its memory monitor; otherwise the kernel log (`dmesg`, where
readable) is searched for an out-of-memory kill of the worker's pid, which the dead worker left in its
run directory's lock file (shortcut/run_lock.py). Ray itself does not report the signal.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

from shortcut import record
from shortcut.errors import ShortcutError
from shortcut.run_lock import RunLock, RunLocked, last_holder

RETRIES_ENV = "SHORTCUT_RAY_MAX_RETRIES"
MEMORY_REMEDY = ("if it was memory: a smaller train.batch_size, or resources.sharding=fsdp over more devices; "
                 "a rerun resumes from the last checkpoint")


class WorkerKilled(ShortcutError, RuntimeError):
    """A run's worker process died without an exception; the message gives the likely cause."""


def max_retries() -> int:
    """How many times Ray reruns a run whose worker died ($SHORTCUT_RAY_MAX_RETRIES, default 3)."""
    return int(os.environ.get(RETRIES_ENV, "3"))


def is_worker_death(error: BaseException) -> bool:
    """Whether a Ray error says the worker process died (rather than the run raising)."""
    import ray.exceptions as rx

    return isinstance(error, (rx.WorkerCrashedError, rx.OutOfMemoryError, rx.ActorDiedError, rx.NodeDiedError))


def killed(error: BaseException, rundir: str | Path, *, kernel_log: str | None = None) -> WorkerKilled | None:
    """The WorkerKilled to report when `error` is a worker's death (None for any other error), after
    marking the run's record "killed" with the cause. `kernel_log`: the text to search instead of dmesg's."""
    if not is_worker_death(error):
        return None
    import ray.exceptions as rx

    rundir = Path(rundir)
    last = last_holder(rundir)
    pid = last.get("pid") if last.get("host") == socket.gethostname() else None
    if isinstance(error, rx.OutOfMemoryError):
        cause = "Ray's memory monitor killed it: the node ran out of memory"
    else:
        log = kernel_log if kernel_log is not None else _dmesg() if pid else None
        oom = _oom_kill_line(pid, log) if pid else None
        if oom:
            cause = f"the kernel's out-of-memory killer sent it SIGKILL (kernel log: {oom})"
        elif pid:
            cause = ("it was killed by a signal or crashed in native code; Ray does not say which, and the kernel "
                     f"log shows no out-of-memory kill of pid {pid}" + ("" if log is not None
                                                                         else " (it cannot be read here)"))
        else:
            cause = "it was killed by a signal or crashed in native code (on another host; Ray does not say which)"
    who = f"pid {pid}" if pid else "its worker"
    message = (f"{rundir}: the run's worker ({who}) died without an error after {max_retries() + 1} attempt(s): "
               f"{cause}; {MEMORY_REMEDY}")
    _mark(rundir, cause)
    return WorkerKilled(message)


def _dmesg() -> str | None:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _oom_kill_line(pid, text: str | None) -> str | None:
    pattern = re.compile(rf"(Out of memory|Memory cgroup out of memory).*Killed process {int(pid)}\b")
    found = [line for line in (text or "").splitlines() if pattern.search(line)]
    return " ".join(found[-1].split())[:200] if found else None


def _mark(rundir: Path, cause: str) -> None:
    """Status "killed" and the cause, when the record still says "running" and nobody holds the directory."""
    if not (rundir / record.FILE).exists():
        return
    try:
        lock = RunLock(rundir).acquire(log=lambda s: None)
    except RunLocked:
        return  # another attempt (or run) is writing it now
    try:
        rec = record.read(rundir)
        if rec and rec.get("status") == record.RUNNING:
            rec.update(status=record.KILLED, error=f"WorkerKilled: {cause}", finished=record.now())
            record.write(rundir, rec)
    finally:
        lock.release()
