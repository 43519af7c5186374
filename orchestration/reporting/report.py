"""results/report.html: every table on one self-contained page (no network: figures are embedded as data URIs).

Per dataset: each table with its marks and notes, the paper's findings with their verdicts and intervals, the
steps plot, the convergence curves (and a budget study's), the sample grid; the compute column is part of the
table. Then each table spec's own table (an ablation, a table beyond the paper) in a section of its own: the
table with the published numbers beside it, its comparisons, its figures. The page opens with its provenance: the commit make_tables ran at and the run records behind it (count
and commits). It is rendered from the Markdown tables make_tables writes, so the page and the .md files agree.
"""

from __future__ import annotations

import base64
import collections
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; } th { background: #f2f2f2; } td { white-space: nowrap; }
td { font-variant-numeric: tabular-nums; }
ul { font-size: 12.5px; color: #444; } figure { display: inline-block; margin: 0.5em 1em 0.5em 0; }
figure img { max-width: 560px; border: 1px solid #ddd; } figcaption { font-size: 12px; color: #555; }
.provenance { background: #f7f7f7; border-left: 4px solid #999; padding: 0.5em 1em; }
"""

FIGURES = (("steps", "metric vs sampling steps"), ("curves", "convergence: metric vs training compute"),
           ("budget", "the budget study beside the table"))


def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _png_bytes(path: Path) -> bytes:
    """The figure as a 256-colour PNG: the page embeds every figure, and plots need no more colours (the
    figure files themselves stay as written)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(path).convert("RGB").quantize(256).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _markdown_section(md, path: Path) -> str:
    """A Markdown table file as HTML, its headings one level down (the page's <h2> is the section)."""
    return md.render(re.sub(r"^## ", "### ", path.read_text(), flags=re.MULTILINE))


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(_png_bytes(path)).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)} ({html.escape(path.name)})</figcaption></figure>")


def provenance(records: list[dict], commit: str, changes: bool) -> str:
    """'N run records from commits a (n), b (m); made at commit c' as HTML."""
    commits = collections.Counter(str(r.get("git_commit") or "unknown")[:7] for r in records)
    made = f"{commit[:7]}" + (" with uncommitted changes" if changes else "")
    runs = (f"{len(records)} run record(s) from commit(s) " + ", ".join(
        f"<code>{html.escape(c)}</code> ({n})" for c, n in commits.most_common())) if records else \
        "No run records of ours: the paper's numbers only"
    return f"{runs}; made by <code>make_tables</code> at <code>{html.escape(made)}</code>."


def _section_head(anchor: str, title: str, records: list[dict], prov: dict) -> str:
    """A section's opening tag, heading and the provenance line of its records."""
    return (f'<section id="{html.escape(anchor)}"><h2>{html.escape(title)}</h2>'
            f'<p class="provenance">{provenance(records, str(prov["git_commit"]), bool(prov["git_changes"]))}</p>')


def _tables_and_figures(md, out_dir: Path, table_files, figure_stem: str, label: str) -> list[str]:
    """The Markdown tables of `table_files` under tables/ and the FIGURES of `figure_stem` under figures/ that
    exist, in that order, each figure captioned `<label>: <caption>`."""
    parts = [_markdown_section(md, out_dir / "tables" / n) for n in table_files if (out_dir / "tables" / n).exists()]
    figures = ((out_dir / "figures" / f"{prefix}_{figure_stem}.png", caption) for prefix, caption in FIGURES)
    return parts + [_image(path, f"{label}: {caption}") for path, caption in figures if path.exists()]


def write_report(tables: list, records: list[dict], out_dir: Path, spec_tables: list = ()) -> Path:
    """Write out_dir/report.html from the tables, findings and figures make_tables wrote under out_dir; each of
    `spec_tables` (a table spec's table: an ablation, a table beyond the paper) in a section of its own after
    the datasets', with its comparisons and the published numbers beside it."""
    from shortcut.record import git_provenance

    md = _markdown()
    prov = git_provenance()
    body = [f"<h1>Tables</h1><p class=\"provenance\">{provenance(records, str(prov['git_commit']), bool(prov['git_changes']))}"
            "</p>"]
    with_runs = {r.get("dataset") for r in records}  # datasets with runs of ours first, then the paper's alone
    datasets = sorted(dict.fromkeys(t.dataset for t in tables), key=lambda ds: ds not in with_runs)
    sections = list(datasets) + list(dict.fromkeys(t.stem for t in spec_tables))
    body.append("<p>" + " · ".join(f'<a href="#{html.escape(ds)}">{html.escape(ds)}</a>' for ds in sections) + "</p>")
    for ds in datasets:
        ours = [r for r in records if r.get("dataset") == ds]
        body.append(_section_head(ds, ds, ours, prov))
        for t in (t for t in tables if t.dataset == ds):
            body += _tables_and_figures(md, out_dir, (f"{t.stem}.md", f"{t.stem}_findings.md",
                                                      f"budget_{t.dataset}_{t.metric}.md"),
                                        f"{t.dataset}_{t.metric}", ds)
        samples = out_dir / "figures" / f"samples_{ds}.png"
        if samples.exists():
            body.append("<h3>Samples</h3>" + _image(samples, f"{ds}: the same noise, one row per method, one column "
                                                             "per step count"))
        body.append("</section>")
    for t in spec_tables:
        ours = [r for r in records if (r.get("name"), r.get("dataset")) in {(x.experiment, t.dataset) for x in t.rows}]
        body.append(_section_head(t.stem, f"{t.name}: {t.metric}", ours, prov))
        body += _tables_and_figures(md, out_dir, (f"{t.stem}.md", f"{t.stem}_comparisons.md"), t.figure_stem, t.name)
        body.append("</section>")
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>shortcut-models: tables"
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out_dir / "report.html"
    path.write_text(page)
    return path
