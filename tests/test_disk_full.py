"""A full disk loses nothing (shortcut/disk.py): on a small tmpfs work directory, a run whose disk fills
during a checkpoint, and one whose disk is full at a record write, each exit with one line naming the run
directory and the space needed; the last complete checkpoint and record stay intact; once space is freed
the same command resumes from them and ends with the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shortcut.checkpoint import remove_partial_saves

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
SMALL = ["eval.steps=[1]"]  # --smoke: 4 steps, a checkpoint every 2

pytestmark = [pytest.mark.timeout(3600), pytest.mark.xdist_group("processes")]  # xdist group: see conftest.py


@pytest.fixture
def tmpfs(tmp_path):
    """A 32 MB tmpfs (mounting needs root; without it the test is skipped, saying why)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({done.stderr.strip() or 'mount failed'}; needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _run(workdir: Path, env: dict) -> subprocess.CompletedProcess:
    """The command a user runs (the same every time): a --smoke run in this process, no tracking."""
    cmd = [sys.executable, "-m", "orchestration.run_experiment", "digits_flow", "--smoke", "--in-process",
           "--no-tracking", "--workdir", str(workdir), *[a for s in SMALL for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _blocks(path: Path) -> int:
    """Bytes the files under `path` take on their disk (whole pages on a tmpfs)."""
    return sum(p.stat().st_blocks * 512 for p in [path, *path.rglob("*")] if p.is_file())


def _fill(mount: Path, leave: int) -> Path:
    """Take all the free space of `mount` but `leave` bytes (whole pages) with a filler file."""
    filler = mount / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(mount)
    take = st.f_bavail * st.f_frsize - leave
    if take > 0:
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, take)
        finally:
            os.close(fd)
    return filler


def _numbers(record: dict) -> dict:
    return {"loss": record["train"]["final"]["loss"],
            "evaluation": [(e["train_step"], e["num_steps"], e.get("value")) for e in record["evaluation"]],
            "samples": {k: v["grid"].split("/")[-1] for k, v in record["samples"].items()}}


def _one_error_line(done: subprocess.CompletedProcess, rundir: Path) -> str:
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"the disk of {rundir} is full" in errors[0] and "MB more" in errors[0], done.stderr
    return errors[0]


def test_a_full_disk_loses_nothing_and_the_same_command_resumes(tmp_path, tmpfs):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))  # compiled once, off the tmpfs
    reference = _run(tmp_path / "reference", env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    [ref_dir] = (tmp_path / "reference" / "digits_flow").iterdir()
    checkpoint = _blocks(ref_dir / "checkpoints" / "2")
    others = _blocks(ref_dir) - _blocks(ref_dir / "checkpoints") - _blocks(ref_dir / "samples")
    expected = _numbers(json.loads((ref_dir / "run.json").read_text()))

    # 1. the disk fills during the second checkpoint: room for the first, and half of one more
    workdir = tmpfs / "runs"
    _fill(tmpfs, leave=others + checkpoint + checkpoint // 2 + 16 * PAGE)
    done = _run(workdir, env)
    rundir = workdir / "digits_flow" / ref_dir.name
    _one_error_line(done, rundir)
    steps = sorted(int(p.name) for p in (rundir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2], steps  # the complete one; the cut-short save is no step
    record = json.loads((rundir / "run.json").read_text())  # a whole record
    assert record["spec_hash"].startswith(ref_dir.name)

    # 2. the disk is full when the next run writes its record: it stops there, the record unchanged
    remove_partial_saves(rundir / "checkpoints", log=lambda s: None)  # what the run itself does first
    before = (rundir / "run.json").read_bytes()
    _fill(tmpfs, leave=0)
    done = _run(workdir, env)
    _one_error_line(done, rundir)
    assert (rundir / "run.json").read_bytes() == before
    assert sorted(int(p.name) for p in (rundir / "checkpoints").iterdir() if p.name.isdigit()) == [2]

    # 3. space freed: the same command resumes from step 2 and ends as the uninterrupted run did
    (tmpfs / "filler").unlink()
    done = _run(workdir, env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((rundir / "run.json").read_text())
    assert record["status"] == "finished" and record["resumed_from"] == 2
    assert _numbers(record) == expected
