"""One writer per run directory (shortcut/run_lock.py): a second run of the same spec in the same work
directory exits 1 at once with one line naming the holder, or waits for it (--wait); a holder killed
mid-checkpoint leaves no stale lock, and the next run resumes from the last complete checkpoint; an
unfinished Orbax save (`*.orbax-checkpoint-tmp`) is ignored by everyone and removed by the lock holder
only; a table meeting a locked run directory waits for that run's record.

The end-to-end tests run real `run_experiment digits_flow --smoke --in-process` processes (4 steps,
checkpoints at 2 and 4) sharing one compilation cache. A holder is caught mid-checkpoint
deterministically: it runs with os.rename patched to stall on Orbax's final rename of step 4, so its
`4.orbax-checkpoint-tmp` is fully written but never committed when it is SIGKILLed."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shortcut import run_lock
from shortcut.checkpoint import PARTIAL_SAVE, Checkpointer, remove_partial_saves

REPO = Path(__file__).resolve().parents[1]
SETS = ["--set", "eval.steps=[1]"]  # one sampler to compile and evaluate: the runs stay short

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("processes")]  # xdist group: see conftest.py

# os.rename patched to stall (holding the lock) on the commit of step $STALL_AT; then run_experiment.
STALLING_RUN = """
import os, sys, time
_rename = os.rename
def rename(src, dst, *a, **k):
    if '.orbax-checkpoint-tmp' in str(src) and os.path.basename(str(dst)) == os.environ['STALL_AT']:
        print('stalled mid-checkpoint', flush=True)
        time.sleep(600)
    return _rename(src, dst, *a, **k)
os.rename = rename
from orchestration.run_experiment import main
sys.exit(main(sys.argv[1:]))
"""


# ------------------------------------------------------------------------------------ the lock itself


def _holding(rundir: Path, then: str = "time.sleep(600)") -> subprocess.Popen:
    """A process that takes `rundir`'s lock, says so, then runs `then`."""
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
              "from shortcut.run_lock import RunLock\n"
              f"lock = RunLock({str(rundir)!r}).acquire()\n"
              "print('held', flush=True)\n" + then + "\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    rundir = tmp_path / "digits_flow" / "0123456789ab"
    assert run_lock.holder(rundir) is None and not rundir.exists()  # a probe creates nothing
    proc = _holding(rundir)
    try:
        who = run_lock.holder(rundir)
        assert who["pid"] == proc.pid and who["host"] == socket.gethostname() and who["since"]
        with pytest.raises(run_lock.RunLocked) as caught:
            run_lock.RunLock(rundir).acquire()
        message = str(caught.value)
        assert "\n" not in message and f"pid {proc.pid} on {socket.gethostname()} since" in message
        assert "--wait" in message and f"kill {proc.pid}" in message
        assert str(pickle.loads(pickle.dumps(caught.value))) == message  # from a Ray worker to its driver intact
        assert run_lock.holder(rundir)["pid"] == proc.pid  # the loser changed nothing
    finally:
        proc.kill()  # SIGKILL: no clean-up of its own
        proc.wait()
    assert run_lock.holder(rundir) is None  # the kernel released it: no stale lock
    t = time.monotonic()
    lock = run_lock.RunLock(rundir).acquire()
    assert time.monotonic() - t < 1.0 and not lock.waited
    assert run_lock.holder(rundir)["pid"] == os.getpid()
    lock.release()
    assert (rundir / run_lock.LOCK_FILE).read_text() == "" and run_lock.holder(rundir) is None


def test_wait_takes_the_lock_once_the_holder_ends(tmp_path):
    proc = _holding(tmp_path, then="time.sleep(1.5)")
    said = []
    try:
        lock = run_lock.RunLock(tmp_path).acquire(wait=True, log=said.append, poll_s=0.05)
    finally:
        proc.wait(30)
    assert lock.waited and len(said) == 1 and f"pid {proc.pid}" in said[0] and said[0].startswith("waiting for")
    lock.release()


def test_partial_saves_are_not_steps_and_only_remove_partial_saves(tmp_path):
    import jax.numpy as jnp

    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3)
    ckpt.save(2, {"w": jnp.arange(3.0)}, b"position")
    ckpt.close()
    partial = tmp_path / "checkpoints" / f"4{PARTIAL_SAVE}"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"half")
    assert Checkpointer(tmp_path / "checkpoints", keep=3).all_steps() == [2]  # ignored by readers
    said = []
    assert remove_partial_saves(tmp_path / "checkpoints", log=said.append) == [partial.name]
    assert not partial.exists() and (tmp_path / "checkpoints" / "2").is_dir() and "unfinished" in said[0]
    assert remove_partial_saves(tmp_path / "nothing_here") == []


