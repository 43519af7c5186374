"""Registry of evaluation metrics: a metric name in a spec (`eval.metric`) -> its plugin.

Metrics are plugins, found like methods (shortcut/methods.py): each installed package lists its metrics under
the entry-point group `shortcut.metrics` (this project's in pyproject.toml), `name = "module:PluginClass"`.
A plugin declares the numbers it records (its value and the scores beside it: each one's direction,
description and name in tables), checks that a spec suits it, and loads its feature network and reference
(`load`), or a stand-in for --smoke runs (`smoke`). Runs, tables and findings ask this registry, never a
list of their own.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import metadata

from shortcut.errors import KeyedValueError, ShortcutError

ENTRY_POINT_GROUP = "shortcut.metrics"
NONE = "none"  # `eval.metric: none`: grids only, no number


class EvaluationSetupError(ShortcutError, RuntimeError):
    """Something the metric needs is missing; the message says what and how to provide it."""


@dataclasses.dataclass(frozen=True)
class Quantity:
    """A number an evaluation entry records: a metric's value or one of the scores recorded beside it."""

    description: str  # the tables' note, `name: what it is`
    lower_is_better: bool = True
    display: str | None = None  # its name in table headers and plots (default: the name itself)
    findings: bool = False  # the paper's pairwise findings (about FID) are checked on it (a Frechet distance)


class MetricPlugin:
    """One metric: `name` (the spec's `eval.metric`), `value` (its own number), `scores` (the other numbers its
    entries record, by key). `load` raises EvaluationSetupError (or the feature network's own error) with
    what to do when weights or reference statistics are missing."""

    name: str = ""
    value: Quantity
    scores: dict[str, Quantity] = {}

    def check(self, spec) -> None:
        """Raise KeyedValueError("eval.metric", ...) when a spec's data cannot be scored by this metric."""

    def load(self, spec):
        """The `evaluation.metric.Metric` ready to score samples: feature network and reference statistics."""
        raise NotImplementedError

    def smoke(self, spec):
        """The stand-in of a --smoke run (mock data, no real reference): None for no metric."""
        return None


@functools.lru_cache(maxsize=1)
def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def metric_names() -> list[str]:
    """Every registered metric, sorted."""
    return sorted(_entry_points())


def check_name(name: str) -> str:
    """`name` when it is `none` or a registered metric, else KeyedValueError naming the known ones."""
    if name != NONE and name not in _entry_points():
        known = ", ".join([*metric_names(), NONE])
        raise KeyedValueError("eval.metric", f"unknown metric {name!r}; known: {known} (entry-point group "
                              f"{ENTRY_POINT_GROUP})")
    return name


@functools.cache
def plugin(name: str) -> MetricPlugin:
    """The plugin registered under `name`."""
    return _entry_points()[check_name(name)].load()()


def load_metric(spec):
    """The spec's metric, ready to use (its --smoke stand-in for a --smoke spec), None for `none`; raises before
    any training when weights or reference statistics are missing."""
    if spec.eval.metric == NONE:
        return None
    p = plugin(spec.eval.metric)
    return p.smoke(spec) if spec.smoke else p.load(spec)


@functools.cache
def quantity(name: str) -> Quantity:
    """What a recorded number is: a registered metric's value or score. A name no installed metric declares
    (recorded elsewhere, or a --smoke stand-in) reads as a lower-is-better number, described as recorded."""
    for metric in metric_names():
        p = plugin(metric)
        q = p.value if name == metric else p.scores.get(name)
        if q is not None:
            return dataclasses.replace(q, display=q.display or name)
    return Quantity(f"{name}: as recorded by the evaluation", display=name)


def score_names() -> list[str]:
    """The scores every registered metric records beside its value (what `make_tables --metric` also takes)."""
    return [s for metric in metric_names() for s in plugin(metric).scores]
