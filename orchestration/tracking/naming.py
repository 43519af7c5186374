"""MLflow names of a run record: its experiment, run tags, parameters and metric points (see the package
docstring for the scheme)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from orchestration.reporting.results import arch_label

TRAIN_KEYS_SKIPPED = ("step",)
_MAX_PARAM_LENGTH = 6000


def experiment_name(record: dict) -> str:
    """``shortcut-<dataset>``, with ``-smoke`` for mock-data runs (see module docstring)."""
    dataset = record["spec"]["data"]["dataset"]
    return f"shortcut-{dataset}" + ("-smoke" if record.get("smoke") else "")


def run_tags(record: dict) -> dict[str, str]:
    spec = record["spec"]
    tags = {
        "mlflow.runName": f"{record['name']}-{record['spec_hash'][:8]}",
        "spec_name": record["name"], "spec_hash": record["spec_hash"], "method": spec["method"]["name"],
        "dataset": spec["data"]["dataset"], "seed": str(spec.get("seed", 0)), "arch": arch_label(spec),
        "smoke": str(bool(record.get("smoke"))).lower(), "run_dir": str(Path(record["run_dir"]).resolve()),
        "record_status": str(record.get("status", "")),
    }
    if record.get("git_commit"):
        tags["git_commit"] = tags["mlflow.source.git.commit"] = str(record["git_commit"])
    if record.get("resumed_from") is not None:
        tags["resumed_from"] = str(record["resumed_from"])
    return tags


def run_params(record: dict) -> dict[str, str]:
    from shortcut.spec import flatten

    return {k: _param_value(v) for k, v in flatten(record["spec"]).items()}


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:_MAX_PARAM_LENGTH]


def train_points(metrics: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) for one training log line (finite numbers only)."""
    step = int(metrics["step"])
    return [(k, float(v), step) for k, v in metrics.items()
            if k not in TRAIN_KEYS_SKIPPED and isinstance(v, (int, float)) and math.isfinite(v)]


def evaluation_points(entries: Iterable[dict]) -> list[tuple[str, float, int]]:
    """(``<metric>/<setting>``, value, train_step) for evaluation entries, plus class accuracy; the setting
    is ``<N>_steps``, or ``<N>_steps_w<w>`` where a spec evaluates N steps at several guidance scales."""
    out = []
    for e in entries:
        setting, step = e.get("setting") or f"{int(e['num_steps'])}_steps", int(e["train_step"])
        if isinstance(e.get("value"), (int, float)) and math.isfinite(e["value"]):
            out.append((f"{e['metric']}/{setting}", float(e["value"]), step))
        if isinstance(e.get("class_accuracy"), (int, float)):
            out.append((f"class_accuracy/{setting}", float(e["class_accuracy"]), step))
    return out
