"""results/: the paper's published numbers and small exported records of finished runs.

    results/paper/table1.csv        published numbers as data, one line per cell, each with its source
    results/paper/published.csv     later methods' published numbers beside the digits tables (docs/published.md)
    results/runs/<spec>/<hash12>.json   one finished run: metric values with provenance (no checkpoints)
    results/runs/<spec>/<hash12>/steps_<N>.png   its first sample at N steps (for the Figure-1 image)
    results/tables/, results/figures/   what make_tables writes

A run is exported by `run_experiment` when it finishes (not `--smoke` runs: mock data), or later with
`make_tables --export RUN_OR_WORK_DIR`. The exported record is what the tables are built from; the
run directory's run.json stays the full record.

First samples: the sample grids (`samples/steps_<N>.png`) start every step count from the same noise
(sample i's noise depends only on (eval seed, i)), so the first cell of each grid is the same starting
noise taken through N steps. The export crops that cell out of the grid (layout of
`shortcut.images.grid`: ceil(sqrt(n)) columns, 1-pixel padding, nearest upscaling) at the model's
native resolution. Latent-space runs show the first three latent channels, as their grids do.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from shortcut import record as record_lib
from shortcut.spec import hashed_content

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = 1
CONFIG_SECTIONS = ("data", "model", "method", "optimizer", "train")  # the spec hash's sections minus seed


def default_results_dir() -> Path:
    """$SHORTCUT_RESULTS_DIR, else <repo>/results."""
    return Path(os.environ.get("SHORTCUT_RESULTS_DIR") or REPO_ROOT / "results")


def config_hash(spec: dict) -> str:
    """What is trained, without the seed: runs that differ only by seed share it (and are averaged). Keys the spec
    hash leaves out are left out here too (shortcut.spec.hashed_content), so a run recorded before a key was added
    shares the hash of a later run that has the key at its old value."""
    content = hashed_content({k: spec.get(k) for k in CONFIG_SECTIONS})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def input_hw(spec: dict) -> tuple[int, int]:
    d = spec["data"]
    size = d["image_size"]
    if d.get("latent"):
        size //= d["latent"]["downsample"]
    return size, size


def first_sample(grid_png: str | Path, spec: dict):
    """The first cell of a sample grid as a PIL image at native resolution, or None if the grid's layout
    is not the expected one (see module docstring)."""
    from PIL import Image

    h, w = input_hw(spec)
    n, pad = int(spec["eval"]["grid_size"]), 1
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    gw, gh = ncol * (w + pad) + pad, nrow * (h + pad) + pad
    with Image.open(grid_png) as img:
        scale = img.width // gw
        if scale < 1 or img.width != gw * scale or img.height != gh * scale:
            return None
        cell = img.crop((scale * pad, scale * pad, scale * (pad + w), scale * (pad + h)))
        return cell.resize((w, h), Image.NEAREST)


def arch_label(spec: dict) -> str:
    """``DiT-B/2``-style name of the model in a resolved spec."""
    m = spec["model"]
    size = m.get("size")
    body = size if size else f"h{m.get('hidden_size')}-d{m.get('depth')}"
    return f"DiT-{body}/{m.get('patch_size', 2)}"


def export_record(record: dict) -> dict:
    """The small results record of a run record (run.json): metrics with provenance, no checkpoints."""
    spec = record["spec"]
    final = (record.get("train") or {}).get("final") or {}
    out = {
        "schema": SCHEMA,
        "name": record["name"], "spec_hash": record["spec_hash"], "config_hash": config_hash(spec),
        "method": spec["method"]["name"], "dataset": spec["data"]["dataset"], "seed": spec.get("seed", 0),
        "arch": arch_label(spec), "smoke": bool(record.get("smoke")), "status": record.get("status"),
        "git_commit": record.get("git_commit"), "git_changes": record.get("git_changes") or [],
        "started": record.get("started"),
        "finished": record.get("finished"), "num_params": record.get("num_params"),
        "train": {"steps": (record.get("train") or {}).get("steps"),
                  "final": {k: v for k, v in final.items() if isinstance(v, (int, float))},
                  "seconds": (record.get("timings") or {}).get("train_s")},
        "evaluation": record.get("evaluation") or [],
        "compute": record.get("compute"), "curve": record.get("curve") or [], "teacher": record.get("teacher"),
        "samples": {n: {k: v for k, v in info.items() if k != "grid"}
                    for n, info in (record.get("samples") or {}).items()},
        "spec": spec,
        "source": {"run_dir": str(record.get("run_dir")), "versions": record.get("versions"),
                   "devices": record.get("devices"),
                   "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    if record.get("evaluation_note"):
        out["evaluation_note"] = record["evaluation_note"]
    out["_grids"] = {n: info.get("grid") for n, info in (record.get("samples") or {}).items()}
    out["_feature_stats"] = {i: Path(str(record.get("run_dir"))) / e["feature_stats"]
                             for i, e in enumerate(out["evaluation"]) if e.get("feature_stats")}
    return out


FEATURE_STATS = "feature_stats.npz"
FEATURE_STATS_MAX_DIM = 256  # small enough to export (fd_digits' 64); FID's 2048-d statistics stay in the run dir


def _export_feature_stats(exported: dict, stats: dict, assets: Path) -> None:
    """Pack the evaluation entries' sample feature statistics (mean, covariance, count) into one compressed
    file beside the record, and point each exported entry at its arrays ("feature_stats.npz:<key>")."""
    from shortcut.evaluation.frechet import RunningStats

    arrays = {}
    exported["evaluation"] = [dict(e) for e in exported["evaluation"]]
    for i, path in stats.items():
        entry = exported["evaluation"][i]
        entry.pop("feature_stats", None)
        try:
            running = RunningStats.load(path)
        except (OSError, ValueError, KeyError):
            continue
        if running.dim > FEATURE_STATS_MAX_DIM or running.count < 2:
            continue
        key = Path(path).stem
        arrays.update({f"{key}.mean": running.mean, f"{key}.cov": running.cov, f"{key}.count": np.int64(running.count)})
        entry["feature_stats"] = f"{FEATURE_STATS}:{key}"
    if arrays:
        assets.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(assets / FEATURE_STATS, **arrays)


def load_feature_stats(record: dict, entry: dict) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(mean, covariance, count) of an exported evaluation entry's samples, None when not exported."""
    ref = entry.get("feature_stats") or ""
    if ":" not in ref or not record.get("_assets_dir"):
        return None
    name, key = ref.split(":", 1)
    path = Path(record["_assets_dir"]) / name
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        if f"{key}.mean" not in f.files:
            return None
        return np.asarray(f[f"{key}.mean"]), np.asarray(f[f"{key}.cov"]), int(f[f"{key}.count"])


