"""The figures beside the tables: metric against sampling steps, convergence curves against training compute,
and a Figure-1 style grid of samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestration.reporting.tables import MISSING, Table, mean_curve, method_name, sort_key
from shortcut import metrics


def plot_steps(t: Table, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.ours for r in t.rows) and not any(v is not None for r in t.rows for v in r.paper.values()):
        return None
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    comparable = t.paper_metrics == {t.metric}
    several_archs = len({r.arch for r in t.rows}) > 1
    handles, ours_drawn, paper_drawn = [], False, False
    for r in t.rows:  # one colour per drawn row; ours solid with circles, the paper's dashed with squares
        color = f"C{len(handles) % 10}"
        xs = [n for n in t.steps if r.ours.get(n)]
        px = [n for n in t.steps if r.paper.get(n) is not None] if comparable else []
        if xs:
            ys = [r.ours[n][0] for n in xs]
            err = [r.ours[n][1] if r.ours[n][2] > 1 else 0.0 for n in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", color=color, capsize=3)
            ours_drawn = True
        if px:
            ax.plot(px, [r.paper[n] for n in px], "s--", color=color, alpha=0.7)
            paper_drawn = True
        if xs or px:
            handles.append(Line2D([], [], color=color, lw=2, label=r.label + (f" ({r.arch})" if several_archs else "")))
    if ours_drawn:  # what the two line styles mean
        handles.append(Line2D([], [], color="0.4", marker="o", label=f"ours: {t.ours_tag}"))
    if paper_drawn:
        handles.append(Line2D([], [], color="0.4", marker="s", ls="--", alpha=0.7, label=f"paper: {t.paper_tag}"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(t.steps)
    ax.set_xticklabels([str(n) for n in t.steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps (log2 scale)")
    ax.set_ylabel(metrics.quantity(t.metric).display)
    better = "lower" if metrics.quantity(t.metric).lower_is_better else "higher"
    ax.set_title(f"{t.dataset}: {t.ours_tag} vs number of sampling steps ({better} is better)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(t: Table, path: Path) -> Path | None:
    """Convergence curves: the metric vs total training compute (log-log), one panel per curve step count,
    one line per row (the seeds' mean) with the seeds' range as a band; a student's curve starts after its
    teacher's compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({n for r in t.rows for n in r.curves}, reverse=True)
    if not steps:
        return None
    fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps) + 2, 4), dpi=120, squeeze=False)
    for ax, n in zip(axes[0], steps):
        for i, r in enumerate(t.rows):
            by_seed = r.curves.get(n)
            if not by_seed:
                continue
            length = min(len(p) for p in by_seed.values())
            x, y = np.array(mean_curve(by_seed)).T
            ys = np.array([[p[k][1] for k in range(length)] for p in by_seed.values()])
            ax.plot(x, y, marker=".", color=f"C{i % 10}", label=r.label)
            if len(ys) > 1:
                ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=f"C{i % 10}", alpha=0.2)
        _compute_axes(ax, t, n, f"{t.dataset}: {n}-step {t.metric} vs compute (band: seeds' range)")
    return _save(fig, axes, path)


