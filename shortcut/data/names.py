"""Which dataset names a spec may use, known without importing TensorFlow (TFDS lists its builders lazily)."""

from __future__ import annotations

import difflib
import functools

# The names that are not TFDS builder names: catalog.get_builder has a builder of its own for each
# (imagenet256 is TFDS's imagenet2012, see catalog.resolve_source); tests/test_data.py checks both agree.
LOCAL_DATASETS = ("digits", "celebahq256", "fashion_mnist_local", "imagenet256")


@functools.cache
def tfds_names() -> frozenset[str]:
    """The TensorFlow Datasets builder names (no community datasets: those need the network)."""
    import tensorflow_datasets as tfds

    return frozenset(tfds.list_builders(with_community_datasets=False))


def unknown_dataset(name: str) -> str | None:
    """None for a known name (ours, or a TFDS builder, optionally with `/config` and `:version`), else a
    one-line message with the nearest known names."""
    base = name.split("/")[0].split(":")[0]
    if base in LOCAL_DATASETS:
        return None
    try:
        known = tfds_names()
    except Exception:  # noqa: BLE001 - TFDS unusable here: the run's own check (catalog.get_builder) decides
        return None
    if base in known:
        return None
    close = difflib.get_close_matches(base, sorted(known | set(LOCAL_DATASETS)), n=5, cutoff=0.6)
    hint = (f"nearest: {', '.join(close)}" if close else
            f"expected one of {', '.join(LOCAL_DATASETS)} or a TensorFlow Datasets name (tfds.list_builders())")
    return f"unknown dataset {name!r}; {hint}"