def write_export(exported: dict, dest: Path, flat: bool = False) -> Path:
    """Write an exported record. flat: dest/record.json + dest/steps_<N>.png (an MLflow artifact folder);
    else dest is the JSON path and the first samples go to a folder of the same name beside it."""
    exported = dict(exported)
    grids = exported.pop("_grids", {}) or {}
    stats = exported.pop("_feature_stats", {}) or {}
    json_path = dest / "record.json" if flat else dest
    assets = dest if flat else dest.with_suffix("")
    exported["assets"] = "." if flat else assets.name
    _export_feature_stats(exported, stats, assets)
    for n, grid in grids.items():
        image = first_sample(grid, exported["spec"]) if grid and Path(grid).is_file() else None
        if image is not None:
            assets.mkdir(parents=True, exist_ok=True)
            image.save(assets / f"steps_{n}.png")
            exported["samples"].setdefault(n, {})["first_sample"] = f"steps_{n}.png"
    record_lib.write_json(json_path, exported)
    return json_path


def export_path(record: dict, results_dir: str | Path | None = None) -> Path:
    """Where a run's results record goes: results/runs/<name>/<hash12>.json."""
    root = Path(results_dir) if results_dir else default_results_dir()
    return root / "runs" / record["name"] / f"{record['spec_hash'][:12]}.json"


def _git_tracked(path: Path) -> bool | None:
    """Whether git tracks `path` in its checkout; None when `path` is in no git checkout (or git is missing)."""
    import subprocess

    try:
        inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=path.parent, capture_output=True,
                                text=True, timeout=10)
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        return subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None


