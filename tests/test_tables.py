"""results/ export and make_tables: cells against hand-computed values, missing cells, seeds, LaTeX."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orchestration import make_tables
from orchestration.reporting.results import export_run, export_tree, first_sample, load_exports, load_paper
from tracking_fixtures import first_image, make_record, make_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def results(tmp_path):
    """A results folder with the repository's paper numbers and a set of synthetic finished runs."""
    root = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper", root / "paper")
    work = tmp_path / "runs"
    # digits: shortcut with three seeds, flow matching with one seed and no 1-step value
    for seed, vals in ((0, {128: 1.0, 4: 2.0, 1: 4.0}), (1, {128: 2.0, 4: 3.0, 1: 6.0}), (2, {128: 3.0, 4: 4.0})):
        make_record(work, make_spec("digits_shortcut", "shortcut", "digits", seed=seed), vals,
                    extra_evals=[{"train_step": 50, "num_steps": 1, "metric": "fd_digits", "value": 99.0,
                                  "num_samples": 2000}])  # an earlier evaluation: must not be used
    make_record(work, make_spec("digits_flow", "flow_matching", "digits"), {128: 3.25, 4: 7.5})
    # runs that must not be exported: unfinished, smoke
    make_record(work, make_spec("digits_failed", "shortcut", "digits", lr=5e-3), {128: 0.0}, status="failed")
    make_record(work, make_spec("digits_smoke", "shortcut", "digits", lr=7e-3), {128: 0.0}, smoke=True)
    # celebahq256: our shortcut FID (a smaller sample count than the paper's)
    make_record(work, make_spec("celeba_ditb_shortcut", "shortcut", "celebahq256", size="B", metric="fid",
                                num_samples=10000), {128: 7.123, 4: 14.5, 1: 21.0})
    exported = export_tree(work, root)
    assert len(exported) == 5
    return root


