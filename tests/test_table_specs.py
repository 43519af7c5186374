"""make_tables per table spec (orchestration/make_tables.py select, reporting/tables.py build_spec_tables):
each table spec's runs by (experiment, spec hash), its rows in the spec's order under their labels, its
`comparisons:` checked by the findings' code path, published numbers beside it. Synthetic records carry the
spec hashes the real table specs resolve to; their values, and the verdicts they must give, are set by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from orchestration import make_tables
from orchestration.execution.graph import load_table, runs_of
from orchestration.reporting import findings
from orchestration.reporting.results import export_tree, load_published
from shortcut.spec import SpecError
from tracking_fixtures import make_record, make_spec

REPO = Path(__file__).resolve().parents[1]
ABLATION = "ablation_shortcut_digits"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_comparison_naming_no_experiment_of_the_table_is_one_clear_line(tmp_path):
    bad = _write(tmp_path / "bad_table.yaml", "experiments: [digits_shortcut, digits_flow]\ncomparisons:\n"
                 "  - {better: digits_shortcut, than: digits_meanflow, steps: [1]}\n")
    with pytest.raises(SpecError) as e:
        load_table(str(bad))
    message = str(e.value)
    assert "\n" not in message and str(bad) in message and "comparisons.0.than" in message
    assert "'digits_meanflow' is not an experiment of this table" in message
    labels = _write(tmp_path / "labels_table.yaml", "experiments: [digits_flow]\nlabels: {digits_shortcut: x}\n")
    with pytest.raises(SpecError, match="labels.digits_shortcut: 'digits_shortcut' is not an experiment"):
        load_table(str(labels))
    steps = _write(tmp_path / "steps_table.yaml", "experiments: [digits_flow, digits_shortcut]\ncomparisons:\n"
                   "  - {better: digits_shortcut, than: digits_flow, steps: []}\n")
    with pytest.raises(SpecError, match="comparisons.0.steps"):
        load_table(str(steps))


def test_the_committed_table_specs_declare_their_comparisons():
    ablation, beyond = load_table(ABLATION), load_table("table_beyond_digits")
    chain = {(c.better, c.than): c.steps for c in ablation.comparisons}
    assert chain == {("digits_shortcut_wavelet", "digits_shortcut"): (1, 4),
                     ("digits_shortcut_wavelet_ot", "digits_shortcut_wavelet"): (1, 4),
                     ("digits_shortcut_wavelet_ot_within_class", "digits_shortcut_wavelet"): (1, 4),
                     ("digits_shortcut_wavelet_ot_twin_ema", "digits_shortcut_wavelet_ot"): (1, 4),
                     ("digits_shortcut_logit_normal", "digits_shortcut"): (1, 4),
                     ("digits_shortcut_logit_normal_adaptive", "digits_shortcut_logit_normal"): (1, 4),
                     ("digits_shortcut_intrinsic_guidance", "digits_shortcut"): (1, 4),
                     ("digits_shortcut_interval_guidance", "digits_shortcut_intrinsic_guidance"): (1, 4)}
    claims = {(c.better, c.than): c.steps for c in beyond.comparisons}
    assert claims == {**{("digits_shortcut", m): (1, 4) for m in (
        "digits_meanflow", "digits_improved_meanflow", "digits_consistency_training_continuous",
        "digits_consistency_distillation_continuous")}, ("digits_improved_meanflow", "digits_meanflow"): (1,)}


def test_labels_and_comparisons_change_no_spec_hash(tmp_path):
    bare = {k: v for k, v in json.loads(json.dumps(load_table(ABLATION).model_dump())).items()
            if k not in ("labels", "comparisons", "name")}
    import yaml

    plain = _write(tmp_path / "plain_table.yaml", yaml.safe_dump(bare))
    assert set(runs_of(load_table(str(plain)))) == set(runs_of(load_table(ABLATION)))


def _real_hashes(table: str) -> dict[tuple[str, int], str]:
    return {(name, spec.seed): h for (name, h), spec in runs_of(load_table(table)).items()}


def _record(work: Path, name: str, seed: int, lr: float, values: dict, spec_hash: str | None) -> None:
    """A finished synthetic run of experiment `name`, carrying `spec_hash` (a real table's) where given."""
    rec = make_record(work, make_spec(name, "shortcut", "digits", seed=seed, lr=lr), values, grids=False,
                      compute=1e12)
    if spec_hash is not None:
        path = Path(rec["run_dir"]) / "run.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "spec_hash": spec_hash}))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Results with table1_digits' shortcut runs (also the ablation's first row), a wavelet row clearly better
    at 1 and 4 steps, an OT row identical to the wavelet row, and a loose wavelet run of no table's."""
    tmp = tmp_path_factory.mktemp("table_specs")
    root, work = tmp / "results", tmp / "runs"
    shutil.copytree(REPO / "results" / "paper", root / "paper")
    (root / "paper" / "published.csv").unlink(missing_ok=True)
    real = _real_hashes(ABLATION)
    official = {0: {128: 3.0, 4: 8.0, 1: 20.0}, 1: {128: 3.2, 4: 8.4, 1: 21.0}, 2: {128: 3.4, 4: 8.2, 1: 19.0}}
    wavelet = {0: {128: 3.0, 4: 5.0, 1: 10.0}, 1: {128: 3.1, 4: 5.2, 1: 11.5}, 2: {128: 3.3, 4: 4.9, 1: 8.5}}
    for seed in (0, 1, 2):
        _record(work, "digits_shortcut", seed, 1e-3, official[seed], real[("digits_shortcut", seed)])
        _record(work, "digits_shortcut_wavelet", seed, 2e-3, wavelet[seed], real[("digits_shortcut_wavelet", seed)])
        _record(work, "digits_shortcut_wavelet_ot", seed, 3e-3, wavelet[seed],
                real[("digits_shortcut_wavelet_ot", seed)])
    _record(work, "digits_shortcut_wavelet", 7, 4e-3, {128: 77.7, 4: 77.7, 1: 77.7}, None)  # of no table
    assert len(export_tree(work, root)) == 10
    return root


def test_each_table_shows_its_own_runs_in_its_order(results, capsys):
    assert make_tables.main(["--results-dir", str(results)]) == 0
    assert "left out digits_shortcut_wavelet" in capsys.readouterr().err  # the loose run: in no table
    tables = results / "tables"
    table1 = (tables / "table1_digits_fd_digits.md").read_text()
    rows1 = [line for line in table1.splitlines() if line.startswith("| ") and not line.startswith(("| Method",
                                                                                                    "| ---"))]
    assert len(rows1) == 1 and rows1[0].startswith("| Shortcut Models (3 seeds) |")  # no ablation row leaks
    assert "77.70" not in table1 and "wavelet loss" not in table1  # nor the loose run's values
    values1 = pd.read_csv(tables / "table1_digits_fd_digits_values.csv")
    assert set(values1["ours_seeds"]) == {"0,1,2"}

    ablation = pd.read_csv(tables / f"{ABLATION}_fd_digits.csv")
    assert list(ablation["Method"]) == [
        "Shortcut (official recipe) (3 seeds)", "+ wavelet loss (3 seeds)", "+ wavelet loss + minibatch OT (3 seeds)",
        "+ wavelet loss + minibatch OT within class", "+ wavelet loss + minibatch OT + twin EMA", "logit-normal time sampling", "logit-normal + adaptive weighting",
        "intrinsic guidance (w as an input)", "intrinsic + interval guidance"]
    # mean +- std over the three seeds, by hand: official 1-step 20, 21, 19 -> 20.00 +- 1.00
    assert ablation.iloc[0]["fd_digits-2k 1-step (ours)"] == "20.00 ± 1.00"
    assert ablation.iloc[1]["fd_digits-2k 1-step (ours)"] == "10.00 ± 1.50"
    assert ablation.iloc[3]["fd_digits-2k 1-step (ours)"] == "-"
    assert ablation.iloc[4]["fd_digits-2k 1-step (ours)"] == "-"
    assert "Compute (x Shortcut (official recipe))" in ablation.columns
    assert (results / "figures" / f"steps_{ABLATION}_fd_digits.png").exists()
    index = (tables / "index.md").read_text()
    assert f"## digits: {ABLATION}, fd_digits-2k (ours)" in index and f"{ABLATION}'s comparisons" in index
    page = (results / "report.html").read_text()
    assert f'id="{ABLATION}_fd_digits"' in page and "+ wavelet loss + minibatch OT" in page


def test_comparisons_get_the_findings_verdicts(results):
    if not (results / "tables" / f"{ABLATION}_fd_digits_comparisons.csv").exists():
        assert make_tables.main(["--results-dir", str(results)]) == 0
    checks = pd.read_csv(results / "tables" / f"{ABLATION}_fd_digits_comparisons.csv")
    got = {(r.better, r.than, r.num_steps): r for r in checks.itertuples()}
    assert len(checks) == 16  # 8 comparisons x 2 step counts
    # wavelet vs official at 1 step: differences than - better per seed 10, 9.5, 10.5: mean 10, std 0.5,
    # t(2) interval 10 +- 4.302653 x 0.5 / sqrt(3) = [8.758, 11.242]: excludes zero with the claimed sign
    w1 = got[("digits_shortcut_wavelet", "digits_shortcut", 1)]
    assert w1.ours_mean_diff == pytest.approx(10.0) and w1.verdict == "holds"
    assert (w1.ci_low, w1.ci_high) == pytest.approx((10 - 1.24203, 10 + 1.24203), abs=1e-4)
    assert got[("digits_shortcut_wavelet", "digits_shortcut", 4)].verdict == "holds"  # 3.0, 3.2, 3.3
    # identical rows: every difference 0, the interval [0, 0] contains zero
    same = got[("digits_shortcut_wavelet_ot", "digits_shortcut_wavelet", 1)]
    assert same.ours_mean_diff == 0 and same.verdict == "not resolved"
    assert got[("digits_shortcut_wavelet_ot_twin_ema", "digits_shortcut_wavelet_ot", 4)].verdict.startswith(
        "no data: no run of + wavelet loss + minibatch OT + twin EMA")
    md = (results / "tables" / f"{ABLATION}_fd_digits_comparisons.md").read_text()
    assert "| 1 | + wavelet loss beats Shortcut (official recipe) at 1 step | +10.00 [+8.76, +11.24] |" in md


def test_the_same_machinery_as_the_paper_findings():
    """A comparison's verdict is the paper finding's for the same numbers (one code path)."""
    from orchestration.reporting.tables import Row

    def row(method, experiment, values):
        return Row(method, "DiT", experiment, {}, {}, per_seed={1: values}, experiment=experiment)

    rows = [row("shortcut", "a", {0: 5.0, 1: 6.0, 2: 5.5}), row("reflow", "b", {0: 7.0, 1: 7.5, 2: 8.0})]
    paper = findings.check([findings.PaperFinding("reflow", 1, 5.0, 6.0)], rows, str)[0]
    ours = findings.check([findings.TableComparison("a", "b", 1)], rows, str)[0]
    assert paper.diffs == ours.diffs and paper.interval == ours.interval and paper.verdict == ours.verdict == "holds"
    reversed_ = findings.check([findings.TableComparison("b", "a", 1)], rows, str)[0]
    assert reversed_.verdict == "reversed"


def test_published_numbers_beside_the_table_only_when_the_file_exists(results, tmp_path):
    out = tmp_path / "with"
    assert load_published(results) == []
    assert make_tables.main(["--results-dir", str(results), "--out", str(out)]) == 0
    assert "published (other scale)" not in (out / "tables" / f"{ABLATION}_fd_digits.md").read_text()
    csv = results / "paper" / "published.csv"
    csv.write_text("# a fixture\ntable,experiment,method,source,dataset,model,budget,nfe,metric,value,note\n"
                   f"{ABLATION},digits_shortcut_wavelet,iSM + wavelet,paper X table 3,imagenet256,SiT-XL/2,250k,1,fid,"
                   "8.12,secondary: seen in notes\n"
                   f"{ABLATION},digits_shortcut_wavelet,iSM + wavelet,paper X table 3,imagenet256,SiT-XL/2,250k,4,fid,"
                   "2.64,\n"
                   "table_beyond_digits,digits_meanflow,MeanFlow,paper Y,imagenet256,XL/2,240 epochs,1,fid,3.43,\n")
    try:
        lines = load_published(results)
        assert lines[0]["nfe"] == 1 and lines[0]["value"] == 8.12 and lines[1]["note"] is None
        assert make_tables.main(["--results-dir", str(results), "--out", str(out)]) == 0
    finally:
        csv.unlink()
    md = (out / "tables" / f"{ABLATION}_fd_digits.md").read_text()
    block = md[md.index(f"### {ABLATION}: published (other scale)"):]
    assert "| 4 NFE | 1 NFE |" in block and "MeanFlow" not in block  # only this table's lines
    assert "| + wavelet loss | iSM + wavelet † | 2.64 | 8.12 | fid | imagenet256 | SiT-XL/2 | 250k | paper X table 3 |" \
        in block
    table1 = (out / "tables" / "table1_digits_fd_digits.md").read_text()
    assert "published (other scale)" not in table1


def test_the_guided_table_retrains_nothing_new_and_evaluates_at_w_1_5_first():
    """guidance_shortcut_digits' runs are the same trainings as the ablation's (same spec hashes, other names, so
    their records never replace the ablation's or Table 1's), evaluated guided first and at w = 1 after."""
    from orchestration.execution.graph import runs_of

    guided = runs_of(load_table("guidance_shortcut_digits"))
    ablation = {key: name for name, key in runs_of(load_table(ABLATION))}
    assert len(guided) == 9
    for (name, key), spec in guided.items():
        assert ablation[key] == name.removesuffix("_guided")
        assert spec.eval.cfg_scale == {128: 1.5, 4: (1.5, 1.0), 1: (1.5, 1.0)}
