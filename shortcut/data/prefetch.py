"""Batches prefetched onto the devices by a background thread, with an exact checkpoint position.

`DevicePrefetcher` wraps a host iterator (numpy batches, `get_state`/`set_state`): a thread takes
batches from it, puts them on the devices (`put`, e.g. a sharded `jax.make_array_from_process_local_data`)
and queues `size` of them, so the transfers of the next batches overlap the running train step.

The inner iterator is then ahead of what training consumed, so `get_state` describes the consumed
position: at the counts `snapshot_at` names (the train loop's checkpoint and evaluation steps) the
thread records the inner state just before fetching the next batch, which is exactly the state after
that many consumed batches; anywhere else (Ctrl-C, SIGTERM mid-interval) the state bundles the
inner state with the host copies of the fetched but unconsumed batches, which `set_state` replays
first. Either way a resumed run sees the batch sequence an uninterrupted one would.
"""

from __future__ import annotations

import collections
import io
import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np

from shortcut.data.iterators import pack_state, unpack_state

_KIND = "prefetched"


class DevicePrefetcher:
    """Iterator of device batches `put(host_batch)`, `size` of them queued ahead (at least 2 in flight)."""

    def __init__(self, inner: Iterator, put: Callable[[dict], Any], *, size: int = 2, start: int = 0,
                 snapshot_at: Callable[[int], bool] = lambda n: False):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self.inner, self._put, self._size, self._snapshot_at = inner, put, size, snapshot_at
        self._consumed = self._fetched = start  # batches handed out / taken from `inner` (or the replay)
        self._pending: collections.deque[dict] = collections.deque()  # host copies, fetched not consumed
        self._replay: collections.deque[dict] = collections.deque()  # restored pending batches, not put yet
        self._snapshots: dict[int, bytes] = {}
        # `_reading` is held while the inner iterator moves (so get_state sees it at rest), `_books` only
        # for the counters: taking a batch never waits for the thread's read of a later one.
        self._reading, self._books = threading.Lock(), threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="device-prefetch", daemon=True)
            self._thread.start()
        kind, item = self._queue.get()
        if kind == "error":
            self._queue.put((kind, item))  # the iterator stays exhausted / failed for later calls
            raise item
        with self._books:
            self._pending.popleft()
            self._consumed += 1
            for n in [n for n in self._snapshots if n < self._consumed]:
                del self._snapshots[n]
        return item

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                with self._reading:
                    if self._replay:
                        host = self._replay.popleft()
                    else:
                        if self._snapshot_at(self._fetched):
                            snapshot = self.inner.get_state()
                            with self._books:
                                self._snapshots[self._fetched] = snapshot
                        host = next(self.inner)
                        with self._books:
                            self._pending.append(host)
                            self._fetched += 1
                item = ("batch", self._put(host))
            except BaseException as e:  # StopIteration, a data error, a test's KeyboardInterrupt: raised in order
                item = ("error", e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return

    def get_state(self) -> bytes:
        """The position after the batches consumed so far (not those prefetched)."""
        with self._reading, self._books:
            if self._consumed in self._snapshots:
                return self._snapshots[self._consumed]
            inner = self.inner.get_state()
            if not self._pending:
                return inner
            files = {"inner": inner} | {f"pending_{i}.npz": _to_npz(b) for i, b in enumerate(self._pending)}
            return pack_state({"kind": _KIND, "pending": len(self._pending)}, files)

    def set_state(self, state: bytes) -> None:
        """Continue from `get_state`'s bytes (or a plain inner-iterator state); before the first batch."""
        if self._thread is not None:
            raise RuntimeError("set_state after prefetching started")
        try:
            meta, files = unpack_state(state)
        except ValueError:
            meta, files = {}, {}
        if meta.get("kind") != _KIND:
            self.inner.set_state(state)
            return
        self.inner.set_state(files["inner"])
        batches = [_from_npz(files[f"pending_{i}.npz"]) for i in range(int(meta["pending"]))]
        self._replay.extend(batches)
        self._pending.extend(batches)
        self._fetched = self._consumed + len(batches)

    def close(self) -> None:
        """Stop the thread (it may hold one batch it fetched; the state above accounts for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _to_npz(batch: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in batch.items()})
    return buf.getvalue()


def _from_npz(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as f:
        return {k: f[k] for k in f.files}
