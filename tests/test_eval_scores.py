"""Inception Score and improved precision/recall against values computed by hand."""

import math

import numpy as np
import pytest

from shortcut.evaluation.inception_score import InceptionScoreStats, inception_score, softmax
from shortcut.evaluation.precision_recall import knn_radii, precision_recall


def test_inception_score_hand_tables():
    assert inception_score(np.eye(4), splits=1) == (pytest.approx(4.0), 0.0)  # confident and diverse: IS = C
    assert inception_score(np.full((5, 3), 1 / 3), splits=1)[0] == pytest.approx(1.0)  # uninformative: IS = 1
    # p1 = (1/2, 1/2), p2 = (1, 0): p(y) = (3/4, 1/4), KL1 = log(4/3) / 2, KL2 = log(4/3) -> IS = (4/3)^(3/4)
    assert inception_score([[0.5, 0.5], [1.0, 0.0]], splits=1)[0] == pytest.approx((4 / 3) ** 0.75, rel=1e-12)


def test_inception_score_splits_and_streaming():
    probs = np.eye(2)[[0, 1, 0, 0]]  # split 1: classes 0, 1 -> IS 2; split 2: 0, 0 -> IS 1
    assert inception_score(probs, splits=2) == (pytest.approx(1.5), pytest.approx(0.5))
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(size=(103, 7)) * 3)
    whole = InceptionScoreStats(103, 7, splits=10).update(p)
    streamed = InceptionScoreStats(103, 7, splits=10)
    for lo, hi in [(0, 5), (5, 50), (50, 51), (51, 103)]:  # batches across split boundaries, via a checkpoint
        streamed = InceptionScoreStats.from_state_dict(streamed.update(p[lo:hi]).state_dict())
    np.testing.assert_allclose(streamed.scores(), whole.scores(), rtol=1e-12)
    bounds = [i * 103 // 10 for i in range(11)]  # the batch formula on each contiguous split
    direct = [math.exp(np.mean(np.sum(q * np.log(q / q.mean(0)), axis=1)))
              for q in (p[a:b] for a, b in zip(bounds, bounds[1:]))]
    np.testing.assert_allclose(whole.scores(), direct, rtol=1e-10)
    with pytest.raises(ValueError, match="saw 5 of 103"):
        InceptionScoreStats(103, 7).update(p[:5]).result()


def _square(x, y, side):
    return [(x, y), (x + side, y), (x, y + side), (x + side, y + side)]


def test_precision_recall_countable_2d():
    # reference: three far-apart squares; each point's 3rd nearest neighbour is its square's diagonal corner
    reference = np.array(_square(0, 0, 1) + _square(10, 10, 2) + _square(100, 0, 1), float)
    np.testing.assert_array_equal(knn_radii(reference, 3), [2] * 4 + [8] * 4 + [2] * 4)  # squared radii
    # generated, on the diagonal: (0.5, 0.5) in; (2, 2) on the edge of (1, 1)'s ball (squared distance 2 <= 2);
    # (5, 5) out; (11, 11) in; (14, 14) on the edge of (12, 12)'s ball (8 <= 8); (20, 20) out -> precision 4/6
    generated = np.array([(0.5, 0.5), (2, 2), (5, 5), (11, 11), (14, 14), (20, 20)])
    # generated radii (3rd neighbour along the diagonal): squared 220.5, 162, 72, 162, 162, 450; they cover
    # the first two squares, but not the square at (100, 0) -> recall 8/12
    np.testing.assert_allclose(knn_radii(generated, 3), [220.5, 162, 72, 162, 162, 450])
    precision, recall = precision_recall(reference, generated, k=3)
    assert precision == pytest.approx(4 / 6) and recall == pytest.approx(8 / 12)
    assert precision_recall(reference, generated, k=3, block=5) == (precision, recall)  # blocks change nothing
    assert precision_recall(reference, reference, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(reference, generated[:3])


@pytest.mark.slow  # compiles the Inception (about 3 minutes on the shared 2-core machine)
def test_inception_logits_head_feeds_the_inception_score(tmp_path):
    """The FID Inception's 1008-way layer, read from a jax-fid layout file and kept by conversion, gives
    logits = pool3 @ W (no bias) in the same pass, and the score of those logits."""
    import pickle

    from flax import traverse_util

    from shortcut.evaluation import InceptionFeatureNet, ReferenceStats, RunningStats
    from shortcut.evaluation.inception import random_inception_variables
    from shortcut.evaluation.inception_head import load_logits_weight
    from shortcut.evaluation.convert_inception import convert_to_npz
    from shortcut.evaluation.sample_metrics import compute_sample_metrics

    variables = random_inception_variables(seed=1)
    tree = traverse_util.unflatten_dict({k: np.asarray(v) for coll in ("params", "batch_stats")
                                         for k, v in traverse_util.flatten_dict(variables[coll]).items()})
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(2048, 1008)) * 0.05).astype(np.float32)
    tree["fc"] = {"kernel": weight, "bias": np.full(1008, 100.0, np.float32)}  # the bias must not be used
    path = tmp_path / "weights.pickle"
    path.write_bytes(pickle.dumps(tree))
    np.testing.assert_array_equal(load_logits_weight(convert_to_npz(path, tmp_path / "w.npz", None), "npz"), weight)

    net = InceptionFeatureNet.load(path, expected_sha256=None, image_size=75)
    images = rng.uniform(-1, 1, (20, 16, 16, 3)).astype(np.float32)
    pool3, logits = net.outputs(images)
    np.testing.assert_allclose(logits, pool3 @ weight, rtol=1e-4, atol=1e-4)
    reference = ReferenceStats.from_running_stats(RunningStats(2048).update(pool3[:10].astype(np.float64) + 1),
                                                  {}, features=pool3[:10])
    result = compute_sample_metrics(lambda s, n: images[s:s + n], 20, 20, reference, net)  # one compiled shape
    mean, std = inception_score(softmax(logits), splits=10)
    assert result.record["inception_score"] == pytest.approx(mean, rel=1e-4)
    assert result.record["inception_score_std"] == pytest.approx(std, rel=1e-3, abs=1e-6)
    assert result.record["inception_score_splits"] == 10
    # the reference set is half of the samples: all of it is covered by the samples' manifold
    assert result.record["recall"] == 1.0 and result.record["precision_recall_reference"] == 10
