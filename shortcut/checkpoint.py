"""Orbax checkpoints of the full training state plus the data iterator's position.

Saves are atomic (Orbax writes to a temporary directory and renames it), the last `keep` are kept,
and a run directory with checkpoints is resumed from its latest step.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with two items: `state` and `data` (iterator bytes)."""

    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: bytes) -> None:
        """Save asynchronously; call `wait()` before relying on the files."""
        data = {"iterator": base64.b64encode(data_state).decode("ascii"), "process": jax.process_index()}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, bytes]:
        """Restore (state, data iterator bytes); `abstract_state` gives the tree structure and dtypes."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], base64.b64decode(restored["data"]["iterator"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
