"""A run never overwrites a committed results record unasked (orchestration/reporting/results.py export_run),
on a throwaway git repository, and what the driver then prints (orchestration/execution/worker.py)."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestration.execution.worker import export
from orchestration.reporting.console import kept_lines
from orchestration.reporting.results import KeptRecord, export_path, export_run
from tracking_fixtures import make_record, make_spec


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    return repo


def _record(tmp_path, value: float, seed: int = 0, commit: str = "0123456789abcdef-dirty") -> dict:
    record = make_record(tmp_path / "runs", make_spec("digits_shortcut", "shortcut", "digits", seed=seed),
                         {128: value, 4: value + 1, 1: value + 2}, grids=False)
    return dict(record, git_commit=commit, git_changes=[])


def test_a_committed_record_survives_a_rerun_and_is_replaced_only_when_asked(tmp_path, repo):
    results = repo / "results"
    first = _record(tmp_path, 3.5)
    path = export_run(first, results)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "table")
    before = path.read_text()

    rerun = _record(tmp_path, 3.6)
    with pytest.raises(KeptRecord) as kept:
        export_run(rerun, results)
    assert kept.value.path == path and path.read_text() == before  # nothing written
    out = export(rerun, str(results))
    assert "exported" not in out and out["kept_record"]["path"] == str(path)
    lines = kept_lines({**out, "run_dir": rerun["run_dir"], "evaluation": rerun["evaluation"]})
    assert lines[0].startswith("  kept the committed record of 0123456: ") and "--replace-record" in lines[0]
    assert "this run 3.600 / 4.600 / 5.600; committed 3.500 / 4.500 / 5.500 from 0123456" in lines[1]
    assert "largest difference 0.100" in lines[1]

    assert export_run(rerun, results, replace=True) == path
    assert json.loads(path.read_text())["evaluation"][0]["value"] == 3.6

    # a record git does not track is replaced as before
    other = _record(tmp_path, 7.0, seed=1)
    untracked = export_run(other, results)
    assert export_run(_record(tmp_path, 7.5, seed=1), results) == untracked
    assert json.loads(untracked.read_text())["evaluation"][0]["value"] == 7.5


def test_outside_git_a_record_from_a_clean_commit_is_kept(tmp_path):
    results = tmp_path / "results"
    export_run(_record(tmp_path, 3.5, commit="abcdef0123456789"), results)
    with pytest.raises(KeptRecord):
        export_run(_record(tmp_path, 3.6), results)
    dirty = _record(tmp_path, 4.0, seed=2, commit="abcdef0123456789-dirty")
    path = export_run(dirty, results)
    assert export_run(_record(tmp_path, 4.5, seed=2), results) == path == export_path(dirty, results)
