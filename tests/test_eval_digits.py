"""The shipped digits classifier and the fd_digits metric built on it."""

import json

import numpy as np
import pytest

from shortcut.evaluation import digits_classifier as dc
from shortcut.evaluation.train_digits_classifier import train_digits_classifier


@pytest.fixture(scope="module")
def net():
    return dc.DigitsFeatureNet.load()


@pytest.fixture(scope="module")
def data():
    return dc.load_digits_data()


def test_shipped_weights_are_small_and_hash_matches_record(net):
    info = json.loads(dc.INFO_FILE.read_text())
    assert dc.WEIGHTS_FILE.stat().st_size < 1_000_000
    assert net.sha256 == info["sha256"]
    assert net.name == "fd_digits"


def test_shipped_weights_reach_recorded_test_accuracy(net, data):
    images, labels = data
    test = dc.test_split_mask(len(labels))
    acc = dc.class_accuracy(images[test], labels[test], net)
    info = json.loads(dc.INFO_FILE.read_text())
    assert acc == pytest.approx(info["test_accuracy"], abs=1e-9)
    assert acc >= 0.95
    assert net.features(images[:5]).shape == (5, dc.HIDDEN[-1])
    assert net.logits(images[:5, :, :, 0]).shape == (5, 10)  # [N, 8, 8] accepted too


def test_reference_stats_cover_whole_dataset(net):
    ref = dc.digits_reference_stats(net)
    assert ref.count == 1797
    assert ref.provenance["feature_net_sha256"] == net.sha256
    assert ref.sigma.shape == (dc.HIDDEN[-1],) * 2


def test_data_scores_near_zero_noise_and_blank_far_higher(net, data):
    images, _ = data
    rng = np.random.default_rng(0)
    half = dc.fd_digits(images[rng.permutation(len(images))[: len(images) // 2]], net)
    assert abs(dc.fd_digits(images, net)) < 1e-6
    assert half < 3.0
    noise = dc.fd_digits(rng.uniform(-1, 1, size=(900, 8, 8, 1)), net)
    blank = dc.fd_digits(np.full((900, 8, 8, 1), -1.0) + 1e-3 * rng.normal(size=(900, 8, 8, 1)), net)
    assert noise > 100 * half and blank > 100 * half


def test_class_accuracy_on_wrong_labels_is_low(net, data):
    images, labels = data
    assert dc.class_accuracy(images, (labels + 1) % 10, net) < 0.05
    with pytest.raises(ValueError):
        dc.class_accuracy(images[:10], labels[:9], net)


def test_retraining_reproduces_shipped_weights():
    params, metrics = train_digits_classifier()
    flat = dc.flatten_params(params)
    with np.load(dc.WEIGHTS_FILE) as f:
        assert sorted(f.files) == sorted(flat)
        for k in f.files:
            # Bit-identical on the machine that made them; tolerance covers other XLA builds.
            np.testing.assert_allclose(flat[k], f[k], rtol=1e-4, atol=1e-5, err_msg=k)
    info = json.loads(dc.INFO_FILE.read_text())
    assert metrics["test_accuracy"] == pytest.approx(info["test_accuracy"], abs=2 / 360)
