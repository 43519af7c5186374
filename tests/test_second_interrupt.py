"""A second Ctrl-C or SIGTERM while the driver shuts down ends it in one line (what is kept, how to resume),
never with a traceback (Ray's atexit shutdown printed `Exception ignored in atexit callback ...
KeyboardInterrupt`); the run's last complete checkpoint is kept and nothing the driver started lives on."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestration.execution.cluster import AGAIN
from tests.process_groups import group_ended

REPO = Path(__file__).resolve().parents[1]
# a tiny real digits run that goes on (--smoke would fix the steps at 4)
LONG = ["train.steps=100000", "train.log_every=10", "train.checkpoint_every=10", "eval.steps=[1]",
        "eval.num_samples=64", "eval.batch_size=64", "resources.cpus=1"]

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("processes")]  # xdist group: see conftest.py


class _Lines:
    """The driver's output, read as it comes (so a test can act on a line)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert proc.poll() is None and time.time() < deadline, f"no {text!r}:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def text(self) -> str:
        self._thread.join(timeout=0 if self._thread.is_alive() else None)
        return "".join(self.lines)


def _checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name) for ckpts in run.glob("*/checkpoints") for p in ckpts.iterdir() if p.name.isdigit())


@pytest.mark.parametrize("second", [
    # Ctrl-C once the driver said it is done and exits: it lands in Ray's atexit shutdown
    pytest.param("during Ray's shutdown", id="ray-shutdown"),
    # SIGTERM while the driver waits for the run to checkpoint and stop
    pytest.param("while the run stops", id="run-stopping", marks=pytest.mark.slow),
])
def test_a_second_interrupt_ends_the_driver_in_one_line(tmp_path, second):
    workdir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "orchestration.run_experiment", "digits_flow", "--workdir", str(workdir),
           "--no-tracking", "--cpus", "2", *[a for s in LONG for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = _Lines(proc)
    try:
        deadline = time.time() + 600  # a loaded machine starves Ray's workers (they run at nice 15)
        while not _checkpoints(workdir / "digits_flow"):
            assert proc.poll() is None and time.time() < deadline, out.text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        if second == "while the run stops":
            out.wait_for("interrupted: stopping the run", proc)
            time.sleep(0.5)
            again = signal.SIGTERM
        else:
            out.wait_for("interrupted; the last checkpoint is kept", proc)
            again = signal.SIGINT
        assert proc.poll() is None, "the driver ended before the second signal"
        proc.send_signal(again)
        proc.wait(timeout=120)
        text = out.text()
        assert proc.returncode == 130, text[-3000:]
        assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
        assert text.rstrip().splitlines()[-1] == AGAIN, text[-3000:]
        assert _checkpoints(workdir / "digits_flow"), "the last checkpoint is gone"
        assert group_ended(proc.pid), "processes the driver started are still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
