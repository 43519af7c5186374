"""Dataset sources (shortcut/data/sources.py) -> TFDS builders, readiness checks and the instructions that
prepare them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex

from shortcut.data.errors import DatasetNotReadyError
from shortcut.data.info import DatasetInfo
from shortcut.data.sources import Source, load, resolve_source, unknown_dataset
from shortcut.data.tfenv import tfds

IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
PREPARE_CMD = "python -m shortcut.data.prepare"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """The TFDS data dir: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


def default_manual_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "downloads", "manual")


def get_builder(source: Source, data_dir: str) -> tfds.core.DatasetBuilder:
    """A TFDS builder for `source` in `data_dir` (never touches the network)."""
    if source.builder:
        return load(source.builder)(data_dir=data_dir)
    try:
        return tfds.builder(source.tfds_name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        # one line with the nearest names; TFDS's own message lists its whole catalogue
        raise ValueError(unknown_dataset(source.tfds_name) or f"unknown dataset {source.name!r}") from None


def not_ready_message(source: Source, data_dir: str) -> str:
    """Instructions that prepare `source` in `data_dir` (used by DatasetNotReadyError): the table's own
    (sources.Source.not_ready), else TFDS's way."""
    if source.not_ready:
        return load(source.not_ready)(source, data_dir)
    q_dir = shlex.quote(data_dir)  # paths in commands are shell-quoted
    msg = (
        f"{_head(source, data_dir)}\nBuild it with (downloads the data, so it needs network access):\n"
        f"     {PREPARE_CMD} {source.tfds_name} --data_dir {q_dir}\n"
        f"(or with the tfds CLI, which also needs apache-beam installed:\n"
        f"     tfds build {source.tfds_name} --data_dir {q_dir})\n"
        f"On a machine without network, build it elsewhere and copy "
        f"{os.path.join(data_dir, source.tfds_name)} here."
    )
    cls = tfds.builder_cls(source.tfds_name.split("/")[0].split(":")[0])
    instructions = getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions:
        msg += f"\nIt needs manually downloaded files in {default_manual_dir(data_dir)}:\n{instructions.rstrip()}"
    return msg


def _head(source: Source, data_dir: str) -> str:
    return f"Dataset {source.name!r} is not prepared in data_dir {data_dir}."


def celebahq_not_ready(source: Source, data_dir: str) -> str:
    from shortcut.data.celebahq import MANUAL_SUBDIR, image_folder, list_images

    manual = default_manual_dir(data_dir)
    found = len(list_images(image_folder(manual)))
    state = f"it holds {found} images" if found else "it is missing or holds no images"
    return (
        f"{_head(source, data_dir)}\n"
        f"1. Put the CelebA-HQ 256x256 images (*.jpg or *.png, 30,000 files) in\n"
        f"     {os.path.join(manual, MANUAL_SUBDIR)}\n"
        f"   (now {state}).\n"
        f"2. Build the TFDS dataset once (from the project root, or anywhere with the package "
        f"installed):\n"
        f"     {PREPARE_CMD} celebahq256 --data_dir {shlex.quote(data_dir)}\n"
        f"   Images elsewhere: add --manual_dir /path/to/image/folder."
    )


def imagenet_not_ready(source: Source, data_dir: str) -> str:
    manual = default_manual_dir(data_dir)
    q_dir = shlex.quote(data_dir)
    present = [t for t in IMAGENET_TARS if os.path.isfile(os.path.join(manual, t))]
    missing = [t for t in IMAGENET_TARS if t not in present]
    state = f"missing: {', '.join(missing)}" if missing else "both are there"
    return (
        f"{_head(source, data_dir)} It is TFDS 'imagenet2012', built from the official tars.\n"
        f"1. Download {' and '.join(IMAGENET_TARS)} (registration at "
        f"https://image-net.org/download-images) into\n"
        f"     {manual}\n"
        f"   (now {state}).\n"
        f"2. Build the TFDS dataset once (hours; ~150 GB of disk):\n"
        f"     {PREPARE_CMD} imagenet256 --data_dir {q_dir}\n"
        f"   (or with the tfds CLI, which also needs apache-beam installed:\n"
        f"     tfds build imagenet2012 --data_dir {q_dir})"
    )


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_builder(
    source: Source, data_dir: str, *, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """Build the dataset (TFDS download_and_prepare) and return the prepared builder.

    A lock file in data_dir keeps concurrent processes (Ray trials, hosts sharing a disk) from
    building the same dataset twice.
    """
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    with _file_lock(os.path.join(data_dir, f".{source.tfds_name.replace('/', '_')}.lock")):
        builder = get_builder(source, data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(download_config=config)
            builder = get_builder(source, data_dir)  # re-read the written metadata
    return builder


def load_builder(source: Source, data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared builder; a source built on first use (digits) is built now, others raise
    DatasetNotReadyError."""
    builder = get_builder(source, data_dir)
    if builder.is_prepared():
        return builder
    if source.on_first_use:
        if source.check_files:
            load(source.check_files)(default_manual_dir(data_dir))
        return prepare_builder(source, data_dir)
    raise DatasetNotReadyError(not_ready_message(source, data_dir))


def dataset_info(
    source: Source, builder: tfds.core.DatasetBuilder, split: str, image_size: int | None
) -> DatasetInfo:
    """The `DatasetInfo` of `split` after preprocessing."""
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"Dataset {source.name!r} has no 'image' feature: {features}")
    height, width, channels = features["image"].shape
    if source.crop == "adm":
        size = image_size or source.default_size
        shape = (size, size, channels)
    elif image_size is not None:
        shape = (image_size, image_size, channels)
    elif height is None or width is None:
        raise ValueError(
            f"Dataset {source.name!r} has images of varying size; pass image_size to crop "
            f"and resize them to a square."
        )
    else:
        shape = (height, width, channels)
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
    try:
        num_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise ValueError(f"Dataset {source.name!r}: bad split {split!r}: {e}") from None
    return DatasetInfo(source.name, tuple(int(s) for s in shape), num_classes, int(num_examples))


def check_dataset(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int | None = None,
) -> DatasetInfo:
    """Return the info of a prepared dataset, or raise DatasetNotReadyError saying how to prepare it.

    Call it before building a model. 'digits' is prepared automatically on first use (offline,
    from scikit-learn). data_dir: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    """
    source = resolve_source(name)
    builder = load_builder(source, resolve_data_dir(data_dir))
    return dataset_info(source, builder, split, image_size)