def committed_record(path: Path) -> dict | None:
    """The results record at `path` when it is a committed result, which a new run must not replace unasked:
    git tracks it, or, outside a git checkout, it was made from a clean commit. None otherwise."""
    existing = record_lib.read(path) if path.is_file() else None
    if not existing:
        return None
    tracked = _git_tracked(path)
    if tracked is None:
        commit = str(existing.get("git_commit") or "")
        tracked = bool(commit) and commit != "unknown" and not commit.endswith("-dirty") and \
            not existing.get("git_changes")
    return existing if tracked else None


class KeptRecord(Exception):
    """A committed results record of the same spec hash was kept (export_run with replace=False)."""

    def __init__(self, path: Path, committed: dict):
        self.path, self.committed = path, committed
        super().__init__(f"kept the committed record of {str(committed.get('git_commit'))[:7]}: {path}")


def export_run(record: dict | str | Path, results_dir: str | Path | None = None, *,
               include_smoke: bool = False, replace: bool = False) -> Path | None:
    """Export a finished run (a record, or a run directory / run.json path) into results/runs/.
    Returns the JSON path, or None for runs that are not finished or are --smoke runs. A committed record of
    the same spec hash (committed_record) is only replaced with `replace`; otherwise KeptRecord is raised and
    nothing is written (the run's own record stays in its run directory)."""
    if not isinstance(record, dict):
        record = record_lib.read(record) or {}
    if record.get("status") != "finished" or (record.get("smoke") and not include_smoke):
        return None
    dest = export_path(record, results_dir)
    committed = None if replace else committed_record(dest)
    if committed is not None:
        raise KeptRecord(dest, committed)
    return write_export(export_record(record), dest)


def find_run_records(path: str | Path) -> list[Path]:
    """run.json of a run directory, or every run.json below a work directory (not the copies the
    local MLflow server keeps among its artifacts under <workdir>/mlflow/)."""
    path = Path(path)
    if (path / "run.json").exists():
        return [path / "run.json"]
    return [f for f in sorted(path.rglob("run.json")) if "mlflow" not in f.relative_to(path).parts[:-1]]


def export_tree(path: str | Path, results_dir: str | Path | None = None, *, include_smoke: bool = False,
                replace: bool = False) -> list[Path]:
    """Export every finished run.json at or below `path` (a run directory or a work directory); a committed
    record of the same spec hash is kept (and said so on stderr) unless `replace`."""
    import sys

    out = []
    for f in find_run_records(path):
        try:
            record = json.loads(f.read_text())
        except ValueError:
            continue
        try:
            written = export_run(record, results_dir, include_smoke=include_smoke, replace=replace)
        except KeptRecord as kept:
            print(f"{record['name']}: {kept}; this run's record: {f}; --replace-record to replace it", file=sys.stderr)
            continue
        if written:
            out.append(written)
    return out


def load_exports(results_dir: str | Path | None = None) -> list[dict]:
    """Every exported record under results/runs/ (with `_assets_dir` set for their first samples)."""
    root = (Path(results_dir) if results_dir else default_results_dir()) / "runs"
    out = []
    for f in sorted(root.rglob("*.json")):
        rec = json.loads(f.read_text())
        if rec.get("schema") != SCHEMA:
            continue
        rec["_assets_dir"] = str(f.parent / rec.get("assets", "."))
        if isinstance(rec.get("spec"), dict):  # today's rule, also for records exported under an earlier one
            rec["config_hash"] = config_hash(rec["spec"])
        out.append(rec)
    return out


