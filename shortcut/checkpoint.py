"""Orbax checkpoints of the full training state plus the data iterator's position.

Saves are atomic (Orbax writes to a temporary directory and renames it), the last `keep` are kept,
and a run directory with checkpoints is resumed from its latest readable step: an unreadable one (a
damaged file, a truncated directory) costs one warning line and the one before it is used; nothing
is deleted (`Checkpointer.restore_latest`).
"""

from __future__ import annotations

import base64
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp

from shortcut.errors import ShortcutError

T = TypeVar("T")
UNREADABLE_DIR = "checkpoints_unreadable"  # beside checkpoints/: where resuming moves the unreadable steps it replaces


class CheckpointError(ShortcutError, RuntimeError):
    """No checkpoint of a run can be read; the message (one line) names the directories to remove."""


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with two items: `state` and `data` (iterator bytes)."""

    def __init__(self, directory: str | Path, *, keep: int | None = None):
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

    def restore(self, step: int, like: Any) -> tuple[Any, bytes]:
        """Restore (state, data iterator bytes) with the tree structure, dtypes and shardings of `like` (arrays
        or their jax.ShapeDtypeStruct)."""
        abstract_state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], base64.b64decode(restored["data"]["iterator"])

    def restore_state(self, step: int) -> Any:
        """The training state saved at `step` as a plain tree, read without knowing its structure (e.g. a
        teacher's, whose objective's `aux` the reader does not have)."""
        return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def restore_latest(self, read: Callable[[int], T], *, log: Callable[[str], None] = print,
                       set_aside: bool = False) -> tuple[int, T] | None:
        """`(step, read(step))` for the newest step that can be read, None if there is no checkpoint.

        Unreadable steps are skipped, each reported in one warning line (step, item, why) once a readable
        one is found. With `set_aside` (training resumes and will save those steps again) they are moved
        to `checkpoints_unreadable/` beside the checkpoints, never deleted. None readable: CheckpointError,
        one line naming the directories to remove."""
        quiet_orbax_echoes()
        bad: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                result = read(step)
            except Exception as e:  # noqa: BLE001 - any failure to read it makes this step unusable
                item, why = self._diagnose(step, e)
                bad.append((step, f"{item}: {why}"))
                continue
            set_aside = set_aside and jax.process_index() == 0  # one process moves the shared directories
            for s, why in bad:
                moved = f"; moved it to {self._set_aside(s)}" if set_aside else ""
                log(f"warning: checkpoint at step {s} is unreadable ({why}); using step {step}{moved}")
            if bad and set_aside:
                self._manager.reload()
            return step, result
        if not bad:
            return None
        dirs = " ".join(str(self.directory / str(s)) for s, _ in bad)
        raise CheckpointError(f"no readable checkpoint in {self.directory} (" + "; ".join(f"step {s}: {w}" for s, w in bad)
                              + f"); remove {dirs} to train from scratch")

    def _diagnose(self, step: int, error: Exception) -> tuple[str, str]:
        """(item, why) of a step that failed to restore: which part of the checkpoint, and the root error."""
        step_dir = self.directory / str(step)
        missing = [name for name in ("state", "data") if not (step_dir / name).is_dir()]
        if missing:
            return "+".join(missing), "missing (truncated checkpoint directory)"
        try:
            data = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
            base64.b64decode(data["iterator"], validate=True)
        except Exception as e:  # noqa: BLE001
            return "data (the data iterator's position)", describe_error(e)
        return "state", describe_error(error)

    def _set_aside(self, step: int) -> Path:
        aside = self.directory.parent / UNREADABLE_DIR
        aside.mkdir(exist_ok=True)
        target, n = aside / str(step), 1
        while target.exists():
            target, n = aside / f"{step}.{n}", n + 1
        shutil.move(str(self.directory / str(step)), str(target))
        return target

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


PARTIAL_SAVE = ".orbax-checkpoint-tmp"  # Orbax writes a step into `<step>.orbax-checkpoint-tmp*`, then renames it


def remove_partial_saves(directory: str | Path, *, log: Callable[[str], None] = print) -> list[str]:
    """Delete the unfinished saves (`<step>.orbax-checkpoint-tmp*`) a killed run left in `directory`, which
    would make Orbax fail to save that step again. Only the holder of the run directory's lock
    (shortcut/run_lock.py) may call this: another run's save in progress looks the same. Everything else
    that reads checkpoints ignores these directories (they are not steps)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        if PARTIAL_SAVE in p.name and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        log(f"removed {len(removed)} unfinished checkpoint save(s) left by an earlier run in {directory}: "
            f"{', '.join(removed)}")
    return removed


def describe_error(error: BaseException, limit: int = 300) -> str:
    """`Type: message` of the innermost explicitly chained cause of a failed restore, on one line, shortened."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(str(text).split())
    return f"{type(error).__name__}: {text[:limit] + ('...' if len(text) > limit else '')}"


def quiet_orbax_echoes() -> None:
    """After a failed restore, the TensorStore reads still in flight end in Orbax's closed event loop, and
    each prints a traceback through sys.unraisablehook ("Event loop is closed", or the read's coroutine
    closed with its error). The failure itself is reported once; drop exactly those echoes."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_orbax_echoes", False):
        return

    def hook(unraisable):
        e, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        if code is not None and f"{Path('orbax', 'checkpoint')}" in code.co_filename:
            return
        previous(unraisable)

    hook._drops_orbax_echoes = True
    sys.unraisablehook = hook
