"""Every dataset the project knows by name, in one table: which TFDS builder reads it, how it is prepared,
and what a run that finds it missing says. Importable without TensorFlow (spec validation uses it).

A name not in the table is a TensorFlow Datasets builder name, read by TFDS and prepared with
`python -m shortcut.data.prepare NAME` (which downloads). Adding a dataset of our own is one row here
plus its TFDS builder module.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib


@dataclasses.dataclass(frozen=True)
class Source:
    """How one dataset name is read and prepared.

    crop: "adm" for an ADM centre crop + resize to `default_size` (or image_size) per example, None to
    keep the stored size (resized to image_size if one is given).
    """

    name: str
    tfds_name: str = ""  # the TFDS builder's name; "" means `name`
    builder: str | None = None  # "module:Class" of our own TFDS builder; None: TFDS's registry
    on_first_use: bool = False  # built offline the first time it is read; else by `python -m shortcut.data.prepare`
    check_files: str | None = None  # "module:function(manual_dir)": raises DatasetNotReadyError before a build
    not_ready: str | None = None  # "module:function(source, data_dir) -> str"; None: TFDS's generic instructions
    crop: str | None = None
    default_size: int | None = None

    def __post_init__(self):
        if not self.tfds_name:
            object.__setattr__(self, "tfds_name", self.name)


SOURCES = {s.name: s for s in (
    Source("digits", builder="shortcut.data.digits:Digits", on_first_use=True),  # scikit-learn's copy
    Source("fashion_mnist_local", builder="shortcut.data.fashion_mnist:FashionMnistLocal", on_first_use=True,
           check_files="shortcut.data.fashion_mnist:check_files"),  # Debian's dataset-fashion-mnist files
    Source("celebahq256", builder="shortcut.data.celebahq:CelebaHq256",
           check_files="shortcut.data.celebahq:check_files", not_ready="shortcut.data.catalog:celebahq_not_ready"),
    Source("imagenet256", tfds_name="imagenet2012", crop="adm", default_size=256,
           not_ready="shortcut.data.catalog:imagenet_not_ready"),  # TFDS's, from the official tars
)}
LOCAL_DATASETS = tuple(SOURCES)


def resolve_source(name: str) -> Source:
    """The table's row for `name`, else a TFDS name read as itself."""
    return SOURCES.get(name) or Source(name)


def load(ref: str | None):
    """The object a table cell names ("module:attribute"), None for an empty cell."""
    if ref is None:
        return None
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def tfds_names() -> frozenset[str]:
    """The TensorFlow Datasets builder names (no community datasets: those need the network)."""
    import tensorflow_datasets as tfds

    return frozenset(tfds.list_builders(with_community_datasets=False))


def unknown_dataset(name: str) -> str | None:
    """None for a known name (the table's, or a TFDS builder, optionally with `/config` and `:version`),
    else a one-line message with the nearest known names."""
    base = name.split("/")[0].split(":")[0]
    if base in SOURCES:
        return None
    try:
        known = tfds_names()
    except Exception:  # noqa: BLE001 - TFDS unusable here: the run's own check (catalog.get_builder) decides
        return None
    if base in known:
        return None
    close = difflib.get_close_matches(base, sorted(known | set(SOURCES)), n=5, cutoff=0.6)
    hint = (f"nearest: {', '.join(close)}" if close else
            f"expected one of {', '.join(SOURCES)} or a TensorFlow Datasets name (tfds.list_builders())")
    return f"unknown dataset {name!r}; {hint}"
