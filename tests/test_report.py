"""results/report.html: make_tables' one page per table, rendered in a real headless browser (Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestration import make_tables
from orchestration.reporting.results import export_tree
from tracking_fixtures import make_record, make_spec

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
# appended to a copy of the page: what the browser made of it, as attributes `--dump-dom` prints
PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.tables = document.querySelectorAll("table").length;
  document.body.dataset.rows = document.querySelectorAll("table tr").length;
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """make_tables over the repository's paper numbers and two seeds of two digits methods (with curves)."""
    tmp = tmp_path_factory.mktemp("report")
    root, work = tmp / "results", tmp / "runs"
    shutil.copytree(REPO / "results" / "paper", root / "paper")
    for seed in (0, 1):
        make_record(work, make_spec("digits_shortcut", "shortcut", "digits", seed=seed),
                    {128: 3.0 + seed, 4: 5.0 + seed, 1: 9.0 + seed})
        make_record(work, make_spec("digits_flow", "flow_matching", "digits", seed=seed),
                    {128: 3.5 + seed, 4: 7.0 + seed, 1: 50.0 + seed})
    export_tree(work, root)
    assert make_tables.main(["--results-dir", str(root)]) == 0
    return root / "report.html"


def test_report_is_one_self_contained_page(report):
    page = report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing to fetch: it opens offline
    assert "<link" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') >= 2  # the steps plot and the sample grid, embedded
    sections = re.findall(r'<section id="([^"]+)">', page)
    assert sections[0] == "digits" and {"celebahq256", "imagenet256"} <= set(sections)  # ours first
    digits = page[page.index('<section id="digits">'):page.index("</section>")]
    assert "Shortcut Models (2 seeds)" in digits and "Flow Matching (2 seeds)" in digits
    assert "4 run record(s) from commit(s)" in digits  # provenance: the records behind the table
    assert "(302.9)" in page and "17.3 †" in page  # the paper's marks: parentheses, a secondary source


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install Debian's chromium (.ci/run does) to render the "
                                               "report in a browser")
def test_report_renders_in_a_headless_browser(report, tmp_path):
    probed = tmp_path / "report.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    done = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout).group(1)
    attrs = {k: int(v) for k, v in re.findall(r'data-(\w+)="(\d+)"', body)}
    assert attrs["images"] >= 2 and attrs["decoded"] == attrs["images"], attrs  # every figure decodes
    assert attrs["tables"] >= 4 and attrs["rows"] >= 20, attrs  # digits, its findings, CelebA-HQ, ImageNet
    shot = tmp_path / "shot.png"
    done = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1200,900",
                           f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
