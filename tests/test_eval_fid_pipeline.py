"""Streaming / resumable / sharded FID pipeline, end to end with RANDOM Inception weights.

A pipeline test, not a score: the weights are random and the images are noise. To keep
CPU cost down the network runs at 75x75 (its smallest valid input) instead of 299.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shortcut.evaluation.fid import InceptionFeatureNet, compute_fid
from shortcut.evaluation.inception import random_inception_variables
from shortcut.evaluation.inception_weights import save_variables_npz, sha256_file
from shortcut.evaluation.reference_stats import ReferenceStats, compute_reference_stats
from shortcut.evaluation.streaming import compute_stats

SIZE = 75
REPO = Path(__file__).resolve().parents[1]


def synthetic_images(start, n, seed=0, shift=0.0):
    """Image i is a deterministic function of (seed, i): regenerated exactly on resume."""
    return np.stack([
        np.clip(np.random.default_rng([seed, i]).uniform(-1, 1, (16, 16, 3)) + shift, -1, 1)
        for i in range(start, start + n)
    ]).astype(np.float32)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "random_inception.npz"
    save_variables_npz(path, random_inception_variables(seed=0), {"source_sha256": "random-test-weights"})
    return InceptionFeatureNet.load(path, expected_sha256=None, image_size=SIZE)


class Killed(RuntimeError):
    pass


def test_interrupted_run_resumes_to_identical_stats(net, tmp_path):
    num, bs = 22, 4  # 6 batches, the last one partial
    full = compute_stats(synthetic_images, net.features, num, bs)

    calls = []

    def dies_after_three(start, n):
        if len(calls) == 3:
            raise Killed
        calls.append(start)
        return synthetic_images(start, n)

    ckpt = tmp_path / "fid_ckpt.npz"
    with pytest.raises(Killed):
        compute_stats(dies_after_three, net.features, num, bs, checkpoint_path=ckpt, checkpoint_every=2)
    assert ckpt.exists()  # written after batch 2: next index 8

    resumed_calls = []

    def recording(start, n):
        resumed_calls.append((start, n))
        return synthetic_images(start, n)

    resumed = compute_stats(recording, net.features, num, bs, checkpoint_path=ckpt, checkpoint_every=2)
    assert resumed_calls == [(8, 4), (12, 4), (16, 4), (20, 2)]  # exactly the missing samples
    assert resumed.count == full.count == num
    np.testing.assert_allclose(resumed.mean, full.mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(resumed.cov, full.cov, rtol=1e-10, atol=1e-14)

    # A finished checkpoint returns at once; a mismatched one is refused.
    again = compute_stats(lambda *a: pytest.fail("should not sample"), net.features, num, bs, checkpoint_path=ckpt)
    np.testing.assert_array_equal(again.mean, resumed.mean)
    with pytest.raises(ValueError, match="another computation"):
        compute_stats(synthetic_images, net.features, num + 1, bs, checkpoint_path=ckpt)


def test_shards_merge_to_whole(net):
    num, bs = 10, 4
    whole = compute_stats(synthetic_images, net.features, num, bs)
    a = compute_stats(synthetic_images, net.features, num, bs, shard_index=0, num_shards=2)
    b = compute_stats(synthetic_images, net.features, num, bs, shard_index=1, num_shards=2)
    merged = a.merge(b)
    assert merged.count == num
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-6)
    np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-5, atol=1e-8)


class FirstDims:
    """The net with its features cut to the first k dims: a 2048-d matrix square root
    costs over a minute on a loaded 2-core CI box, and the plumbing is the same."""

    def __init__(self, net, k):
        self.net, self.k = net, k
        self.name, self.sha256 = f"{net.name}[:{k}]", net.sha256

    def features(self, x):
        return self.net.features(x)[:, : self.k]

    def provenance(self):
        return {**self.net.provenance(), "feature_net": self.name}


@pytest.mark.parametrize("dims", [32, pytest.param(2048, marks=pytest.mark.slow)])
def test_reference_file_and_fid_end_to_end(net, tmp_path, dims):
    net = FirstDims(net, dims) if dims < 2048 else net
    ref_path = tmp_path / "ref.npz"
    batches = (synthetic_images(i, min(4, 40 - i), seed=1) for i in range(0, 40, 4))
    ref = compute_reference_stats(batches, net.features, dataset="synthetic", split="train",
                                  feature_net=net.name, feature_net_sha256=net.sha256, path=ref_path)
    loaded = ReferenceStats.load(ref_path)
    assert loaded.count == 40 and loaded.file_sha256 == sha256_file(ref_path)
    assert loaded.provenance["dataset"] == "synthetic" and loaded.provenance["feature_net"] == net.name
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)

    same = compute_fid(lambda s, n: synthetic_images(s, n, seed=1), 40, 8, loaded, net=net)
    other = compute_fid(lambda s, n: synthetic_images(s, n, seed=2, shift=0.5), 40, 8, loaded, net=net)
    assert abs(same.value) < 1e-6 * other.value and other.value > 0
    rec = other.record
    assert rec["feature_net_sha256"] == net.sha256 and rec["reference_sha256"] == loaded.file_sha256
    assert rec["num_samples"] == 40

    # Official shortcut-models stats files hold only mu and sigma.
    np.savez(tmp_path / "official.npz", mu=ref.mu, sigma=ref.sigma)
    official = ReferenceStats.load(tmp_path / "official.npz")
    assert official.count is None and official.provenance == {}

    wrong = ReferenceStats(ref.mu, ref.sigma, 14, {"feature_net": "something-else"})
    with pytest.raises(ValueError, match="feature net"):
        compute_fid(synthetic_images, 4, 4, wrong, net=net)


SHARDED_SCRIPT = textwrap.dedent(
    f"""
    import json, jax, numpy as np
    from shortcut.evaluation.fid import InceptionFeatureNet
    from shortcut.evaluation.inception import random_inception_variables
    v = random_inception_variables(seed=0)
    sharded = InceptionFeatureNet(v, "random", image_size={SIZE})
    single = InceptionFeatureNet(v, "random", devices=jax.devices()[:1], image_size={SIZE})
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)  # odd: padded
    a, b = sharded.features(x), single.features(x)
    print(json.dumps({{"devices": sharded._fn.num_devices, "max_abs": float(np.abs(a - b).max()),
                      "scale": float(np.abs(b).max()), "shape": list(a.shape)}}))
    """
)


def test_sharded_features_equal_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 2 and res["shape"] == [3, 2048]
    assert res["max_abs"] <= 1e-5 * res["scale"]
