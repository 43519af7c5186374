"""Streaming, resumable feature statistics: never holds all samples at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shortcut.evaluation.frechet import RunningStats

BatchesFn = Callable[[int, int], np.ndarray]
FeatureFn = Callable[[np.ndarray], np.ndarray]


def progress_enabled(progress: bool | None) -> bool:
    """Progress bars: the caller's choice, else shortcut.progress.mode() (on for a terminal, off in CI)."""
    from shortcut import progress as progress_lib

    return progress if progress is not None else progress_lib.shows_bars()


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.zeros((n - x.shape[0], *x.shape[1:]), x.dtype)], axis=0)


def _read_checkpoint(path: Path, num_samples: int, batch_size: int, fingerprint: str,
                     shard: tuple[int, int], load_stats: Callable) -> tuple[Any, int]:
    with np.load(path, allow_pickle=False) as f:
        saved = {
            "num_samples": int(f["num_samples"]),
            "batch_size": int(f["batch_size"]),
            "fingerprint": str(f["fingerprint"]),
            "shard": tuple(int(v) for v in f["shard"]),
        }
        wanted = {"num_samples": num_samples, "batch_size": batch_size,
                  "fingerprint": fingerprint, "shard": tuple(shard)}
        if saved != wanted:
            diff = {k: (saved[k], wanted[k]) for k in wanted if saved[k] != wanted[k]}
            raise ValueError(
                f"checkpoint {path} belongs to another computation (saved vs requested: {diff}); "
                "delete it or pass another checkpoint_path"
            )
        return load_stats(f), int(f["next_index"])


def compute_stats(
    batches_fn: BatchesFn,
    feature_fn: FeatureFn,
    num_samples: int,
    batch_size: int,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    *,
    fingerprint: str = "",
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool | None = None,
    desc: str = "features",
    new_stats: Callable[[Any], Any] = lambda features: RunningStats(features.shape[-1]),
    load_stats: Callable[[Any], Any] = RunningStats.from_state_dict,
) -> RunningStats:
    """Accumulate feature mean/covariance over samples ``[0, num_samples)``, batch by batch.

    ``batches_fn(start, n)`` must return the ``n`` images with global indices
    ``start .. start+n-1`` deterministically (e.g. sampling seeded by index), so a resumed
    run regenerates exactly the missing samples. The last partial batch is zero-padded
    to ``batch_size`` before ``feature_fn`` (one compiled shape) and the padding dropped.

    With ``checkpoint_path``, the partial statistics and the next index are written
    atomically every ``checkpoint_every`` batches and at the end; an existing checkpoint
    is resumed (it must match ``num_samples``, ``batch_size``, ``fingerprint`` and the
    shard). A finished checkpoint is kept, so calling again returns at once.

    ``shard_index``/``num_shards`` restrict this call to a contiguous block of the
    indices (one per host); combine the shards with ``RunningStats.merge``.

    Other accumulators: ``feature_fn`` may return any tuple of per-sample arrays (or None
    entries), ``new_stats(first_output)`` makes the accumulator, which needs ``update(output)``
    and ``save(path, **extra)``, and ``load_stats(npz)`` restores it from a checkpoint
    (e.g. sample_metrics.SampleStats).
    """
    if num_samples <= 0 or batch_size <= 0:
        raise ValueError("num_samples and batch_size must be positive")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    lo = num_samples * shard_index // num_shards
    hi = num_samples * (shard_index + 1) // num_shards
    shard = (shard_index, num_shards)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None

    stats: RunningStats | None = None
    start = lo
    if ckpt is not None and ckpt.exists():
        stats, start = _read_checkpoint(ckpt, num_samples, batch_size, fingerprint, shard, load_stats)

    def save(next_index: int) -> None:
        if ckpt is not None and stats is not None:
            stats.save(ckpt, next_index=np.int64(next_index), num_samples=np.int64(num_samples),
                       batch_size=np.int64(batch_size), fingerprint=np.array(fingerprint),
                       shard=np.array(shard, np.int64))

    from shortcut import progress as progress_lib

    bar = progress_lib.bar(hi - lo, desc, unit="img", initial=start - lo, enabled=progress)
    batches_done = 0
    try:
        for i in range(start, hi, batch_size):
            n = min(batch_size, hi - i)
            images = np.asarray(batches_fn(i, n))
            if images.shape[0] != n:
                raise ValueError(f"batches_fn({i}, {n}) returned {images.shape[0]} images")
            out = feature_fn(_pad_to(images, batch_size))
            feats = tuple(None if a is None else np.asarray(a)[:n] for a in out) if isinstance(out, tuple) \
                else np.asarray(out)[:n]
            if stats is None:
                stats = new_stats(feats)
            stats.update(feats)
            batches_done += 1
            bar.update(n)
            if batches_done % checkpoint_every == 0 and i + n < hi:
                save(i + n)
    finally:
        bar.close()
    if batches_done:
        save(hi)
    if stats is None:
        raise ValueError("no samples in this shard")
    return stats
