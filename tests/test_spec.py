"""Experiment specs: loading, inheritance, overrides, every rejection path, the hash, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.run_experiment import main
from shortcut.spec import SpecError
from shortcut.spec_files import EXPERIMENTS_DIR, list_specs, load_spec

PAPER_SPECS = ["celeba_ditb_shortcut", "celeba_ditb_flow", "imagenet_ditb_shortcut", "imagenet_ditb_flow",
               "imagenet_ditxl_shortcut"]


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def root(tmp_path):
    write(tmp_path, "bases/common.yaml", """
data: {dataset: digits, channels: 1, num_classes: 10, image_size: 8}
model: {size: tiny}
train: {steps: 10, batch_size: 16}
method: {name: shortcut}
""")
    write(tmp_path, "child.yaml", "base: bases/common.yaml\nmodel: {depth: 5}\ntrain: {steps: 20}\n")
    return tmp_path


def load(root, name, *overrides):
    return load_spec(name, list(overrides), root=root)


def error(root, name, *overrides) -> str:
    with pytest.raises(SpecError) as e:
        load(root, name, *overrides)
    return str(e.value)


def test_shipped_specs_all_load():
    names = list_specs()
    assert {"digits_shortcut", "digits_flow", *PAPER_SPECS} <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.name == name


@pytest.mark.parametrize("name", ["celeba_ditb_shortcut", "imagenet_ditb_shortcut"])
def test_paper_specs_follow_table3(name):
    """Table 3 where the official code agrees; its targets, network and evaluation protocol where not."""
    s = load_spec(name)
    assert (s.model.hidden_size, s.model.depth, s.model.num_heads, s.model.patch_size, s.model.mlp_ratio) == \
        (768, 12, 12, 2, 4.0)
    assert s.model.architecture == "official"
    assert (s.optimizer.lr, s.optimizer.weight_decay, s.optimizer.ema_decay) == (1e-4, 0.1, 0.999)
    assert s.method.denoise_timesteps == 128 and s.method.bootstrap_ema
    assert (s.method.bootstrap_fraction, s.method.bootstrap_levels) == (0.125, "official")
    paper = load_spec(name, ["method.bootstrap_fraction=0.25", "method.bootstrap_levels=even"]).method
    assert (paper.bootstrap_fraction, paper.bootstrap_levels) == (0.25, "even")
    assert s.data.latent.scale == 0.18215 and s.input_shape == (32, 32, 4)
    assert s.eval.num_samples == 50_000 and s.eval.steps == (128, 4, 1) and s.eval.params == "ema"
    if name.startswith("celeba"):
        assert (s.train.batch_size, s.train.steps, s.data.num_classes) == (64, 400_000, 0)
        assert [(e.num_steps, e.cfg_scale) for e in s.eval.settings()] == [(128, 1.0), (4, 1.0), (1, 1.0)]
    else:
        assert (s.train.batch_size, s.train.steps, s.data.num_classes) == (256, 800_000, 1000)
        assert s.method.bootstrap_cfg and s.method.cfg_scale == 1.5 and s.method.class_dropout == 0.1
        # guidance distilled into the bootstrap levels: w = 1 at 4 and 1 steps; 128 steps at both scales
        assert [(e.num_steps, e.cfg_scale, e.key) for e in s.eval.settings()] == [
            (128, 1.5, "128_steps_w1.5"), (128, 1.0, "128_steps_w1"), (4, 1.0, "4_steps"), (1, 1.0, "1_steps")]


def test_eval_cfg_scale_number_or_mapping():
    s = load_spec("digits_shortcut", ["eval.cfg_scale=2"])
    assert [(e.num_steps, e.cfg_scale, e.key) for e in s.eval.settings()] == [
        (128, 2.0, "128_steps"), (4, 2.0, "4_steps"), (1, 2.0, "1_steps")]
    s = load_spec("digits_shortcut", ["eval.cfg_scale={128: [1, 3], 4: 1.5, 1: 1}", "eval.params=online"])
    assert [(e.num_steps, e.cfg_scale) for e in s.eval.settings()] == [(128, 1.0), (128, 3.0), (4, 1.5), (1, 1.0)]
    assert [e.samples_key for e in s.eval.settings()] == ["128_w1", "128_w3", "4", "1"] and s.eval.params == "online"
    for override, key, expected in [
            ("eval.cfg_scale={128: 1, 4: 1}", "eval.cfg_scale", "no scale for 1 steps"),
            ("eval.cfg_scale={128: 1, 4: 1, 1: 1, 32: 2}", "eval.cfg_scale.32", "32 steps is not in eval.steps"),
            ("eval.cfg_scale={128: [1, 1], 4: 1, 1: 1}", "eval.cfg_scale.128", "distinct numbers"),
            ("eval.cfg_scale=[1, 2]", "eval.cfg_scale", "a number or a mapping"),
            ("eval.params=best", "eval.params", "'ema' or 'online'")]:
        with pytest.raises(SpecError) as e:
            load_spec("digits_shortcut", [override])
        assert e.value.key == key and expected in e.value.message, str(e.value)


def test_ditxl_spec():
    s = load_spec("imagenet_ditxl_shortcut")
    assert (s.model.hidden_size, s.model.depth, s.model.num_heads) == (1152, 28, 16)


def test_inheritance_child_wins_and_base_fills(root):
    s = load(root, "child")
    assert s.model.depth == 5 and s.model.hidden_size == 64  # depth from child, width from size "tiny"
    assert s.train.steps == 20 and s.train.batch_size == 16
    assert s.data.dataset == "digits"


def test_multiple_bases_merge_in_order(root):
    write(root, "bases/other.yaml", "train: {steps: 99, batch_size: 32}\n")
    write(root, "two.yaml", "base: [bases/common.yaml, bases/other.yaml]\ntrain: {steps: 7}\n")
    s = load(root, "two")
    assert (s.train.steps, s.train.batch_size) == (7, 32)


def test_overrides_are_typed(root):
    s = load(root, "child", "model.depth=2", "optimizer.lr=3e-4", "eval.steps=[1, 2]", "data.flip=true")
    assert s.model.depth == 2 and s.optimizer.lr == pytest.approx(3e-4) and s.eval.steps == (1, 2)
    assert s.data.flip is True


def test_bad_yaml_names_file_and_line(root):
    write(root, "broken.yaml", "model: {size: tiny\ntrain: [\n")
    msg = error(root, "broken")
    assert "broken.yaml" in msg and "invalid YAML" in msg and "line" in msg


@pytest.mark.parametrize("override, key, expected", [
    ("model.depth=four", "model.depth", "valid integer"),
    ("model.dept=4", "model.dept", "unknown key"),
    ("eval.steps=[128, 3]", "eval.steps", "power of two <= M=128"),
    ("eval.steps=[256]", "eval.steps", "power of two <= M=128"),
    ("optimizer.lr=-1", "optimizer.lr", "greater than 0"),
    ("method.bootstrap_fraction=1.5", "method.bootstrap_fraction", "less than 1"),
    ("method.name=nope", "method.name", "expected one of"),
    ("method.bootstrapp=1", "method.bootstrapp", "unknown key"),
    ("method.denoise_timesteps=100", "method.denoise_timesteps", "power of two"),
    ("model.num_heads=5", "model.num_heads", "must divide hidden_size"),
    ("model.patch_size=3", "model.patch_size", "must divide"),
    ("model.dtype=float16", "model.dtype", "float32"),
])
def test_rejections_name_source_key_and_expectation(root, override, key, expected):
    msg = error(root, "child", override)
    assert msg.startswith(f"--set {override}: {key}: "), msg
    assert expected in msg
    assert "\n" not in msg


def test_unknown_key_in_file_names_that_file(root):
    write(root, "typo.yaml", "base: bases/common.yaml\ntrian: {steps: 3}\n")
    assert error(root, "typo").endswith("typo.yaml: trian: unknown key")


def test_error_in_base_names_the_base(root):
    write(root, "bases/bad.yaml", "model: {size: huge}\n")
    write(root, "uses_bad.yaml", "base: [bases/common.yaml, bases/bad.yaml]\n")
    msg = error(root, "uses_bad")
    assert "bases/bad.yaml: model.size:" in msg and "'tiny'" in msg


def test_missing_required_key(root):
    write(root, "nodata.yaml", "model: {size: tiny}\ntrain: {steps: 1, batch_size: 4}\nmethod: {name: shortcut}\n")
    assert "data: required key is missing" in error(root, "nodata")


def test_unknown_spec_and_missing_base_and_cycle(root):
    assert "no such spec" in error(root, "does_not_exist") and "child" in error(root, "does_not_exist")
    write(root, "orphan.yaml", "base: bases/missing.yaml\n")
    assert "does not exist" in error(root, "orphan")
    write(root, "a.yaml", "base: b.yaml\n")
    write(root, "b.yaml", "base: a.yaml\n")
    assert "cycle" in error(root, "a")


def test_malformed_override(root):
    assert "expected KEY=VALUE" in error(root, "child", "model.depth")


def test_hash_is_stable_and_tracks_training_content(root):
    h = load(root, "child").hash()
    assert h == load(root, "child").hash() and len(h) == 64
    # key order and the way a value was written do not matter
    write(root, "reordered.yaml", "train: {steps: 20}\nmodel: {depth: 5}\nbase: bases/common.yaml\n")
    assert load(root, "reordered").hash() == h
    assert load(root, "child", "model.depth=5").hash() == h
    # training content changes it; evaluation, output and resources do not
    assert load(root, "child", "model.depth=4").hash() != h
    assert load(root, "child", "method.bootstrap_fraction=0.5").hash() != h
    assert load(root, "child", "seed=1").hash() != h
    assert load(root, "child", "eval.num_samples=7", "output.workdir=/x", "resources.gpus=2").hash() == h


def test_hash_pinned_for_a_shipped_spec():
    """Changing what a shipped spec trains (or the hash recipe) must be a deliberate act: the literal hashes of
    the committed records and plan reports (results/runs/digits_shortcut/d9ba53a9e1a0.json,
    results/plans/celeba_ditb_shortcut_*.json)."""
    assert load_spec("digits_shortcut").hash() == "d9ba53a9e1a01ef514614264197533da278dd93e7d4ac6ab5a1711a1d3c2f021"
    assert load_spec("celeba_ditb_shortcut").hash() == \
        "d084083d59486afccfef38ec797d985690e1224950adc0563c83c824fd7c0cd3"
    assert load_spec(str(EXPERIMENTS_DIR / "digits_shortcut.yaml")).hash() == load_spec("digits_shortcut").hash()


def test_cli_list_print_and_errors(capsys):
    assert main(["--list"]) == 0
    assert "digits_shortcut" in capsys.readouterr().out
    assert main(["digits_shortcut", "--print", "--set", "model.depth=2"]) == 0
    out = capsys.readouterr().out
    assert "depth: 2" in out and "hash" in out
    assert main(["digits_shortcut", "--set", "model.depth=four"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: --set model.depth=four: model.depth: input should be a valid integer, unable to "
                           "parse string as an integer, got 'four'")
    assert main(["no_such_spec"]) == 2


def test_console_script_reports_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "digits_flow", "--set",
                           "eval.steps=[3]"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "eval.steps: each step count must be a power of two" in proc.stderr


def test_every_paper_spec_trains_on_32x32x4_latents_with_patch_2():
    paper = [n for n in list_specs() if n.startswith(("celeba_", "imagenet_"))]
    assert len(paper) == 27
    for name in paper:
        s = load_spec(name)
        assert s.data.latent.autoencoder == "sd-vae-ft-mse" and s.data.latent.scale == 0.18215, name
        assert s.input_shape == (32, 32, 4) and s.pixel_shape == (256, 256, 3) and s.model.patch_size == 2, name


def test_every_committed_record_keeps_its_spec_hash():
    """The spec of every results record committed under results/ still hashes to the spec_hash it was recorded
    with (the loader resolving its teacher): a change to the schema or the hashing that would move a run
    directory, and so lose every finished run, fails here."""
    import json

    from shortcut.spec_files import validate

    records = sorted((EXPERIMENTS_DIR.parent / "results").glob("*/*/*.json"))
    records = [p for p in records if "spec_hash" in (r := json.loads(p.read_text())) and "spec" in r]
    assert len(records) >= 2
    for path in records:
        record = json.loads(path.read_text())
        assert validate(record["spec"], {}, default_source=str(path)).hash() == record["spec_hash"], path
