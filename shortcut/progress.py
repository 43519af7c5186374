"""Progress with time left for long work (training, evaluation, feature statistics, pair generation, compiles).

One decision, `mode()`, read from $SHORTCUT_PROGRESS when a command line set it, else from the terminal:

    bar    a tqdm bar on stderr (this process writes to a terminal)
    ray    a Ray worker's bar through `ray.experimental.tqdm_ray`: the driver draws every worker's bar in
           its own terminal, one line each, between the log lines (the driver sets this for its workers)
    plain  no bar: a log file, CI, a pipe or `--quiet`; callers keep their plain log lines at their cadence

A bar shows done / total, the rate and the time left (tqdm's `[elapsed<remaining]`); `Bar.note` adds a short
status such as the last loss.
"""

from __future__ import annotations

import os
import sys

ENV = "SHORTCUT_PROGRESS"
MODES = ("bar", "ray", "plain")


def mode() -> str:
    """How this process shows progress: $SHORTCUT_PROGRESS if set, else "bar" on an interactive terminal
    outside CI, else "plain"."""
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen in MODES:
        return chosen
    return "bar" if sys.stderr.isatty() and not os.environ.get("CI") else "plain"


def shows_bars() -> bool:
    """Whether bars stand in for the plain progress lines."""
    return mode() != "plain"


def worker_env() -> dict[str, str]:
    """The environment a Ray worker of this driver gets: bars through the driver ("ray") when the driver
    draws bars, else plain lines."""
    return {ENV: "ray" if shows_bars() else "plain"}


def set_quiet() -> None:
    """`--quiet`: plain lines in this process and its workers, whatever the terminal."""
    os.environ[ENV] = "plain"


class Bar:
    """A progress bar (or nothing, in plain mode): `update(n)`, `note(text)`, `close()`; a context manager."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 enabled: bool | None = None, through_ray: bool = False):
        self.desc = desc
        self.mode = mode() if enabled is None else ("plain" if not enabled else "bar" if mode() == "plain" else mode())
        if through_ray and self.mode == "bar":  # a Ray driver's own bar: drawn by Ray's manager with its workers'
            self.mode = "ray"
        self._bar = None
        if self.mode == "ray":
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            self._bar = ray_tqdm(desc=desc, total=total, unit=unit)
            self._bar.n = initial
        elif self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn (else callers log their plain lines)."""
        return self.mode != "plain"

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        """A short status after the bar's numbers (tqdm's postfix; in a Ray bar, part of its description)."""
        if self._bar is None:
            return
        if self.mode == "ray":
            self._bar.set_description(f"{self.desc} {text}")
        else:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool | None = None,
        through_ray: bool = False) -> Bar:
    """A bar over `total` units of work named `desc`, `initial` of them already done (a resumed piece);
    `enabled` True or False overrides `mode()` (a caller's explicit choice); `through_ray` (a Ray driver) draws
    it with the workers' bars."""
    return Bar(total, desc, unit, initial, enabled, through_ray)
