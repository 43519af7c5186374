"""results/paper/published.csv: the later methods' published numbers beside the digits tables (docs/published.md).

Cheap checks of the file's shape; the numbers themselves are checked against their sources by hand (the `source`
and `note` columns say where, and a note starting 'secondary:' marks a number no primary source confirmed)."""

import math
from pathlib import Path

import pandas as pd

from orchestration.reporting.results import load_paper

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "paper" / "published.csv"
COLUMNS = ["table", "experiment", "method", "source", "dataset", "model", "budget", "nfe", "metric", "value", "note"]


def _published() -> pd.DataFrame:
    return pd.read_csv(PUBLISHED, comment="#")


def test_published_has_exactly_the_columns():
    assert list(_published().columns) == COLUMNS


def test_published_values_are_positive_finite_fids():
    df = _published()
    assert len(df) > 0
    assert pd.api.types.is_numeric_dtype(df["value"])
    assert all(math.isfinite(v) and v > 0 for v in df["value"])
    assert set(df["metric"]) == {"fid"}


def test_published_nfe_are_integers_at_least_one():
    df = _published()
    assert pd.api.types.is_integer_dtype(df["nfe"])
    assert (df["nfe"] >= 1).all()


def test_published_every_row_has_a_source():
    df = _published()
    for column in ("source", "dataset", "model", "budget", "method"):
        assert df[column].notna().all() and (df[column].str.strip() != "").all(), column


def test_published_experiments_and_tables_exist():
    df = _published()
    experiments = REPO / "experiments"
    for name in set(df["experiment"]):
        assert (experiments / f"{name}.yaml").exists(), name
    for name in set(df["table"]):
        assert (experiments / f"{name}.yaml").exists(), name


def test_published_is_not_read_as_table1_numbers():
    # load_paper reads the Table 1 schema only; published.csv beside it must not add rows to it
    paper = load_paper(REPO / "results")
    assert paper["arch"].notna().all() and paper["num_steps"].notna().all()