def fill_missing_floors(records: list[dict]) -> int:
    """Give fd_digits entries recorded before noise floors existed the floor of their reference (named in
    the entry, e.g. "sklearn_digits/all (1797 images)") at their sample count, measured now the way a run
    measures it and marked as measured later. Returns how many entries it filled."""
    from shortcut.evaluation.digits_metric import digits_metric

    metrics: dict[str, object] = {}
    filled = 0
    for rec in records:
        for e in rec.get("evaluation") or []:
            if e.get("metric") != "fd_digits" or e.get("noise_floor") or "reference" not in e:
                continue
            split = str(e["reference"]).split("/", 1)[-1].split(" ", 1)[0]
            if split not in ("all", "heldout"):
                continue
            if split not in metrics:
                metrics[split] = digits_metric(heldout_split=None if split == "all" else split)
            floor = dict(metrics[split].floor(int(e["num_samples"])))
            floor.pop("values", None)
            e["noise_floor"] = {**floor, "note": "measured by make_tables: the run was recorded before floors were"}
            filled += 1
    return filled


PUBLISHED = "published.csv"  # results/paper/published.csv: other methods' published numbers (load_published)


def paper_dir(results_dir: str | Path | None = None) -> Path:
    """results/paper/ of a results folder; one without any CSV there (e.g. a folder outside the checkout): the
    shipped numbers, <repo>/results/paper."""
    root = (Path(results_dir) if results_dir else default_results_dir()) / "paper"
    return root if any(root.glob("*.csv")) else REPO_ROOT / "results" / "paper"


def load_paper(results_dir: str | Path | None = None):
    """results/paper/*.csv (published.csv aside: another schema) as one DataFrame (empty `value` = a cell the
    project could not confirm; `unsupported` = a cell the paper prints in parentheses, `secondary` = a cell from
    a secondary source; each False where a file has no such column)."""
    import pandas as pd

    root = paper_dir(results_dir)
    frames = [pd.read_csv(f, comment="#", dtype={"value": "float64"}) for f in sorted(root.glob("*.csv"))
              if f.name != PUBLISHED]
    columns = ["dataset", "method", "arch", "metric", "num_samples", "num_steps", "value", "unsupported", "secondary",
               "source", "note"]
    if not frames:
        return pd.DataFrame(columns=columns)
    paper = pd.concat(frames, ignore_index=True)
    for flag in ("unsupported", "secondary"):
        flags = paper[flag] if flag in paper else pd.Series(False, index=paper.index)
        paper[flag] = flags.map(lambda v: str(v).strip().lower() in ("true", "1", "yes"))
    return paper


def load_published(results_dir: str | Path | None = None) -> list[dict]:
    """results/paper/published.csv (in paper_dir's folder) as one dict per line, [] when there is no such file.
    Its columns: table, experiment, method, source, dataset, model, budget, nfe (int), metric, value (float),
    note; blank cells are None. `table` names the table spec, `experiment` the row the number stands beside."""
    import pandas as pd

    path = paper_dir(results_dir) / PUBLISHED
    if not path.exists():
        return []
    frame = pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)
    out = []
    for line in frame.to_dict("records"):
        line = {k: (v.strip() or None) if isinstance(v, str) else v for k, v in line.items()}
        for key, kind in (("nfe", int), ("value", float)):
            try:
                line[key] = None if line.get(key) is None else kind(float(line[key]) if kind is int else line[key])
            except ValueError:
                line[key] = None
        out.append(line)
    return out


def records_from_mlflow(tracking_uri: str, *, include_smoke: bool = False) -> list[dict]:
    """Exported records of the finished runs in the `shortcut-*` experiments of an MLflow server (their
    `export/` artifacts), downloaded into a cache folder."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e for e in client.search_experiments() if e.name.startswith("shortcut-")
                   and (include_smoke or not e.name.endswith("-smoke"))]
    out = []
    if not experiments:
        return out
    cache = Path(tempfile.mkdtemp(prefix="make_tables_mlflow_"))
    ids = [e.experiment_id for e in experiments]
    for run in client.search_runs(ids, filter_string="attributes.status = 'FINISHED'", max_results=50000):
        try:
            local = client.download_artifacts(run.info.run_id, "export", str(cache / run.info.run_id))
        except Exception:  # noqa: BLE001 - a run without an export (e.g. synced before this version)
            continue
        f = Path(local) / "record.json"
        if f.exists():
            rec: dict[str, Any] = json.loads(f.read_text())
            rec["_assets_dir"] = str(f.parent)
            rec["_mlflow_run_id"] = run.info.run_id
            out.append(rec)
    return out
