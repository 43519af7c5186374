"""benchmarks/accelerator.py end to end at its --smoke size (the GPU figures come from a GPU machine), and which
plan reports benchmarks/plan_table.py may reuse, and which runs benchmarks/table_wall.py counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_accelerator_benchmark_smoke_writes_its_report(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--smoke", "--out-dir", str(tmp_path),
                          "--budget-s", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (report_path,) = tmp_path.glob("*-smoke.json")
    report = json.loads(report_path.read_text())
    assert report["smoke"] is True and report["targets"]["applies"] is False
    assert [(r["model"], r["strategy"]) for r in report["train"]] == [
        ("DiT-B/2", "dp"), ("DiT-B/2", "fsdp"), ("DiT-XL/2", "dp"), ("DiT-XL/2", "fsdp")]
    for r in report["train"]:
        assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["flops_per_step_per_device"] > 0
    one, four = report["fid"]
    assert (one["num_steps"], one["num_samples"], four["num_steps"]) == (1, 16, 4)
    assert one["wall_s"] > 0 and "extrapolated_wall_s" not in one
    # no budget left: the 4-step FID runs one batch and says its full-size time is extrapolated
    assert four["num_samples"] == four["batch"] and four["extrapolated_wall_s"] == 2 * four["wall_s"]
    assert any("random-init" in n for n in report["notes"])  # the stand-in weights are named
    md = report_path.with_suffix(".md").read_text()
    assert "MFU" in md and "< 90 s" in md and ">= 45%" in md


def test_plan_table_reuses_only_reports_of_the_same_spec_made_from_a_clean_commit(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from plan_table import reusable
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    report = tmp_path / "report.json"
    assert not reusable(report, "abc")  # none written yet
    for fields, expected in [({}, False),  # names no commit
                             ({"git_commit": "e13ab9e-dirty", "git_changes": ["M shortcut/model.py"]}, False),
                             ({"git_commit": "e13ab9e", "git_changes": []}, True),
                             # reports written before record.git_changes left the outputs out list them
                             ({"git_commit": "e13ab9e-dirty", "git_changes": ["M docs/planning.md",
                                                                              "M results/plans/a.json"]}, True)]:
        report.write_text(json.dumps({"spec_hash": "abc", **fields}))
        assert reusable(report, "abc") is expected, fields
    assert not reusable(report, "another spec hash")


def test_table_wall_counts_only_the_named_tables_runs(tmp_path, capsys):
    from orchestration.execution.graph import load_table, runs_of

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import table_wall
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    name, key = next(k for k in runs_of(load_table("ablation_shortcut_digits")) if k[0] == "digits_shortcut_wavelet")
    for i, (run, spec_hash, seconds) in enumerate([(name, key, 100), ("digits_flow", "0" * 64, 50)]):
        rundir = tmp_path / run / spec_hash[:12]
        rundir.mkdir(parents=True)
        (rundir / "run.json").write_text(json.dumps({
            "name": run, "spec_hash": spec_hash, "status": "finished", "spec": {"seed": i},
            "started": "2026-12-06T00:00:00+00:00",
            "finished": f"2026-12-06T00:{seconds // 60:02d}:{seconds % 60:02d}+00:00",
            "timings": {"setup_s": 1.0, "train_s": seconds - 11.0, "evaluate_128": 10.0}}))
    assert table_wall.main([str(tmp_path), "--slots", "1"]) == 0
    assert "runs: 2;" in capsys.readouterr().out
    assert table_wall.main([str(tmp_path), "--slots", "1", "--table", "ablation_shortcut_digits"]) == 0
    out = capsys.readouterr().out
    assert "runs: 1;" in out and "digits_flow" not in out and "| 100 (1 / 89 / 10) |" in out
