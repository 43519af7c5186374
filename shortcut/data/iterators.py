"""Batch iterators with a restorable position: over tf.data, and over random mock data."""

from __future__ import annotations

import abc
import io
import json
import os
import tarfile
import tempfile
from typing import Any

import numpy as np

from shortcut.data.info import DatasetInfo

Batch = dict[str, np.ndarray]
_META = "meta.json"


def pack_state(meta: dict[str, Any], files: dict[str, bytes] | None = None) -> bytes:
    """Bundle a JSON header and named files into one bytes blob (an uncompressed tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {_META: json.dumps(meta, sort_keys=True).encode(), **(files or {})}.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def unpack_state(state: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Inverse of `pack_state`."""
    try:
        with tarfile.open(fileobj=io.BytesIO(state), mode="r") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        meta = json.loads(files.pop(_META))
    except (tarfile.TarError, KeyError, ValueError) as e:
        raise ValueError(f"Not a data-iterator state: {e}") from None
    return meta, files


class BatchIterator(abc.ABC):
    """Infinite iterator of {"image": float32 [B,H,W,C] in [-1,1], "label": int32 [B]}."""

    info: DatasetInfo

    def __init__(self, info: DatasetInfo, fingerprint: dict[str, Any]):
        self.info = info
        self._fingerprint = fingerprint

    def __iter__(self) -> BatchIterator:
        return self

    @abc.abstractmethod
    def __next__(self) -> Batch: ...

    @abc.abstractmethod
    def get_state(self) -> bytes:
        """The full position (shuffle buffers included) as bytes."""

    @abc.abstractmethod
    def set_state(self, state: bytes) -> None:
        """Continue from a position saved by `get_state` of an iterator made with the same args."""

    def _check_fingerprint(self, meta: dict[str, Any]) -> None:
        saved = meta.get("fingerprint")
        if saved != json.loads(json.dumps(self._fingerprint)):
            raise ValueError(
                f"Iterator state was saved by an iterator with other arguments: "
                f"saved {saved}, this iterator {self._fingerprint}"
            )


class TFDataIterator(BatchIterator):
    """Iterates a tf.data dataset of batches; the position is tf.data's iterator checkpoint.

    The state bundles the files of `tf.train.Checkpoint(iterator=...).write()` (buffers included).
    """

    def __init__(self, dataset, info: DatasetInfo, fingerprint: dict[str, Any]):
        super().__init__(info, fingerprint)
        self._dataset = dataset
        self._iterator = iter(dataset)

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        return {"image": batch["image"].numpy(), "label": batch["label"].numpy()}

    def get_state(self) -> bytes:
        from shortcut.data.tfenv import tf

        with tempfile.TemporaryDirectory(prefix="data_state_") as tmp:
            tf.train.Checkpoint(iterator=self._iterator).write(os.path.join(tmp, "iterator"))
            files = {n: open(os.path.join(tmp, n), "rb").read() for n in sorted(os.listdir(tmp))}
        return pack_state({"kind": "tfdata", "fingerprint": self._fingerprint}, files)

    def set_state(self, state: bytes) -> None:
        from shortcut.data.tfenv import tf

        meta, files = unpack_state(state)
        if meta.get("kind") != "tfdata":
            raise ValueError(f"Iterator state of kind {meta.get('kind')!r}, expected 'tfdata'")
        self._check_fingerprint(meta)
        with tempfile.TemporaryDirectory(prefix="data_state_") as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, os.path.basename(name)), "wb") as f:
                    f.write(data)
            tf.train.Checkpoint(iterator=self._iterator).read(
                os.path.join(tmp, "iterator")
            ).assert_consumed()


class MockIterator(BatchIterator):
    """Uniform random images in [-1, 1] and random labels; batch i depends only on (seed, i)."""

    def __init__(self, info: DatasetInfo, batch_size: int, seed: int):
        fingerprint = {
            "kind": "mock",
            "image_shape": list(info.image_shape),
            "num_classes": info.num_classes,
            "batch_size": batch_size,
            "seed": seed,
        }
        super().__init__(info, fingerprint)
        self._batch_size = batch_size
        self._seed = seed
        self._step = 0

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self._seed, self._step])
        self._step += 1
        shape = (self._batch_size, *self.info.image_shape)
        image = rng.random(shape, dtype=np.float32) * 2.0 - 1.0
        if self.info.num_classes:
            label = rng.integers(0, self.info.num_classes, self._batch_size, dtype=np.int32)
        else:
            label = np.zeros(self._batch_size, np.int32)
        return {"image": image, "label": label}

    def get_state(self) -> bytes:
        return pack_state({"kind": "mock", "fingerprint": self._fingerprint, "step": self._step})

    def set_state(self, state: bytes) -> None:
        meta, _ = unpack_state(state)
        if meta.get("kind") != "mock":
            raise ValueError(f"Iterator state of kind {meta.get('kind')!r}, expected 'mock'")
        self._check_fingerprint(meta)
        self._step = int(meta["step"])


def make_mock_iterator(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    batch_size: int,
    seed: int,
    num_examples: int = 10_000,
) -> MockIterator:
    """Random data with the interface of `make_train_iterator`, for --smoke runs on a CPU.

    num_examples is nominal (reported in `info`); the stream is infinite.
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    info = DatasetInfo("mock", shape, int(num_classes), int(num_examples))
    return MockIterator(info, batch_size, seed)