def _md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_tables_match_hand_computed_cells(results, tmp_path):
    assert make_tables.main(["--results-dir", str(results)]) == 0
    tables = results / "tables"
    md = (tables / "table1_digits_fd_digits.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    # the metric is named as measured, with its sample count; it is not called FID
    assert "fd_digits-2k 128-step (ours)" in header and "FID" not in header
    assert "(paper)" not in header  # the paper has nothing on digits
    rows = _md_rows(md)
    # seeds 0, 1, 2: 128 steps {1, 2, 3} -> 2.00 +- 1.00; 4 steps {2, 3, 4} -> 3.00 +- 1.00;
    # 1 step only seeds 0, 1 {4, 6} -> 5.00 +- 1.41 (n=2), the step-50 value 99 is ignored
    assert rows["Shortcut Models (3 seeds)"] == ["DiT-tiny/2", "2.00 ± 1.00", "3.00 ± 1.00", "5.00 ± 1.41 (n=2)"]
    assert rows["Flow Matching"] == ["DiT-tiny/2", "3.25", "7.50", "-"]  # missing, never 0
    assert "0.00" not in md  # the failed and smoke runs were not exported

    csv = pd.read_csv(tables / "table1_digits_fd_digits.csv", keep_default_na=False)
    flow = csv[csv["Method"] == "Flow Matching"].iloc[0]
    assert flow["fd_digits-2k 1-step (ours)"] == "-"
    values = pd.read_csv(tables / "table1_digits_fd_digits_values.csv")
    sc1 = values[(values["method"] == "shortcut") & (values["num_steps"] == 1)].iloc[0]
    assert sc1["ours_mean"] == pytest.approx(5.0) and sc1["ours_std"] == pytest.approx(np.std([4, 6], ddof=1))
    assert sc1["ours_n"] == 2
    # the values file keeps each seed: seed 2 has no 1-step value
    assert sc1["ours_seeds"] == "0,1" and (sc1["ours_seed_0"], sc1["ours_seed_1"]) == (4.0, 6.0)
    assert pd.isna(sc1["ours_seed_2"])
    sc128 = values[(values["method"] == "shortcut") & (values["num_steps"] == 128)].iloc[0]
    assert (sc128["ours_seed_0"], sc128["ours_seed_1"], sc128["ours_seed_2"]) == (1.0, 2.0, 3.0)

    celeba = _md_rows((tables / "table1_celebahq256_fid.md").read_text())
    ours = celeba["Shortcut Models"]
    assert ours[0] == "DiT-B/2"
    assert ours[1:4] == ["7.12", "14.50", "21.00"]
    assert ours[4:] == ["6.9", "13.8", "20.5"]  # the paper's Table 1 (CelebA-HQ), beside ours
    assert celeba["Consistency Training"] == ["DiT-B/2", "-", "-", "-", "53.7", "19.0", "33.2"]
    # the paper's parenthesised cells ("not intended to support") keep their parentheses
    assert celeba["Progressive Distillation"][4:] == ["(302.9)", "(251.3)", "14.8"]
    assert celeba["Flow Matching"][4:] == ["7.3", "(63.3)", "(280.5)"]
    celeba_md = (tables / "table1_celebahq256_fid.md").read_text()
    assert "Frans et al. 2025, Table 1 (CelebA-HQ), as reprinted in" in celeba_md
    assert "not intended to support" in celeba_md
    celeba_values = pd.read_csv(tables / "table1_celebahq256_fid_values.csv")
    pd128 = celeba_values[(celeba_values["method"] == "progressive_distillation") & (celeba_values["num_steps"] == 128)]
    assert pd128["paper"].item() == 302.9 and bool(pd128["paper_unsupported"].item())
    assert r"(302.9)" in (tables / "table1_celebahq256_fid.tex").read_text()
    assert "FID-10k 128-step (ours)" in celeba_md and "FID-50k 128-step (paper)" in celeba_md
    assert "different sample count" in celeba_md
    # ImageNet: no runs, the paper's rows still form the table (DiT-B and DiT-XL shortcut rows)
    imagenet = (tables / "table1_imagenet256_fid.md").read_text()
    assert "| Shortcut Models | DiT-XL/2 | - | - | - | 3.8 | 7.8 | 10.6 |" in imagenet
    assert "| Reflow | DiT-B/2 | - | - | - | - | - | - |" in imagenet  # unconfirmed ImageNet cells stay empty
    assert "| Flow Matching | DiT-B/2 | - | - | - | 17.3 † | (108.2) † | (324.8) † |" in imagenet  # secondary
    assert "| Shortcut Models | DiT-B/2 | - | - | - | 15.5 | 28.3 | 40.3 |" in imagenet  # primary: no mark
    assert "Paper cells marked †: from a secondary source" in imagenet

    for name in ("steps_digits_fd_digits.png", "steps_celebahq256_fid.png", "samples_digits.png",
                 "samples_celebahq256.png"):
        with Image.open(results / "figures" / name) as img:
            assert img.width > 100 and img.height > 100


def _tabular(text: str) -> tuple[str, list[str]]:
    m = re.search(r"\\begin\{tabular\}\{([^}]*)\}\n(.*?)\\end\{tabular\}", text, re.S)
    assert m, "no tabular environment"
    assert text.count(r"\begin{tabular}") == text.count(r"\end{tabular}") == 1
    rows = [r.strip() for r in m.group(2).split(r"\\") if r.strip() and r.strip() != r"\hline"]
    return m.group(1), [r.replace(r"\hline", "").strip() for r in rows]


def test_latex_is_a_well_formed_tabular(results):
    make_tables.main(["--results-dir", str(results)])
    for tex in (results / "tables").glob("*.tex"):
        text = tex.read_text()
        colspec, rows = _tabular(text)
        ncols = len(re.sub(r"[^lrc]", "", colspec))
        assert rows
        for row in rows:
            cells = re.split(r"(?<!\\)&", row)
            width = sum(int(m.group(1)) if (m := re.match(r"\s*\\multicolumn\{(\d+)\}", c)) else 1 for c in cells)
            assert width == ncols, (tex.name, row)
            # braces balance and no unescaped specials outside math
            assert row.count("{") == row.count("}")
            assert not re.search(r"(?<!\\)[_%#]", re.sub(r"\$[^$]*\$", "", row)), row
    digits = (results / "tables" / "table1_digits_fd_digits.tex").read_text()
    assert r"fd\_digits-2k" in digits and r"2.00 $\pm$ 1.00" in digits


def test_export_crops_the_first_sample_and_skips_unfinished(tmp_path):
    spec = make_spec("digits_shortcut", "shortcut", "digits", grid_size=10)
    record = make_record(tmp_path / "runs", spec, {128: 1.0})
    for n in (128, 4, 1):
        cell = np.asarray(first_sample(record["samples"][str(n)]["grid"], spec))
        expected = np.round((np.clip(first_image(n, 8, 1), -1, 1) + 1) * 127.5).astype(np.uint8)[..., 0]
        np.testing.assert_array_equal(cell, expected)
    path = export_run(record, tmp_path / "results")
    assert path == tmp_path / "results" / "runs" / "digits_shortcut" / f"{record['spec_hash'][:12]}.json"
    (loaded,) = load_exports(tmp_path / "results")
    assert loaded["samples"]["4"]["first_sample"] == "steps_4.png"
    assert (Path(loaded["_assets_dir"]) / "steps_4.png").exists()
    assert loaded["evaluation"][0]["feature_net_sha256"] == "ab" * 32  # provenance travels with the value
    assert "checkpoints" not in str(sorted((tmp_path / "results").rglob("*")))
    assert export_run(dict(record, status="failed"), tmp_path / "results") is None
    assert export_run(dict(record, smoke=True), tmp_path / "results") is None


def test_paper_numbers_are_data_with_sources():
    paper = load_paper(REPO / "results")
    assert set(paper.columns) >= {"dataset", "method", "arch", "metric", "num_samples", "num_steps", "value", "source"}
    known = paper[paper["value"].notna()]
    got = {(r.dataset, r.method, r.arch, int(r.num_steps)): (r.value, r.unsupported) for r in known.itertuples()}
    # shared/paper/table1-celebahq.txt: (value, in parentheses) at 128 / 4 / 1 steps
    celeba = {"progressive_distillation": [(302.9, True), (251.3, True), (14.8, False)],
              "consistency_distillation": [(59.5, False), (39.6, False), (38.2, False)],
              "reflow": [(16.1, False), (18.4, False), (23.2, False)],
              "diffusion": [(23.0, False), (123.4, True), (132.2, True)],
              "flow_matching": [(7.3, False), (63.3, True), (280.5, True)],
              "consistency_training": [(53.7, False), (19.0, False), (33.2, False)],
              "live_reflow": [(6.3, False), (27.2, False), (43.3, False)],
              "shortcut": [(6.9, False), (13.8, False), (20.5, False)]}
    expected = {("celebahq256", m, "DiT-B/2", n): cell for m, cells in celeba.items()
                for n, cell in zip((128, 4, 1), cells)}
    for arch, cells in (("DiT-B/2", (15.5, 28.3, 40.3)), ("DiT-XL/2", (3.8, 7.8, 10.6))):
        expected.update({("imagenet256", "shortcut", arch, n): (v, False) for n, v in zip((128, 4, 1), cells)})
    # the paper's ImageNet-256 column as secondary summaries of it give it (shared/paper/followups.md)
    secondary = {("flow_matching", 128): (17.3, False), ("flow_matching", 4): (108.2, True),
                 ("flow_matching", 1): (324.8, True), ("consistency_training", 128): (42.8, False),
                 ("consistency_training", 4): (43.0, False), ("consistency_training", 1): (69.7, False),
                 ("diffusion", 128): (39.7, False), ("diffusion", 4): (464.5, False), ("diffusion", 1): (467.2, False),
                 ("progressive_distillation", 1): (35.6, False), ("live_reflow", 1): (58.1, False)}
    expected.update({("imagenet256", m, "DiT-B/2", n): cell for (m, n), cell in secondary.items()})
    assert got == expected
    assert known.loc[known["dataset"] == "celebahq256", "source"].str.startswith(
        "Frans et al. 2025, Table 1 (CelebA-HQ), as reprinted in").all()
    imagenet = known[known["dataset"] == "imagenet256"]
    assert {(r.method, int(r.num_steps)) for r in imagenet.itertuples() if r.secondary} == set(secondary)
    assert imagenet.loc[~imagenet["secondary"], "source"].str.contains("README").all()
    assert imagenet.loc[imagenet["secondary"], "source"].str.startswith("secondary: ").all()
    assert not known.loc[known["dataset"] == "celebahq256", "secondary"].any()
    empty = paper[paper["value"].isna()]
    assert set(empty["dataset"]) == {"imagenet256"} and len(empty) == 10
    assert empty["note"].str.contains("not given by the secondary summaries").all()
    assert (paper["value"].dropna() != 0).all()


def test_a_step_count_at_two_scales_gets_a_second_column(tmp_path):
    """ImageNet's shortcut protocol (128 steps at w = 1.5, then at w = 1): the first scale fills the 128-step
    column beside the other methods', the second gets its own column; the notes give each column's w."""
    root = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper", root / "paper")
    work = tmp_path / "runs"
    specs = {}
    for name, method in (("imagenet_ditb_shortcut", "shortcut"), ("imagenet_ditb_flow", "flow_matching")):
        specs[method] = make_spec(name, method, "celebahq256", size="B", metric="fid", num_samples=50000)
        specs[method]["data"].update(dataset="imagenet256", num_classes=1000)
    guided = {"train_step": 100, "num_steps": 128, "setting": "128_steps_w1.5", "metric": "fid", "value": 15.0,
              "num_samples": 50000, "cfg_scale": 1.5, "params": "ema"}
    make_record(work, specs["shortcut"], {128: 20.0, 4: 30.0, 1: 40.0}, extra_evals=[guided])
    make_record(work, specs["flow_matching"], {128: 18.0, 4: 90.0, 1: 200.0})
    export_tree(work, root)
    assert make_tables.main(["--results-dir", str(root)]) == 0
    md = (root / "tables" / "table1_imagenet256_fid.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "FID-50k 128-step (ours) | FID-50k 128-step, w = 1 (ours) | FID-50k 4-step (ours)" in header
    assert "| Shortcut Models | DiT-B/2 | 15.00 | 20.00 | 30.00 | 40.00 | 15.5 | 28.3 | 40.3 |" in md
    assert "| Flow Matching | DiT-B/2 | 18.00 | - | 90.00 | 200.00 |" in md
    assert "Guidance scale w of our cells: 128-step: 1 / 1.5; 128-step, w = 1: 1; 4-step: 1; 1-step: 1" in md
    values = pd.read_csv(root / "tables" / "table1_imagenet256_fid_values.csv", keep_default_na=False)
    second = values[(values["row"] == "Shortcut Models") & (values["arch"] == "DiT-B/2")
                    & (values["scale_column"] == "w = 1")]
    assert second["num_steps"].tolist() == [128] and second["ours_mean"].astype(float).tolist() == [20.0]
    colspec, tex_rows = _tabular((root / "tables" / "table1_imagenet256_fid.tex").read_text())
    ncols = len(re.sub(r"[^lrc]", "", colspec))
    for row in tex_rows:
        cells = re.split(r"(?<!\\)&", row)
        assert sum(int(m.group(1)) if (m := re.match(r"\s*\\multicolumn\{(\d+)\}", c)) else 1 for c in cells) == ncols


def test_a_budget_study_is_drawn_over_the_table_and_ranked_at_both_budgets(tmp_path):
    from tracking_fixtures import make_record, make_spec

    root, longer = tmp_path / "results", tmp_path / "budget"
    shutil.copytree(REPO / "results" / "paper", root / "paper")
    table = {"shortcut": (10.0, 5.0), "meanflow": (7.0, 4.5)}  # 1-step values at the table's budget, 4-step
    at_4x = {"shortcut": (5.0, 4.0), "meanflow": (6.0, 3.9)}  # the longer runs reverse the 1-step order only
    for method, (one, four) in table.items():
        for seed in (0, 1):
            spec = make_spec(f"digits_{method}", method, "digits", seed=seed)
            make_record(tmp_path / "runs", spec, {1: one + seed * 0.1, 4: four}, grids=False, compute=1e12,
                        curve={1: [(5e11, one + 5), (1e12, one)]})
        spec = make_spec(f"digits_{method}", method, "digits")
        spec["train"]["steps"] = 400
        make_record(tmp_path / "long", spec, {1: at_4x[method][0], 4: at_4x[method][1]}, grids=False, compute=4e12,
                    curve={1: [(1e12, one), (4e12, at_4x[method][0])]})
    export_tree(tmp_path / "runs", root)
    export_tree(tmp_path / "long", longer)
    assert make_tables.main(["--results-dir", str(root), "--budget", str(longer)]) == 0
    assert (root / "figures" / "budget_digits_fd_digits.png").stat().st_size > 0
    md = (root / "tables" / "budget_digits_fd_digits.md").read_text()
    assert "the budget study (400 training steps)" in md
    assert "| Shortcut Models | 10.05 | 2 | 5.00 | 1 |" in md and "| MeanFlow | 7.05 | 1 | 6.00 | 2 |" in md
    assert "1-step ranking of these 2 methods at 4x the budget is not the same as" in md
    assert "4-step ranking of these 2 methods at 4x the budget is the same as" in md
