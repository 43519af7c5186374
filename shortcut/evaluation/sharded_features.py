"""Jit-compiled feature extraction, data-parallel over the local devices."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class ShardedFeatureFn:
    """Wraps ``fn(variables, images) -> features`` (an array or a pytree of arrays with the batch
    axis first) as a numpy-in, numpy-out callable.

    With several devices the batch axis is split over a 1-D ``("data",)`` mesh and the
    variables are replicated; a batch whose size is not a multiple of the device count
    is zero-padded and the padding's features dropped. With one device it is a plain jit.
    Each distinct (padded) batch size compiles once, so callers should keep it fixed.
    """

    def __init__(self, fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
                 devices: Sequence[jax.Device] | None = None):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        if not self.devices:
            raise ValueError("no devices to run on")
        mesh = Mesh(np.asarray(self.devices), ("data",))
        self._data_sharding = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        self.variables = jax.device_put(variables, replicated)
        self._jit = jax.jit(fn, in_shardings=(replicated, self._data_sharding), out_shardings=self._data_sharding)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def __call__(self, images) -> np.ndarray:
        x = np.asarray(images, np.float32)
        n = x.shape[0]
        padded = -(-n // self.num_devices) * self.num_devices
        if padded != n:
            x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)], axis=0)
        out = self._jit(self.variables, jax.device_put(x, self._data_sharding))
        return jax.tree.map(lambda a: np.asarray(a)[:n], jax.device_get(out))  # an array or a tuple of them
