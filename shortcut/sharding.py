"""Data parallelism (`dp`) or fully-sharded data parallelism (`fsdp`) over every device of every process.

Both split each batch on axis 0 over a 1-D `("data",)` mesh. `dp` replicates the training state;
`fsdp` shards every array of it (parameters, EMA parameters, optimizer moments, a teacher's
parameters) along its largest dimension that the device count divides, and replicates arrays under
`MIN_SHARD_BYTES` (biases, norms, scalars: gathering them costs more latency than their memory is
worth). The train step is jit-compiled with these shardings, so XLA inserts the all-gathers and
reduce-scatters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Strategy = Literal["dp", "fsdp"]
MIN_SHARD_BYTES = 2**16  # 64 KiB: every kernel of DiT-S and larger is sharded, no bias or norm scale is


@dataclasses.dataclass(frozen=True)
class Parallel:
    strategy: Strategy
    mesh: Mesh
    data: NamedSharding  # batch: axis 0 over the devices
    replicated: NamedSharding

    @classmethod
    def create(cls, global_batch: int, strategy: Strategy = "dp", devices=None) -> "Parallel":
        devices = list(devices) if devices is not None else jax.devices()
        if global_batch % len(devices):
            raise ValueError(f"train.batch_size {global_batch} must be divisible by the {len(devices)} devices")
        if strategy not in ("dp", "fsdp"):
            raise ValueError(f"resources.sharding must be dp or fsdp, got {strategy!r}")
        mesh = Mesh(np.asarray(devices), ("data",))
        return cls(strategy, mesh, NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def shard(self, local: np.ndarray) -> jax.Array:
        """This process's slice of the global batch -> one global array sharded over all devices."""
        return jax.make_array_from_process_local_data(self.data, local)

    def array_sharding(self, shape: tuple[int, ...], dtype) -> NamedSharding:
        """Where one state array lives: replicated under dp (and when small), else split along its
        largest dimension divisible by the device count (replicated when none is)."""
        n = self.num_devices
        if self.strategy == "dp" or n == 1 or int(np.prod(shape)) * np.dtype(dtype).itemsize < MIN_SHARD_BYTES:
            return self.replicated
        for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[axis] % n == 0:
                spec = [None] * len(shape)
                spec[axis] = "data"
                return NamedSharding(self.mesh, PartitionSpec(*spec))
        return self.replicated

    def state_shardings(self, tree: Any) -> Any:
        """The sharding of every array of `tree` (arrays or ShapeDtypeStructs), same structure."""
        return jax.tree.map(lambda a: self.array_sharding(a.shape, a.dtype), tree)

    def place(self, tree: Any) -> Any:
        """`tree` on the mesh with `state_shardings(tree)`."""
        return jax.device_put(tree, self.state_shardings(tree))


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes of `tree`'s arrays held by each device (by device id)."""
    held: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held
