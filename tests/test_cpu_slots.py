"""CPU pinning of CPU-only workers: distinct cores per worker, released when a worker dies."""

import os
import signal
import subprocess
import sys

import pytest

from orchestration.execution import cpu_slots

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux and two cores")

HOLD = """
import os, sys, time
from pathlib import Path
from orchestration.execution import cpu_slots
cpus = cpu_slots.acquire(1, Path(sys.argv[1]))
if cpus:
    cpu_slots.pin_process(cpus)
print(cpus[0] if cpus else -1, sorted(os.sched_getaffinity(0)), flush=True)
time.sleep(60)
"""


def _holder(directory):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    cpu, *affinity = p.stdout.readline().replace("[", " ").replace("]", " ").replace(",", " ").split()
    return p, int(cpu), [int(a) for a in affinity]


def test_workers_get_distinct_cores_and_a_killed_worker_frees_its_core(tmp_path):
    a, cpu_a, affinity_a = _holder(tmp_path)
    b, cpu_b, affinity_b = _holder(tmp_path)
    try:
        assert cpu_a >= 0 and cpu_b >= 0 and cpu_a != cpu_b
        assert affinity_a == [cpu_a] and affinity_b == [cpu_b]  # every thread of the process
        free = set(os.sched_getaffinity(0)) - {cpu_a, cpu_b}
        assert cpu_slots.acquire(len(free) + 1, tmp_path) == []  # not enough free: nothing held
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        got = cpu_slots.acquire(len(free) + 1, tmp_path, wait=10)
        assert cpu_a in got and cpu_b not in got  # the killed worker's core came back, the live one's did not
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_a_released_core_is_free_again_and_acquire_waits_for_it(tmp_path):
    every = len(os.sched_getaffinity(0))
    try:
        assert len(cpu_slots.acquire(every, tmp_path)) == every
        assert cpu_slots.acquire(1, tmp_path, wait=0.3) == []  # all held, by this process
        cpu_slots.release()
        assert len(cpu_slots.acquire(1, tmp_path)) == 1
    finally:
        cpu_slots.release()
