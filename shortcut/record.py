"""The run record (`run.json`) and the run directory it lives in: one place that reads, writes and judges them.

A run's directory is `<workdir>/<spec name>/<spec hash[:12]>/` (`RunDir`): its record, its lock
(shortcut/run_lock.py) and its checkpoints (shortcut/checkpoint.py). The record says how the run ended in
`status`, a `Status`. Writes are atomic (a reader never sees half a record), and a record is *finished*
only for the spec hash it was made for.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import os
import subprocess
from pathlib import Path

import numpy as np

from shortcut.disk import write_atomic


class Status(enum.StrEnum):
    """How a run stands, as its record says (a plain string in run.json)."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM; the last checkpoint is kept
    STOPPED = "stopped"  # a hook ended training on purpose (a sweep's early stopping)
    KILLED = "killed"  # its process died without an exception; written by the driver (orchestration/execution/killed.py)


RUNNING, FINISHED, FAILED, INTERRUPTED, STOPPED, KILLED = Status
STATUSES = tuple(Status)
FILE = "run.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_dir(spec, workdir: str | Path | None = None) -> Path:
    """Where a spec's run lives: `<workdir>/<name>/<hash[:12]>/` (workdir: the spec's output.workdir)."""
    return Path(workdir or spec.output.workdir) / spec.name / spec.hash()[:12]


@dataclasses.dataclass(frozen=True)
class RunDir:
    """One run's directory: its record (run.json), its lock's holder and its checkpoints."""

    path: Path

    @classmethod
    def of(cls, spec, workdir: str | Path | None = None) -> "RunDir":
        return cls(run_dir(spec, workdir))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def read(self) -> dict | None:
        """The record, None when there is none (or it does not parse)."""
        return read(self.path)

    def write(self, record: dict) -> None:
        """Write the record atomically."""
        write(self.path, record)

    def status(self) -> Status | None:
        record = self.read()
        return Status(record["status"]) if record and record.get("status") in STATUSES else None

    def finished(self, spec_hash: str | None = None) -> dict | None:
        """The record if it is of a finished run (of the spec with `spec_hash`, when given), else None."""
        record = self.read()
        return record if finished(record, spec_hash) else None

    def holder(self) -> dict | None:
        """Who holds the run directory's lock now (shortcut/run_lock.py), None when it is free."""
        from shortcut import run_lock

        return run_lock.holder(self.path)

    def lock(self):
        """The run directory's lock (shortcut/run_lock.py RunLock), not yet taken."""
        from shortcut.run_lock import RunLock

        return RunLock(self.path)

    def checkpointer(self, keep: int | None = None):
        """The Orbax checkpoints of the run (shortcut/checkpoint.py Checkpointer); close it after use."""
        from shortcut.checkpoint import Checkpointer

        return Checkpointer(self.checkpoints, keep=keep)

    def latest_step(self) -> int | None:
        """The step of the latest checkpoint, None when there is none."""
        if not self.checkpoints.is_dir():
            return None
        checkpointer = self.checkpointer()
        try:
            return checkpointer.latest_step()
        finally:
            checkpointer.close()


def now() -> str:
    """The time a record notes (started, finished): UTC, to the second, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def jsonable(obj):
    """numpy scalars and arrays as numbers and lists; anything else unknown as its string."""
    return obj.tolist() if isinstance(obj, (np.generic, np.ndarray)) else str(obj)


def write_json(path: str | Path, content: dict, indent: int | None = 2) -> None:
    """Atomic, durable write of a JSON file (shortcut/disk.py): a reader never sees it half written, and
    writers in other processes or threads never share a temporary file."""
    write_atomic(path, json.dumps(content, indent=indent, default=jsonable) + "\n")


def read(rundir: str | Path) -> dict | None:
    """The record in a run directory (or a record file), None when there is none or it does not parse."""
    path = Path(rundir)
    path = path / FILE if path.is_dir() or not path.suffix else path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write(rundir: str | Path, record: dict) -> None:
    write_json(Path(rundir) / FILE, record)


def last_evaluation(record: dict) -> list[dict]:
    """The record's evaluation entries of its last evaluated training step ([] when none)."""
    entries = record.get("evaluation") or []
    last = max((e["train_step"] for e in entries), default=None)
    return [e for e in entries if e["train_step"] == last]


def finished(record: dict | None, spec_hash: str | None = None) -> bool:
    """Whether a record is of a finished run (of the spec with `spec_hash`, when given)."""
    return bool(record) and record.get("status") == FINISHED and (spec_hash is None or
                                                                   record.get("spec_hash") == spec_hash)


def git_provenance(path: str | Path = REPO_ROOT) -> dict:
    """{"git_commit": HEAD of the checkout at `path`, with "-dirty" when tracked files outside OUTPUT_FOLDERS
    differ from it, "git_changes": those files}: $SHORTCUT_GIT_COMMIT when set (a Ray job's uploaded copy has no .git),
    "unknown" when git cannot tell."""
    if os.environ.get("SHORTCUT_GIT_COMMIT"):
        return {"git_commit": os.environ["SHORTCUT_GIT_COMMIT"], "git_changes": []}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_changes": []}
    changes = git_changes(path)
    return {"git_commit": head + ("-dirty" if changes else ""), "git_changes": changes}


def git_commit(path: str | Path = REPO_ROOT) -> str:
    """The "git_commit" of git_provenance()."""
    return git_provenance(path)["git_commit"]


# What the project's commands write into the checkout (run records and tables, plan reports, the planning
# table): a change there alters no computation, and a command that writes several outputs would otherwise
# call the tree dirty from its second output on.
OUTPUT_FOLDERS = ("results/", "docs/")


def git_changes(path: str | Path = REPO_ROOT) -> list[str]:
    """The tracked files outside OUTPUT_FOLDERS that differ from HEAD (`git status --porcelain` lines),
    [] when clean or unknown."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return code_changes([line.strip() for line in out.splitlines() if line.strip()])


def code_changes(changes: list[str]) -> list[str]:
    """The `git status --porcelain` lines of `changes` whose file lies outside OUTPUT_FOLDERS."""
    def path(line: str) -> str:
        return line.split(maxsplit=1)[-1].split(" -> ")[-1].strip('"')
    return [line for line in changes if not path(line).startswith(OUTPUT_FOLDERS)]
