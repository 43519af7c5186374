"""Frechet distance between Gaussians and streaming feature statistics (numpy/scipy only)."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg


class RunningStats:
    """Streaming mean and covariance of feature vectors, accumulated in float64.

    Uses the pairwise (Chan et al.) update, so batches and shards can be combined in
    any grouping: ``update`` adds a batch, ``merge`` adds another accumulator.
    ``cov`` is the unbiased covariance (the same as ``np.cov(x, rowvar=False)``).
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros(self.dim, np.float64)
        self._m2 = np.zeros((self.dim, self.dim), np.float64)  # sum of outer products of deviations

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def update(self, features) -> "RunningStats":
        """Add a batch of features, shape [N, dim]. Returns self."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [N, {self.dim}], got {x.shape}")
        if x.shape[0] == 0:
            return self
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or inf")
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        self._combine(x.shape[0], mean_b, xc.T @ xc)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add the samples accumulated in another RunningStats (e.g. another shard). Returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        self._combine(other.count, other._mean, other._m2)
        return self

    def copy(self) -> "RunningStats":
        out = RunningStats(self.dim)
        out.count, out._mean, out._m2 = self.count, self._mean.copy(), self._m2.copy()
        return out

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
        return self._m2 / (self.count - 1)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "dim": np.int64(self.dim),
            "count": np.int64(self.count),
            "mean": self._mean,
            "m2": self._m2,
        }

    @classmethod
    def from_state_dict(cls, state) -> "RunningStats":
        out = cls(int(state["dim"]))
        out.count = int(state["count"])
        out._mean = np.array(state["mean"], dtype=np.float64)
        out._m2 = np.array(state["m2"], dtype=np.float64)
        if out._mean.shape != (out.dim,) or out._m2.shape != (out.dim, out.dim):
            raise ValueError("inconsistent RunningStats state: shapes do not match dim")
        return out

    def save(self, path: str | os.PathLike, **extra) -> None:
        """Write the accumulator (and any extra arrays) to ``path`` (.npz) atomically."""
        atomic_savez(path, **self.state_dict(), **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunningStats":
        with np.load(path, allow_pickle=False) as f:
            return cls.from_state_dict(f)

    def __repr__(self) -> str:
        return f"RunningStats(dim={self.dim}, count={self.count})"


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """np.savez to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _imag_diag(s: np.ndarray) -> float:
    """Largest imaginary part on the diagonal, relative to the diagonal's real scale (>= 1)."""
    if not np.iscomplexobj(s):
        return 0.0
    d = np.diagonal(s)
    return float(np.max(np.abs(d.imag)) / max(1.0, float(np.max(np.abs(d.real)))))


def _sqrtm_usable(a: np.ndarray, imag_tol: float, rtol: float = 1e-4):
    """sqrtm(a), or None when it is not finite, does not square back to ``a`` or its
    trace has a non-negligible imaginary part (the symptoms of a singular product)."""
    with warnings.catch_warnings():
        # Singular products are handled by the caller's retry; the warning adds nothing.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        s = scipy.linalg.sqrtm(a)
    if not np.all(np.isfinite(s)):
        return None, s
    if np.linalg.norm(s @ s - a) > rtol * max(np.linalg.norm(a), np.finfo(np.float64).tiny):
        return None, s
    if _imag_diag(s) > imag_tol:
        return None, s
    return s, s


def _trace_sqrt_product_eigh(cov1: np.ndarray, cov2: np.ndarray) -> float:
    # tr((C1 C2)^1/2) = sum sqrt(eig(C1^1/2 C2 C1^1/2)), a symmetric PSD problem.
    w, v = np.linalg.eigh(cov1)
    r = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = r @ cov2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))


def frechet_distance_of_samples(mean, cov, count: int, mu_ref, cov_ref) -> float:
    """frechet_distance of `count` samples' mean and covariance to a reference, by the method their count
    calls for: "sqrtm" (the standard FID code's) when the covariance can have full rank (count > dim);
    "eigh" below that, where the covariance is singular and sqrtm needs its eps * I retry (two d x d square
    roots, each many seconds at Inception's 2048-d) to approximate what eigh gives exactly in one."""
    method = "sqrtm" if count > np.size(mean) else "eigh"
    return frechet_distance(mean, cov, mu_ref, cov_ref, method=method)


def frechet_distance(
    mu1,
    cov1,
    mu2,
    cov2,
    eps: float = 1e-6,
    imag_tol: float = 1e-3,
    method: str = "sqrtm",
) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2).

    d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^{1/2}).

    ``method="sqrtm"`` (default, as in the standard FID code): scipy.linalg.sqrtm of
    cov1 @ cov2. When that is not finite, does not square back to the product, or has a
    non-negligible imaginary part on the diagonal (a singular product, e.g. fewer
    samples than feature dimensions), it is retried with ``eps * I`` added to both
    covariances. The remaining imaginary round-off is discarded; if the diagonal's
    imaginary part is still above ``imag_tol`` (relative to its real scale, at least 1),
    ValueError is raised.

    ``method="eigh"``: the same trace from the eigenvalues of the symmetric matrix
    cov1^1/2 cov2 cov1^1/2; real by construction and a few times faster for 2048-d.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    cov1 = np.atleast_2d(np.asarray(cov1, np.float64))
    cov2 = np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}"
        )
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(cov1, cov2)
    elif method == "sqrtm":
        covmean, _ = _sqrtm_usable(cov1 @ cov2, imag_tol)
        if covmean is None:
            offset = np.eye(cov1.shape[0]) * eps
            covmean, raw = _sqrtm_usable((cov1 + offset) @ (cov2 + offset), imag_tol)
            if covmean is None:
                if not np.all(np.isfinite(raw)):
                    raise ValueError("matrix square root is not finite even with the eps * I offset")
                if _imag_diag(raw) > imag_tol:
                    raise ValueError(
                        f"matrix square root has a non-negligible imaginary part on its diagonal "
                        f"({_imag_diag(raw):.3g} relative); the covariances may be badly conditioned or not PSD"
                    )
                covmean = raw  # finite, real enough: accept the residual of an ill-conditioned product
        tr_covmean = float(np.trace(covmean).real)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
