"""`make_train_iterator`: infinite, sharded, shuffled, restorable batches from a TFDS dataset.

Pipeline (tf.data on the CPU), per process:
  TFDS split -> this process's even sub-split (`tfds.even_splits`, so sharding happens before
  anything is read or decoded) -> then either
    in memory (the decoded shard fits in IN_MEMORY_MAX_BYTES, e.g. digits, MNIST, CIFAR-10):
      decode once into a uint8 array; each epoch is a full random permutation of indices,
      batches are gathered from the array (fast; ~0.3 ms per batch of 128 digits);
    streaming (CelebA-HQ, ImageNet): shuffle file order, shuffle encoded records in a
      `shuffle_buffer`, repeat, decode (+ ADM centre crop) in parallel;
  -> batch (drop_remainder) -> resize / seeded flips / scale to [-1, 1] on whole batches.
Epochs reshuffle (tf.data's reshuffle_each_iteration, seeded), so the stream is a
deterministic function of the arguments.

The iterator state is tf.data's own checkpoint, so it holds the shuffle buffer (indices in
memory mode; encoded records when streaming: about shuffle_buffer x mean file size) and the
decoded batches already prefetched (up to ~3 batches).
"""

from __future__ import annotations

import numpy as np

from shortcut.data.catalog import dataset_info, load_builder, resolve_data_dir, resolve_source
from shortcut.data.iterators import BatchIterator, TFDataIterator
from shortcut.data.preprocess import adm_center_crop, finish_batch
from shortcut.data.tfenv import tf, tfds

IN_MEMORY_MAX_BYTES = 512 * 2**20
_LOAD_BATCH = 4096


def _derive_seed(seed: int, process_index: int, purpose: int) -> int:
    return int(np.random.SeedSequence([seed, process_index, purpose]).generate_state(1)[0] >> 1)


def _options(autotune: bool = True) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # Deleting an autotuned iterator waits for a thread of the autotuner to wake up: 0-60 s at the end
    # of every run (27 s of a 215 s digits run, measured). An in-memory dataset has nothing worth
    # tuning; a streamed one (decoding in parallel) keeps it.
    options.autotune.enabled = autotune
    return options


def _select(example: dict, has_label: bool) -> dict:
    label = example["label"] if has_label else tf.constant(0, tf.int64)
    return {"image": example["image"], "label": tf.cast(label, tf.int32)}


def _in_memory_batches(builder, shard, has_label: bool, batch_size: int, shuffle_seed: int):
    ds = builder.as_dataset(
        split=shard, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)
    )
    ds = ds.map(lambda ex: _select(ex, has_label), num_parallel_calls=tf.data.AUTOTUNE)
    chunks = list(ds.batch(_LOAD_BATCH).as_numpy_iterator())
    images = tf.convert_to_tensor(np.concatenate([c["image"] for c in chunks]))
    labels = tf.convert_to_tensor(np.concatenate([c["label"] for c in chunks]))
    n = int(images.shape[0])
    ds = tf.data.Dataset.range(n).shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.repeat().batch(batch_size, drop_remainder=True)
    return ds.map(lambda idx: {"image": tf.gather(images, idx), "label": tf.gather(labels, idx)})


def _streaming_batches(
    builder, shard, has_label: bool, batch_size: int, shuffle_seed: int, shuffle_buffer: int,
    adm_size: int | None,
):
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed,
        shuffle_reshuffle_each_iteration=True,
        try_autocache=False,
        options=_options(),
    )
    ds = builder.as_dataset(
        split=shard,
        shuffle_files=True,
        read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    ds = ds.map(lambda ex: _select(ex, has_label))
    # Shuffle encoded records, not decoded images: a smaller buffer and iterator state.
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
    image_feature = builder.info.features["image"]

    def decode(ex):
        image = image_feature.decode_example(ex["image"])
        if adm_size is not None:
            image = adm_center_crop(image, adm_size)
        return {"image": image, "label": ex["label"]}

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True)


