"""Latent-space training data: images -> VAE latents (the paper's CelebA-HQ and ImageNet setting).

Two ways, chosen by `data.latent.encoding`:

* `on_the_fly`: `EncodedIterator` wraps the image iterator and encodes each batch with the VAE: a
  posterior sample (noise keyed by seed and batch index) times the scale factor. Costs one encoder
  pass per training batch.
* `pre_encoded`: `pre_encode` passes over the split once and stores each image's posterior mean and
  log-variance (and its mirror image's, when `data.flip`) as a TFDS dataset (TFRecord shards, with
  TFDS metadata); `make_latent_iterator` trains from it, drawing a fresh posterior sample per example
  (stateless, keyed by seed and example position) so it sees the same distribution as `on_the_fly`.
  Its directory name holds the VAE weights' sha256, so latents of another VAE never mix in.

Both iterators are checkpointable like the image iterators (get_state / set_state).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from shortcut.data.iterators import BatchIterator, TFDataIterator, pack_state, unpack_state
from shortcut.data.tfenv import tf, tfds

ENCODED_NAME = "latents"
ENCODED_VERSION = "1.0.0"
_PROVENANCE = "shortcut_latents.json"


class EncodedIterator(BatchIterator):
    """An image iterator whose batches come out as scaled latents, encoded on the fly."""

    def __init__(self, images: BatchIterator, codec, seed: int):
        h, w, _ = images.info.image_shape
        info = images.info.__class__(images.info.name, codec.latent_shape((h, w)), images.info.num_classes,
                                     images.info.num_examples)
        super().__init__(info, {"kind": "encoded", "seed": seed, "vae": codec.description})
        self.images, self.codec, self.seed, self.step = images, codec, seed, 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.images)
        key = jax.random.fold_in(jax.random.key(self.seed), self.step)
        self.step += 1
        return dict(batch, image=self.codec.encode(batch["image"], key))

    def get_state(self) -> bytes:
        return pack_state({"kind": "encoded", "fingerprint": self._fingerprint, "step": self.step},
                          {"images": self.images.get_state()})

    def set_state(self, state: bytes) -> None:
        meta, files = unpack_state(state)
        if meta.get("kind") != "encoded":
            raise ValueError(f"Iterator state of kind {meta.get('kind')!r}, expected 'encoded'")
        self._check_fingerprint(meta)
        self.step = int(meta["step"])
        self.images.set_state(files["images"])


def default_encoded_dir(spec, codec) -> Path:
    from shortcut.data.catalog import resolve_data_dir

    d = spec.data
    tag = (codec.weights_sha256 or "random-" + codec.description.rsplit("seed ", 1)[-1])[:12]
    name = f"{d.dataset}_{d.split.replace('/', '-')}_{d.image_size}_{tag}"
    return Path(resolve_data_dir(d.data_dir)) / "latents" / name


def _features(shape: tuple[int, int, int], flip: bool):
    tensor = {k: tfds.features.Tensor(shape=shape, dtype=np.float32) for k in ("mean", "logvar")}
    if flip:
        tensor.update({f"{k}_flip": tfds.features.Tensor(shape=shape, dtype=np.float32) for k in ("mean", "logvar")})
    return tfds.features.FeaturesDict({**tensor, "label": np.int64})


def pre_encode(spec, codec, directory: Path, *, images=None, log=print) -> Path:
    """Encode the spec's split once into a latent TFDS dataset in `directory` (a no-op when it is there).
    `images`: an iterable of {"image", "label"} batches to encode instead of the dataset (tests, smoke)."""
    directory = Path(directory)
    if (directory / _PROVENANCE).exists():
        return directory
    from shortcut.data.pipeline import iterate_split

    d = spec.data
    if images is None:
        images = iterate_split(d.dataset, batch_size=spec.data.latent.batch_size, split=d.split,
                               data_dir=d.data_dir, image_size=d.image_size)
    shape = spec.input_shape

    def examples():
        count = 0
        for batch in images:
            mean, logvar = codec.moments(batch["image"])
            if d.flip:
                mean_f, logvar_f = codec.moments(batch["image"][:, :, ::-1])
            for i in range(len(mean)):
                ex = {"mean": mean[i], "logvar": logvar[i], "label": int(batch["label"][i])}
                if d.flip:
                    ex.update(mean_flip=mean_f[i], logvar_flip=logvar_f[i])
                yield count + i, ex  # (key, example); the key keeps the dataset order
            count += len(mean)
            log(f"pre-encoding {d.dataset} {d.split}: {count} images")

    log(f"pre-encoding {d.dataset} {d.split} into {directory} with {codec.description}")
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=ENCODED_NAME, version=ENCODED_VERSION, features=_features(shape, d.flip),
        split_datasets={"train": examples()}, data_dir=str(directory), disable_shuffling=True,
        description=f"{d.dataset} {d.split} encoded by {codec.description}")
    provenance = {"dataset": d.dataset, "split": d.split, "image_size": d.image_size, "flip": d.flip,
                  "vae": codec.description, "vae_sha256": codec.weights_sha256, "latent_shape": list(shape),
                  "num_examples": builder.info.splits["train"].num_examples, "builder_dir": str(builder.data_dir)}
    (directory / _PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return directory


def read_provenance(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / _PROVENANCE).read_text())


def make_latent_iterator(directory: Path, *, scale: float, batch_size: int, seed: int, flip: bool,
                         num_classes: int, process_index: int = 0, process_count: int = 1,
                         shuffle_buffer: int = 10_000) -> TFDataIterator:
    """Infinite per-process batches {"image": scaled latent sample, "label"} from a pre-encoded dataset."""
    from shortcut.data.info import DatasetInfo

    prov = read_provenance(directory)
    builder = tfds.builder_from_directory(prov["builder_dir"])
    split = tfds.even_splits("train", n=process_count)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
    member_seed = int(np.random.default_rng([seed, process_index]).integers(2**31))
    ds = ds.repeat().shuffle(shuffle_buffer, seed=member_seed, reshuffle_each_iteration=True).enumerate()

    def sample(i, ex):
        # One posterior sample per example and epoch position, keyed by (seed, i): deterministic and resumable.
        key = tf.stack([tf.cast(member_seed, tf.int64), i])
        mean, logvar = ex["mean"], ex["logvar"]
        if flip:
            use = tf.random.stateless_uniform([], seed=key + 1) < 0.5
            mean = tf.where(use, ex["mean_flip"], mean)
            logvar = tf.where(use, ex["logvar_flip"], logvar)
        z = mean + tf.exp(0.5 * logvar) * tf.random.stateless_normal(tf.shape(mean), seed=key)
        return {"image": z * scale, "label": tf.cast(ex["label"], tf.int32)}

    ds = ds.map(sample, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True).prefetch(2)
    info = DatasetInfo(f"latents:{prov['dataset']}", tuple(prov["latent_shape"]), num_classes, prov["num_examples"])
    fingerprint = {"kind": "pre_encoded", "dir": os.fspath(directory), "seed": seed, "batch_size": batch_size,
                   "process": [process_index, process_count]}
    return TFDataIterator(ds, info, fingerprint)
