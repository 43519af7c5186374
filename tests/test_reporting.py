"""`make_tables --metric` on the scores recorded beside the Frechet distance, the steps plot, and the
end-of-run summary's tracking line."""

import json

from PIL import Image

from orchestration import make_tables
from orchestration.reporting.console import tracking_lines


def _export(seed: int, scale: float) -> dict:
    entries = [{"train_step": 100, "num_steps": n, "metric": "fd_digits", "value": 10.0 / n, "num_samples": 200,
                "cfg_scale": 1.0, "seed": seed + 1, "params": "ema", "feature_net": "fd_digits",
                "is_digits": scale * n ** 0.5, "precision_digits": 0.5, "recall_digits": 0.25}
               for n in (128, 4, 1)]
    return {"schema": 1, "name": "digits_shortcut", "spec_hash": f"h{seed}", "config_hash": "c", "method": "shortcut",
            "dataset": "digits", "seed": seed, "arch": "DiT-tiny/2", "smoke": False, "status": "finished",
            "finished": f"2026-01-0{seed + 1}", "evaluation": entries, "samples": {}, "spec": {}}


def test_make_tables_metric_shows_a_recorded_score(tmp_path, capsys):
    runs = tmp_path / "runs" / "digits_shortcut"
    runs.mkdir(parents=True)
    for seed, scale in ((0, 1.0), (1, 3.0)):
        (runs / f"h{seed}.json").write_text(json.dumps(_export(seed, scale)))
    assert make_tables.main(["--results-dir", str(tmp_path), "--metric", "is_digits"]) == 0
    table = (tmp_path / "tables" / "table1_digits_is_digits.md").read_text()
    # is_digits at 4 steps: 2 and 6 over the two seeds -> 4.00 ± 2.83; no paper columns (the paper has no is_digits)
    assert "4.00 ± 2.83" in table and "(paper)" not in table and "Inception Score's formula" in table
    assert not (tmp_path / "tables" / "table1_digits_fd_digits.md").exists()
    with Image.open(tmp_path / "figures" / "steps_digits_is_digits.png") as img:
        assert img.width > 600
    assert make_tables.main(["--results-dir", str(tmp_path), "--metric", "precision"]) == 2  # an Inception score
    assert "error: --metric precision: no run records it" in capsys.readouterr().err


def test_summary_prints_the_run_page_and_how_to_bring_the_server_back(tmp_path):
    rundir = tmp_path / "work" / "digits_shortcut" / "abc"
    rundir.mkdir(parents=True)
    (tmp_path / "work" / "mlflow").mkdir()
    record = {"run_dir": str(rundir)}
    assert tracking_lines(record) == []  # not tracked
    (rundir / "mlflow_run.json").write_text(json.dumps({"run_id": "r1", "experiment_id": "7",
                                                        "tracking_uri": "http://127.0.0.1:5123"}))
    url, again = tracking_lines(record)
    assert url == "  tracking: http://127.0.0.1:5123/#/experiments/7/runs/r1"
    assert f"shortcut_tracking server start --workdir {tmp_path / 'work'}" in again
    (rundir / "mlflow_run.json").write_text(json.dumps({"run_id": "r1", "experiment_id": "7",
                                                        "tracking_uri": "https://mlflow.example.org"}))
    assert tracking_lines(record) == ["  tracking: https://mlflow.example.org/#/experiments/7/runs/r1"]


def test_summary_lists_a_step_count_evaluated_at_two_scales(tmp_path):
    from orchestration.reporting.console import summary

    entries = [{"train_step": 20, "num_steps": n, "cfg_scale": w, "metric": "fid", "value": v}
               for n, w, v in ((128, 1.5, 10.0), (128, 1.0, 12.0), (1, 1.0, 30.0))]
    samples = {"128_w1.5": {"num_steps": 128, "cfg_scale": 1.5, "network_evaluations": 256, "grid": "a.png"},
               "128_w1": {"num_steps": 128, "cfg_scale": 1.0, "network_evaluations": 128, "grid": "b.png"},
               "1": {"num_steps": 1, "cfg_scale": 1.0, "network_evaluations": 1, "grid": "c.png"}}
    record = {"name": "s", "status": "finished", "run_dir": str(tmp_path), "evaluation": entries, "samples": samples}
    lines = summary(record).splitlines()[1:]
    assert ["10.000" in lines[0], "12.000" in lines[1], "30.000" in lines[2]] == [True] * 3
    assert "tracking" not in summary(record, tracked=False)


def test_runs_recorded_before_a_key_was_added_average_with_later_runs(tmp_path):
    """A key added later (KEYS_HASHED_WHEN_SET) at the value earlier runs had leaves the config hash alone, in the
    function and in the records load_exports reads (whatever config hash the record was exported with)."""
    from orchestration.reporting.results import config_hash, load_exports
    from shortcut.spec_files import load_spec

    later = load_spec("digits_shortcut").model_dump(mode="json")
    earlier = json.loads(json.dumps(later))
    for key in ("ot_pool", "ot_classes", "guidance", "guidance_range", "guidance_step"):
        del earlier["method"][key]
    assert config_hash(earlier) == config_hash(later)
    changed = json.loads(json.dumps(later))
    changed["method"]["ot_pool"] = 4
    assert config_hash(changed) != config_hash(later)
    for seed, spec in enumerate((earlier, later)):
        rec = _export(seed, 1.0) | {"spec": spec, "config_hash": f"as exported {seed}"}
        (tmp_path / "runs" / "digits_shortcut").mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / "digits_shortcut" / f"h{seed}.json").write_text(json.dumps(rec))
    assert {r["config_hash"] for r in load_exports(tmp_path)} == {config_hash(later)}
