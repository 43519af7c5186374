"""Pin a CPU-only worker to cores no other worker of this machine holds.

Ray gives a worker `num_cpus` as a scheduling count, not as cores, and XLA sizes its CPU thread pool
from the cores the process may run on. Two single-CPU digits workers on a 2-core machine then both
spread over both cores and slow each other down (10 % on a digits run); pinned, each keeps its core,
and a run's numbers no longer depend on how many cores the machine has.

A core is held by an exclusive `flock` on `<tmp>/shortcut-cpu-slots-<uid>/<core>.lock` until the run
releases it (`release`, when the worker's run ends) or the process ends, however it ends (the kernel
drops the lock on SIGKILL too). A worker waits a little for a core: Ray starts the next run as soon as
the last one returns, and a worker that returned without releasing is still exiting.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

ENV = "SHORTCUT_PIN_CPUS"  # set by orchestration.execution.cluster.worker_options: the cores a worker asks for

_held: list[int] = []  # this process's open lock files, until release() or its exit


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"shortcut-cpu-slots-{os.getuid()}"


def acquire(count: int, directory: Path | None = None, wait: float = 0.0) -> list[int]:
    """Lock `count` free cores of this process's affinity mask, trying for up to `wait` seconds;
    [] (nothing held) if fewer are free by then."""
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while not (cpus := _try_acquire(count, directory)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return cpus


def _try_acquire(count: int, directory: Path) -> list[int]:
    got: list[tuple[int, int]] = []
    for cpu in sorted(os.sched_getaffinity(0)):
        if len(got) == count:
            break
        fd = os.open(directory / f"{cpu}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        got.append((cpu, fd))
    if len(got) < count:
        for _, fd in got:
            os.close(fd)
        return []
    _held.extend(fd for _, fd in got)
    return [cpu for cpu, _ in got]


def release() -> None:
    """Give up the cores this process holds (its threads stay where they are)."""
    while _held:
        os.close(_held.pop())


def pin_process(cpus: list[int]) -> None:
    """Set the affinity of every thread of this process (affinity is per thread on Linux)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass


def pin_from_env(wait: float = 30.0) -> list[int]:
    """If $SHORTCUT_PIN_CPUS asks for n cores and n are free within `wait` seconds, pin this process to
    them; the cores ([] and a warning on stderr when they are not free)."""
    try:
        count = int(os.environ.get(ENV, "0"))
    except ValueError:
        return []
    if count < 1 or not hasattr(os, "sched_setaffinity"):
        return []
    cpus = acquire(count, wait=wait)
    if cpus:
        pin_process(cpus)
    else:
        print(f"cpu_slots: no {count} free core(s) after {wait:g}s; this run is not pinned", file=sys.stderr)
    return cpus
