"""Inception Score (Salimans et al. 2016), streamed: exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

The samples are cut into `splits` contiguous, nearly equal parts by index (split j holds samples
j*N//splits .. (j+1)*N//splits - 1), as in the original implementation and the ADM evaluation suite; p(y) is the
mean class distribution of the split. Per split only the class-probability sums and sum p log p are
kept, so the score streams over any number of samples and is exactly the batch formula.
"""

from __future__ import annotations

import numpy as np

DEFAULT_SPLITS = 10


def softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


class InceptionScoreStats:
    """Per-split sums of p(y|x) and of sum_y p log p over `num_samples` samples fed in index order."""

    def __init__(self, num_samples: int, num_classes: int, splits: int = DEFAULT_SPLITS):
        if num_samples < 1:
            raise ValueError("num_samples must be positive")
        self.num_samples, self.splits = int(num_samples), int(min(splits, num_samples))
        self.prob_sums = np.zeros((self.splits, num_classes), np.float64)
        self.plogp_sums = np.zeros(self.splits, np.float64)
        self.counts = np.zeros(self.splits, np.int64)

    @property
    def seen(self) -> int:
        return int(self.counts.sum())

    def update(self, probs) -> "InceptionScoreStats":
        """Add the class probabilities [n, C] of the next n samples (in index order)."""
        p = np.asarray(probs, np.float64)
        start = self.seen
        if start + len(p) > self.num_samples:
            raise ValueError(f"more than the {self.num_samples} samples announced")
        bounds = np.arange(self.splits + 1) * self.num_samples // self.splits
        split = np.searchsorted(bounds, np.arange(start, start + len(p)), side="right") - 1
        plogp = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
        np.add.at(self.prob_sums, split, p)
        np.add.at(self.plogp_sums, split, plogp)
        np.add.at(self.counts, split, 1)
        return self

    def scores(self) -> np.ndarray:
        """The score of each split."""
        if self.seen != self.num_samples:
            raise ValueError(f"saw {self.seen} of {self.num_samples} samples")
        n = self.counts.astype(np.float64)
        marginal = self.prob_sums / n[:, None]
        cross = np.sum(np.where(self.prob_sums > 0, self.prob_sums * np.log(np.where(marginal > 0, marginal, 1.0)),
                                0.0), axis=-1)
        return np.exp((self.plogp_sums - cross) / n)

    def result(self) -> tuple[float, float]:
        """(mean, std) over splits (std with ddof=0, as the original implementation)."""
        s = self.scores()
        return float(np.mean(s)), float(np.std(s))

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"is_num_samples": np.int64(self.num_samples), "is_prob_sums": self.prob_sums,
                "is_plogp_sums": self.plogp_sums, "is_counts": self.counts}

    @classmethod
    def from_state_dict(cls, state) -> "InceptionScoreStats":
        prob_sums = np.array(state["is_prob_sums"], np.float64)
        out = cls(int(state["is_num_samples"]), prob_sums.shape[1], prob_sums.shape[0])
        out.prob_sums, out.plogp_sums = prob_sums, np.array(state["is_plogp_sums"], np.float64)
        out.counts = np.array(state["is_counts"], np.int64)
        return out


def inception_score(probs, splits: int = DEFAULT_SPLITS) -> tuple[float, float]:
    """(mean, std) Inception Score of class probabilities [N, C] (rows sum to 1)."""
    p = np.asarray(probs, np.float64)
    return InceptionScoreStats(len(p), p.shape[1], splits).update(p).result()