def _compute_axes(ax, t: Table, n: int, title: str) -> None:
    """A metric-against-compute panel's floor line, log axes, labels and grid."""
    floor = next((r.floors.get(n) for r in t.rows if r.floors.get(n)), None)
    if floor:
        ax.axhline(floor, color="0.3", ls=":", lw=1, label="noise floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (FLOPs, teachers included)")
    ax.set_ylabel(f"{t.ours_tag}, {n}-step sampling")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_budget(t: Table, longer: Table, path: Path) -> Path | None:
    """The budget study drawn over a table's curves: per curve step count, each row's seed-mean curve at the
    table's budget (solid) and the same method's longer run (dashed, same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({n for r in longer.rows for n in r.curves}, reverse=True)
    if not steps:
        return None
    colours = {r.method: f"C{i % 10}" for i, r in enumerate(t.rows)}
    fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps) + 2, 4), dpi=120, squeeze=False)
    for ax, n in zip(axes[0], steps):
        for rows, style, suffix in ((t.rows, "-", f" ({t.ours_tag}, table)"), (longer.rows, "--", " (longer run)")):
            for r in rows:
                if r.curves.get(n) and r.method in {x.method for x in longer.rows}:
                    x, y = np.array(mean_curve(r.curves[n])).T
                    ax.plot(x, y, style, marker=".", color=colours.get(r.method, "0.5"), label=r.label + suffix)
        _compute_axes(ax, t, n, f"{t.dataset}: {n}-step {t.metric}, the table's budget (solid) and 4x (dashed)")
    return _save(fig, axes, path)


def budget_ranking(t: Table, longer: Table, num_steps: int = 1) -> str:
    """Markdown: each method of the longer runs at `num_steps`, its value and rank at the table's budget
    (seed mean) and at the longer budget."""
    def cells(tab: Table) -> dict[str, tuple[float, int]]:
        return {r.method: (c[0], c[2]) for r in tab.rows for c in [r.ours.get(num_steps)] if c and np.isfinite(c[0])}

    ours, long = cells(t), cells(longer)
    methods = [m for m in long if m in ours]
    rank = lambda values: {m: i + 1 for i, m in enumerate(sorted(methods, key=lambda m: values[m][0]))}
    r_ours, r_long = rank(ours), rank(long)
    lines = [f"| method | {num_steps}-step at the table's budget (mean of {max(ours[m][1] for m in methods)} seeds) "
             f"| rank | {num_steps}-step at 4x (1 seed) | rank |", "| --- | ---: | ---: | ---: | ---: |"]
    for m in sorted(methods, key=lambda m: r_long[m]):
        lines.append(f"| {method_name(m)} | {ours[m][0]:.2f} | {r_ours[m]} | {long[m][0]:.2f} | {r_long[m]} |")
    same = [r_ours[m] for m in sorted(methods, key=lambda m: r_long[m])] == sorted(r_ours.values())
    lines += ["", f"- The {num_steps}-step ranking of these {len(methods)} methods at 4x the budget is "
              f"{'the same as' if same else 'not the same as'} at the table's budget."]
    return "\n".join(lines) + "\n"


def _samples_steps(key: str, info: dict) -> int:
    """The step count of a run's `samples` entry (keyed "<N>", or "<N>_w<w>" for one of several scales)."""
    return int(info.get("num_steps", str(key).split("_")[0]))


def sample_figure(records: list[dict], dataset: str, path: Path) -> Path | None:
    """Figure-1 style: one row per method (its run with the lowest seed), one column per step count,
    each cell the run's first sample, which starts from the same noise for every step count (and for
    every run with the same seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    chosen: dict[tuple, dict] = {}
    for rec in records:
        if rec["dataset"] != dataset or not any(s.get("first_sample") for s in rec.get("samples", {}).values()):
            continue
        key = (rec["method"], rec["arch"], rec["config_hash"])
        if key not in chosen or rec["seed"] < chosen[key]["seed"]:
            chosen[key] = rec
    if not chosen:
        return None
    runs = sorted(chosen.values(), key=lambda r: sort_key(r["method"], r["arch"], r["name"]))
    steps = sorted({_samples_steps(k, s) for r in runs for k, s in r["samples"].items() if s.get("first_sample")},
                   reverse=True)
    seeds = {r["seed"] for r in runs}
    labels = {}
    for r in runs:
        label = f"{method_name(r['method'])}\n{r['arch']}"
        if sum(1 for q in runs if (q["method"], q["arch"]) == (r["method"], r["arch"])) > 1:
            label += f"\n{r['name']}"
        labels[id(r)] = label + (f"\nseed {r['seed']}" if len(seeds) > 1 else "")
    fig, axes = plt.subplots(len(runs), len(steps), figsize=(1.6 * len(steps) + 1.4, 1.6 * len(runs) + 0.6),
                             squeeze=False, dpi=120)
    for i, r in enumerate(runs):
        for j, n in enumerate(steps):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            # a step count sampled at several scales: its first scale (keys "<N>" or "<N>_w<w>", in order)
            name = next((s.get("first_sample") for k, s in r["samples"].items()
                         if _samples_steps(k, s) == n and s.get("first_sample")), None)
            if name and (Path(r["_assets_dir"]) / name).exists():
                img = np.asarray(Image.open(Path(r["_assets_dir"]) / name))
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.text(0.5, 0.5, MISSING, ha="center", va="center", transform=ax.transAxes)
            if i == 0:
                ax.set_title(f"{n} step{'s' if n > 1 else ''}", fontsize=9)
            if j == 0:
                ax.set_ylabel(labels[id(r)], fontsize=7, rotation=0, ha="right", va="center")
    note = "same starting noise in every cell" if len(seeds) == 1 else "same noise within a row; rows differ by seed"
    fig.suptitle(f"{dataset}: first sample of each run ({note})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
