"""Property-based fuzzing of everything a user types or writes: spec files (random bytes, mutated and
random YAML), --set overrides, spec names, through `run_experiment ... --print` (nothing trains).
Every input is either accepted (exit 0) or rejected with exactly one `error:` line and exit 2; never
a traceback. Non-finite numbers are rejected wherever a float is accepted."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.run_experiment import main
from shortcut.spec import SpecError, flatten
from shortcut.spec_files import EXPERIMENTS_DIR, list_specs, load_spec

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)  # no example database written into the checkout
DIGITS = (EXPERIMENTS_DIR / "digits_shortcut.yaml").read_text()
KEYS = sorted(flatten(load_spec("digits_shortcut").model_dump(mode="json")))


def _cli(*argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `run_experiment ARGV --print`, in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([*argv, "--print"])
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def _assert_accepted_or_one_line(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)


def _spec_file(tmp_path_factory, content: bytes) -> str:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "fuzzed.yaml"
    path.write_bytes(content)
    return str(path)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                         st.text(max_size=20))
yaml_trees = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS + ["base", "model", "data"]),
                                                           st.text(max_size=10)), inner, max_size=4)), max_leaves=12)


@FUZZ
@given(content=st.binary(max_size=400))
def test_random_bytes_as_a_spec_file(tmp_path_factory, content):
    _assert_accepted_or_one_line(*_cli(_spec_file(tmp_path_factory, content)))


@FUZZ
@given(cut=st.integers(0, len(DIGITS)), length=st.integers(0, 40), insert=st.text(max_size=30))
def test_a_mutated_spec_file(tmp_path_factory, cut, length, insert):
    content = f"base: {EXPERIMENTS_DIR / 'digits_shortcut.yaml'}\n" + DIGITS[:cut] + insert + DIGITS[cut + length:]
    _assert_accepted_or_one_line(*_cli(_spec_file(tmp_path_factory, content.encode())))


@FUZZ
@given(tree=yaml_trees)
def test_random_yaml_structures_as_a_spec_file(tmp_path_factory, tree):
    body = {"base": str(EXPERIMENTS_DIR / "digits_shortcut.yaml")}
    if isinstance(tree, dict):
        body.update(tree)
    else:
        body["extra"] = tree
    content = yaml.safe_dump(body, allow_unicode=True)
    _assert_accepted_or_one_line(*_cli(_spec_file(tmp_path_factory, content.encode())))


@FUZZ
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=20)),
       value=st.one_of(st.text(max_size=30), yaml_trees.map(lambda t: yaml.safe_dump(t, default_flow_style=True)
                                                              .strip().removesuffix("...").strip())),
       separator=st.sampled_from(["=", "=", ":", ""]))
def test_random_overrides(key, value, separator):
    _assert_accepted_or_one_line(*_cli("digits_shortcut", "--set", f"{key}{separator}{value}"))


@settings(FUZZ, max_examples=30)
@given(name=st.one_of(st.text(max_size=40), st.sampled_from(list_specs()).map(lambda n: n + "x"),
                      st.text(max_size=300).map(lambda t: t + ".yaml")))
def test_random_spec_names(name):
    _assert_accepted_or_one_line(*_cli(name))


@FUZZ
@given(dataset=st.text(min_size=1, max_size=30))
def test_unknown_dataset_names_are_one_line_with_the_nearest(dataset):
    code, err = _cli("digits_shortcut", "--set", f"data.dataset={dataset}")
    _assert_accepted_or_one_line(code, err)
    if code:
        assert len(err) < 1000, err  # never the whole TFDS catalogue


def test_binary_file_unknown_dataset_and_inf_scale_are_one_line(tmp_path):
    """The three inputs of issue 14 that reached a traceback or were accepted."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    code, err = _cli(str(binary))
    assert code == 2 and err.count("\n") == 1 and "not a YAML text file" in err, err
    code, err = _cli("digits_shortcut", "--set", "data.dataset=mnsit")
    assert code == 2 and err.count("\n") == 1 and "nearest: mnist" in err, err
    code, err = _cli("digits_shortcut", "--set", "eval.cfg_scale=inf")
    assert code == 2 and err.count("\n") == 1 and "eval.cfg_scale" in err, err


NON_FINITE = ["inf", "-inf", "nan", ".inf", "-.inf", ".nan", "1e999"]


def _float_keys() -> list[tuple[str, str]]:
    """(spec, key) for every float setting any experiment spec has (its own or a default), each key once."""
    out: dict[str, str] = {}
    for name in list_specs():
        for k, v in flatten(load_spec(name).model_dump(mode="json")).items():
            if isinstance(v, float) and not k.startswith("sweep."):
                out.setdefault(k, name)
    return [(name, k) for k, name in sorted(out.items())]


@pytest.mark.parametrize("name, key", _float_keys())
def test_non_finite_numbers_are_rejected_wherever_a_float_is_accepted(name, key):
    for value in NON_FINITE:
        with pytest.raises(SpecError, match=key.split(".")[0]):
            load_spec(name, [f"{key}={value}"])


def test_non_finite_sweep_bounds_are_rejected():
    with pytest.raises(SpecError, match="finite"):
        load_spec("sweep_digits_shortcut", ["sweep.space={optimizer.lr: {loguniform: [1e-4, .inf]}}"])
    with pytest.raises(SpecError, match="finite"):
        load_spec("sweep_digits_shortcut", ["sweep.space={optimizer.lr: {choice: [.nan, 1e-3]}}"])
