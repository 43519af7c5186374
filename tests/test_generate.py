"""`generate` and `evaluate_samples`: sample files of a short digits run score as in the run itself."""

import json

import numpy as np
import pytest
from PIL import Image

from orchestration import evaluate_samples, generate
from shortcut.evaluation.sample_metrics import SampleStats
from shortcut.record import run_dir
from shortcut.run import run
from shortcut.sample_files import SampleFileWriter, from_sample_images, read_samples, to_sample_images
from shortcut.spec_files import load_spec

NUM = 120
SHORT = ["train.steps=10", "train.log_every=10", "train.checkpoint_every=10", "eval.steps=[4, 1]",
         f"eval.num_samples={NUM}", "eval.batch_size=50", "eval.grid_size=16", "eval.save_samples=true"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    spec = load_spec("digits_shortcut", SHORT)
    record = run(spec, workdir=workdir, log=lambda s: None)
    return workdir, run_dir(spec, workdir), record


def test_sample_file_scores_as_inside_the_run(digits_run, tmp_path):
    workdir, rundir, record = digits_run
    inside = next(e for e in record["evaluation"] if e["num_steps"] == 1)
    assert {"is_digits", "precision_digits", "recall_digits", "class_accuracy"} <= set(inside)
    assert inside["precision_recall_k"] == 3 and inside["precision_recall_reference"] == 359  # the held-out digits
    saved = record["samples"]["1"]["samples_file"]  # eval.save_samples: the evaluation's own samples
    out = tmp_path / "s.npz"
    assert generate.main(["digits_shortcut", "--workdir", str(workdir), *sum([["--set", o] for o in SHORT], []),
                          "--steps", "1", "--num", str(NUM), "--batch-size", "50", "--out", str(out)]) == 0
    images, labels = read_samples(out)
    ours, their_labels = read_samples(saved)
    np.testing.assert_array_equal(images, ours)  # same seed and count: the run's evaluation samples, bit for bit
    np.testing.assert_array_equal(labels, their_labels)
    assert images.shape == (NUM, 8, 8, 3) and images.dtype == np.uint8 and list(labels[:11]) == [*range(10), 0]
    entry = evaluate_samples.evaluate_file(out, "digits", batch_size=50)
    # the file holds the samples rounded to 8 bits; the run scored them before the rounding
    assert entry["value"] == pytest.approx(inside["value"], rel=2e-2)
    for key in ("is_digits", "precision_digits", "recall_digits", "class_accuracy"):
        assert entry[key] == pytest.approx(inside[key], abs=0.03), key
    assert entry["feature_net_sha256"] == inside["feature_net_sha256"]
    assert entry["reference_stats_sha256"] == inside["reference_stats_sha256"]


def test_evaluate_samples_is_the_run_metric_on_the_same_images(digits_run, tmp_path, capsys):
    """The same code path exactly: scoring the file's images inside the evaluation gives the file's score."""
    from shortcut.evaluation.digits_metric import digits_metric
    from shortcut.evaluation.sample_metrics import compute_sample_metrics

    _, _, record = digits_run
    path = record["samples"]["4"]["samples_file"]
    images, _ = read_samples(path)
    metric = digits_metric(heldout_split="heldout")  # what `--reference digits` means
    direct = compute_sample_metrics(lambda s, n: from_sample_images(images[s:s + n], 1), NUM, 50,
                                    metric.reference, metric.net)
    assert evaluate_samples.main([path, "--reference", "digits", "--batch-size", "50",
                                  "--json", str(tmp_path / "e.json")]) == 0
    entry = json.loads((tmp_path / "e.json").read_text())
    assert entry["value"] == direct.value and entry["is_digits"] == direct.record["is_digits"]
    assert entry["precision_digits"] == direct.record["precision_digits"]
    assert f"fd_digits = {direct.value:.4f}" in capsys.readouterr().out


def test_generate_png_grids_classes_and_errors(digits_run, tmp_path, capsys):
    _, rundir, _ = digits_run
    out = tmp_path / "g.png"
    assert generate.main([str(rundir), "--steps", "4", "1", "--num", "20", "--classes", "3,7", "--out", str(out)]) == 0
    for n in (4, 1):
        with Image.open(tmp_path / f"g_{n}steps.png") as img:
            assert img.width >= generate.GRID_MIN_SIZE  # 5 x 9 px cells, upscaled
    npz = tmp_path / "c.npz"
    assert generate.main([str(rundir), "--steps", "1", "--num", "6", "--classes", "3,7", "--out", str(npz)]) == 0
    assert list(read_samples(npz)[1]) == [3, 7, 3, 7, 3, 7]
    capsys.readouterr()
    for argv, message in [([str(rundir), "--steps", "3"], "--steps: eval.steps: each step count must be a power of two"),
                          ([str(rundir), "--steps", "1", "--classes", "12"], "--classes: classes are 0..9"),
                          ([str(tmp_path), "--steps", "1"], "is not a run directory"),
                          (["no_such_spec", "--steps", "1"], "no run directory or spec named 'no_such_spec'"),
                          ([str(rundir), "--steps", "1", "--out", "x.jpg"], "--out: expected a .png")]:
        assert generate.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_evaluate_samples_rejects_files_in_another_layout(tmp_path, capsys):
    np.savez(tmp_path / "float.npz", np.zeros((4, 8, 8, 3), np.float32))
    colour = np.zeros((4, 8, 8, 3), np.uint8)
    colour[..., 0] = 255
    np.savez(tmp_path / "colour.npz", colour)
    np.savez(tmp_path / "big.npz", np.zeros((4, 16, 16, 3), np.uint8))
    for name, message in [("missing.npz", "no such sample file"), ("float.npz", "arr_0 must be uint8 [N, H, W, 3]"),
                          ("colour.npz", "the images are not grey"), ("big.npz", "fd_digits needs 8x8 images")]:
        assert evaluate_samples.main([str(tmp_path / name), "--reference", "digits"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_sample_file_writer_resumes_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (7, 4, 4, 1)).astype(np.float32)
    path = tmp_path / "s.npz"
    w = SampleFileWriter(path, 7, (4, 4), with_labels=True)
    w.write(0, images[:3], np.arange(3))
    del w  # killed: a new writer for the same file finds what was written
    w = SampleFileWriter(path, 7, (4, 4), with_labels=True)
    assert w.missing(2) == [(3, 2), (5, 2)]
    w.write(3, images[3:], np.arange(3, 7))
    w.finish()
    u, labels = read_samples(path)
    assert u.shape == (7, 4, 4, 3) and list(labels) == list(range(7))
    np.testing.assert_array_equal(u, to_sample_images(images))
    back = from_sample_images(u, 1)  # grey channel recovered exactly; values within half an 8-bit step
    np.testing.assert_array_equal(to_sample_images(back), u)
    assert np.max(np.abs(back - images)) <= 1 / 127.5 / 2 + 1e-6
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]


def test_sample_stats_checkpoint_round_trip():
    rng = np.random.default_rng(1)
    feats, logits = rng.normal(size=(30, 5)), rng.normal(size=(30, 4))
    whole = SampleStats(5, 30, 4, pr_samples=20).update((feats, logits))
    part = SampleStats(5, 30, 4, pr_samples=20).update((feats[:12], logits[:12]))
    part = SampleStats.from_state_dict(part.state_dict()).update((feats[12:], logits[12:]))
    np.testing.assert_allclose(part.running.cov, whole.running.cov)
    np.testing.assert_allclose(part.inception.scores(), whole.inception.scores())
    np.testing.assert_array_equal(part.pr_features, feats[:20].astype(np.float32))