# ---------------------------------------------------------------------------------- real runs, end to end


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    """The environment of the runs: a one-CPU Ray worker's XLA settings (not its pinning) and a compilation
    cache shared with the session's other tests of such runs (tests/test_stress.py): the first run compiles."""
    from orchestration.execution.cluster import worker_options
    from orchestration.execution.cpu_slots import ENV as PIN
    from shortcut.spec import ResourcesSpec

    worker = {k: v for k, v in worker_options(ResourcesSpec(cpus=1))["runtime_env"]["env_vars"].items() if k != PIN}
    cache = tmp_path_factory.getbasetemp() / "shortcut_jax_cache"
    return dict(os.environ, **worker, JAX_COMPILATION_CACHE_DIR=str(cache), SHORTCUT_TRACKING="off")


def _argv(workdir: Path, *extra: str) -> list[str]:
    return ["digits_flow", "--smoke", "--in-process", "--no-tracking", "--workdir", str(workdir), *SETS, *extra]


def _rundir(workdir: Path) -> Path:
    from shortcut.record import run_dir
    from shortcut.spec import smoke_version
    from shortcut.spec_files import load_spec

    return run_dir(smoke_version(load_spec("digits_flow", ["eval.steps=[1]"])), workdir)


class _Proc:
    """A run_experiment process whose output (stdout and stderr) is collected as it comes."""

    def __init__(self, argv: list[str], env: dict, *, stall_at: int | None = None):
        cmd = ([sys.executable, "-c", STALLING_RUN] if stall_at is not None
               else [sys.executable, "-m", "orchestration.run_experiment"])
        env = dict(env, STALL_AT=str(stall_at)) if stall_at is not None else env
        self.proc = subprocess.Popen(cmd + argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None or text in self.output, f"exited {self.proc.returncode}: {self.output}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s: {self.output[-3000:]}"
            time.sleep(0.1)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish(30)


def _snapshot(rundir: Path) -> dict[str, tuple[int, int]]:
    """Every path under the run directory with its size and modification time."""
    return {str(p.relative_to(rundir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in rundir.rglob("*")}


def _steps(rundir: Path) -> list[str]:
    return sorted(p.name for p in (rundir / "checkpoints").iterdir())


def _record(rundir: Path) -> dict:
    return json.loads((rundir / "run.json").read_text())


@pytest.mark.parametrize("order", [("plain", "wait"), ("wait", "plain")], ids=["plain-first", "wait-first"])
def test_two_runs_at_once(order, run_env, tmp_path):
    """Two runs of the same spec and work directory started half a second apart, a plain one and one with
    --wait, in both orders. Whichever takes the lock runs; the plain one, if second, exits 1 with one line
    naming the first (and writes nothing); the --wait one, if second, waits and resumes from the first's
    final checkpoint. Either way: no traceback, one finished record, intact checkpoints."""
    procs = {}
    for i, kind in enumerate(order):
        procs[kind] = _Proc(_argv(tmp_path, *(["--wait"] if kind == "wait" else [])), run_env)
        if i == 0:
            time.sleep(0.5)
    try:
        codes = {kind: p.finish() for kind, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    plain, wait = procs["plain"], procs["wait"]
    for p in procs.values():
        assert "Traceback" not in p.output, p.output[-3000:]
    rundir = _rundir(tmp_path)
    print(f"{order[0]} started first; the {'--wait' if codes['plain'] == 1 else 'plain'} run took the lock")
    if codes["plain"] == 1:  # the --wait run took the lock first
        lines = [line for line in plain.output.splitlines() if line.strip()]
        assert len(lines) == 1, plain.output
        assert lines[0].startswith(f"error: {rundir} is in use by another run (pid {wait.pid} on "), lines[0]
        assert "--wait" in lines[0]
        assert codes["wait"] == 0 and "waiting for" not in wait.output, wait.output[-3000:]
    else:  # the plain run took it first; the --wait run waited for it, then resumed its finished training
        assert codes == {"plain": 0, "wait": 0}, (plain.output[-2000:], wait.output[-2000:])
        assert f"waiting for {rundir}: in use by another run (pid {plain.pid} on " in wait.output, wait.output
        assert "resumed from checkpoint at step 4" in wait.output
        assert _record(rundir)["pid"] == wait.pid
    assert _record(rundir)["status"] == "finished"
    assert _steps(rundir) == ["2", "4"]
    assert run_lock.holder(rundir) is None


def test_holder_sigkilled_mid_checkpoint(run_env, tmp_path):
    """The holder stalls in the commit of step 4 (its `4.orbax-checkpoint-tmp` written, not renamed). A
    plain second run exits 1 naming it and touches nothing, the leftover included; a --wait run waits;
    the holder is SIGKILLed; the --wait run takes the lock at once, removes the unfinished save and
    resumes from step 2, the last complete checkpoint."""
    rundir = _rundir(tmp_path)
    holder = _Proc(_argv(tmp_path), run_env, stall_at=4)
    waiter = None
    try:
        holder.wait_for("stalled mid-checkpoint")
        assert (rundir / "checkpoints" / f"4{PARTIAL_SAVE}").is_dir() and _steps(rundir) == ["2", f"4{PARTIAL_SAVE}"]
        assert run_lock.holder(rundir)["pid"] == holder.pid
        before = _snapshot(rundir)

        loser = _Proc(_argv(tmp_path), run_env)
        assert loser.finish() == 1
        lines = [line for line in loser.output.splitlines() if line.strip()]
        assert len(lines) == 1, loser.output
        assert f"in use by another run (pid {holder.pid} on {socket.gethostname()} since " in lines[0]
        assert _snapshot(rundir) == before  # nothing written, nothing deleted: the leftover is not its to clean

        waiter = _Proc(_argv(tmp_path, "--wait"), run_env)
        waiter.wait_for(f"in use by another run (pid {holder.pid}")
        assert waiter.proc.poll() is None and _snapshot(rundir) == before
        os.kill(holder.pid, signal.SIGKILL)
        holder.finish(30)
        assert waiter.finish() == 0, waiter.output[-3000:]
    finally:
        holder.kill()
        if waiter is not None:
            waiter.kill()
    out = waiter.output
    assert "Traceback" not in out, out[-3000:]
    checkpoints = rundir / "checkpoints"
    removed = f"removed 1 unfinished checkpoint save(s) left by an earlier run in {checkpoints}: 4{PARTIAL_SAVE}"
    assert removed in out, out[-3000:]
    assert "resumed from checkpoint at step 2" in out
    record = _record(rundir)
    assert record["status"] == "finished" and record["resumed_from"] == 2 and record["pid"] == waiter.pid
    assert _steps(rundir) == ["2", "4"]
    assert run_lock.holder(rundir) is None


# ------------------------------------------------------------------------------------- tables and sweeps


def test_a_table_waits_for_a_node_running_elsewhere(tmp_path):
    """The table's scheduler meets a locked node: it does not start it, reports who runs it, and once that
    run lets go takes its record (finished: cached) or starts the node itself (not finished)."""
    from orchestration.execution.graph import Node, _check_elsewhere, _running_elsewhere
    from shortcut.record import write_json

    from shortcut.spec import smoke_version

    from shortcut.spec_files import load_spec

    spec = smoke_version(load_spec("digits_flow", ["eval.steps=[1]"]))
    rundir = _rundir(tmp_path)
    node, said = Node(spec, []), []
    assert not _running_elsewhere(node, tmp_path, said.append) and node.status == "waiting"

    proc = _holding(rundir, then="sys.stdin.readline()")  # holds until told
    try:
        assert _running_elsewhere(node, tmp_path, said.append) and node.status == "elsewhere"
        assert f"running elsewhere (pid {proc.pid} on " in said[-1]
        _check_elsewhere(node, tmp_path, said.append)
        assert node.status == "elsewhere"  # still held: still waiting
        write_json(rundir / "run.json", {"name": spec.name, "spec_hash": spec.hash(), "status": "finished",
                                         "run_dir": str(rundir), "pid": proc.pid, "host": "h", "evaluation": []})
    finally:
        proc.communicate("\n", timeout=30)
    _check_elsewhere(node, tmp_path, said.append)
    assert node.status == "cached" and node.outcome["status"] == "finished"
    assert said[-1].startswith(f"{node.label}: finished elsewhere (pid {proc.pid} on h)")

    other = Node(spec, [], status="elsewhere")
    write_json(rundir / "run.json", {"name": spec.name, "spec_hash": spec.hash(), "status": "interrupted"})
    _check_elsewhere(other, tmp_path, said.append)
    assert other.status == "waiting" and "ended (interrupted); starting it here" in said[-1]