def make_train_iterator(
    name: str,
    *,
    batch_size: int,
    seed: int,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int | None = None,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_buffer: int = 10_000,
) -> BatchIterator:
    """Infinite iterator of per-process batches {"image": f32 [B,H,W,C] in [-1,1], "label": i32 [B]}.

    Args:
        name: digits | celebahq256 | imagenet256 | any TFDS image dataset ("image", opt. "label").
        batch_size: per-process batch size (incomplete batches are never produced).
        seed: determines the order (and flips); same args -> identical batches.
        split: TFDS split, sub-splits allowed ("train[:90%]").
        data_dir: TFDS data dir (default $TFDS_DATA_DIR, else ~/tensorflow_datasets).
        image_size: resize (antialiased bilinear) to image_size^2 if given and different from
            the stored size; for imagenet256 the ADM crop size (default 256).
        flip: random horizontal flips (seeded; do not change the example order).
        process_index, process_count: this process reads examples of its disjoint 1/n sub-split.
        shuffle_buffer: records in the shuffle buffer of streamed datasets (in-memory datasets
            are fully permuted every epoch instead).

    Raises:
        DatasetNotReadyError: the data is not prepared (message says how to prepare it).
    """
    if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need batch_size >= 1 and 0 <= process_index < process_count, got "
            f"batch_size={batch_size}, process_index={process_index}, process_count={process_count}"
        )
    source = resolve_source(name)
    builder = load_builder(source, resolve_data_dir(data_dir))
    info = dataset_info(source, builder, split, image_size)
    shard = tfds.even_splits(split, n=process_count)[process_index]
    shard_examples = builder.info.splits[shard].num_examples
    if shard_examples == 0:
        raise ValueError(f"Process {process_index} of {process_count} has no examples of {split!r}")

    features = builder.info.features
    has_label = info.num_classes > 0
    stored_h, stored_w, channels = features["image"].shape
    adm_size = None
    if source.crop == "adm" or stored_h is None or stored_w is None:
        adm_size = info.image_shape[0]
    resize_to = None
    if adm_size is None and (stored_h, stored_w) != info.image_shape[:2]:
        resize_to = info.image_shape[0]

    shuffle_seed = _derive_seed(seed, process_index, 0)
    decoded_bytes = shard_examples * (stored_h or 0) * (stored_w or 0) * channels
    in_memory = adm_size is None and decoded_bytes <= IN_MEMORY_MAX_BYTES
    if in_memory:
        ds = _in_memory_batches(builder, shard, has_label, batch_size, shuffle_seed)
    else:
        ds = _streaming_batches(
            builder, shard, has_label, batch_size, shuffle_seed, shuffle_buffer, adm_size
        )

    flip_seed = _derive_seed(seed, process_index, 1) if flip else None

    def finish(step, batch):
        image = finish_batch(batch["image"], step, resize_to=resize_to, flip_seed=flip_seed)
        return {"image": image, "label": batch["label"]}

    ds = ds.enumerate().map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(2).with_options(_options(autotune=not in_memory))
    fingerprint = {
        "kind": "tfdata",
        "name": name,
        "batch_size": batch_size,
        "seed": seed,
        "split": split,
        "image_size": image_size,
        "flip": flip,
        "process_index": process_index,
        "process_count": process_count,
        "shuffle_buffer": shuffle_buffer,
    }
    return TFDataIterator(ds, info, fingerprint)


def iterate_split(name: str, *, batch_size: int, split: str = "train", data_dir: str | None = None,
                  image_size: int | None = None):
    """One ordered pass over a whole split: every example exactly once, no shuffling or flips, the
    last batch possibly smaller. Same preprocessing as training (for reference statistics)."""
    source = resolve_source(name)
    builder = load_builder(source, resolve_data_dir(data_dir))
    info = dataset_info(source, builder, split, image_size)
    stored_h, stored_w, _ = builder.info.features["image"].shape
    adm = source.crop == "adm" or stored_h is None or stored_w is None
    resize_to = None if adm or (stored_h, stored_w) == info.image_shape[:2] else info.image_shape[0]
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
    ds = ds.map(lambda ex: _select(ex, info.num_classes > 0), num_parallel_calls=tf.data.AUTOTUNE)
    if adm:
        ds = ds.map(lambda ex: {"image": adm_center_crop(ex["image"], info.image_shape[0]), "label": ex["label"]},
                    num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).enumerate()
    ds = ds.map(lambda step, b: {"image": finish_batch(b["image"], step, resize_to=resize_to, flip_seed=None),
                                 "label": b["label"]}, num_parallel_calls=tf.data.AUTOTUNE)
    yield from ds.prefetch(2).with_options(_options()).as_numpy_iterator()
