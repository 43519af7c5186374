"""Data parallelism over every device of every process: batches split on axis 0, state replicated."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class DataParallel:
    data: NamedSharding
    replicated: NamedSharding

    @classmethod
    def create(cls, global_batch: int) -> "DataParallel":
        devices = jax.devices()
        if global_batch % len(devices):
            raise ValueError(f"train.batch_size {global_batch} must be divisible by the {len(devices)} devices")
        mesh = Mesh(np.asarray(devices), ("data",))
        return cls(NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))

    def shard(self, local: np.ndarray) -> jax.Array:
        """This process's slice of the global batch -> one global array sharded over all devices."""
        return jax.make_array_from_process_local_data(self.data, local)

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)
