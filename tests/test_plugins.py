"""Adding a method is one module plus one spec: a throwaway package with a new objective, installed into a
temporary directory, is found through the `shortcut.methods` entry points and runs end to end with
`run_experiment`; its record and table row carry the plugin's own name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MODULE = '''
"""Flow matching with continuous uniform times: a method that lives outside this project."""

import jax
import jax.numpy as jnp

from shortcut.methods import MethodConfig
from shortcut.objective import Objective, Targets, drop_labels, euler_sample, interpolate


class UniformTimeConfig(MethodConfig):
    pass


class UniformTimeObjective(Objective):
    Config = UniformTimeConfig
    display_name = "Uniform-Time Flow"
    table_order = 95

    def targets(self, key, batch, ctx):
        x1, labels = batch["image"], batch["label"]
        k_t, k_noise, k_label = jax.random.split(key, 3)
        t = jax.random.uniform(k_t, (x1.shape[0],))
        x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
        d = jnp.full_like(t, 1.0 / self.config.denoise_timesteps)
        labels = drop_labels(k_label, labels, self.config.class_dropout, self.null_class)
        return Targets(interpolate(x0, x1, t), t, d, labels, x1 - x0, jnp.zeros(x1.shape[0], jnp.int32))

    def sample(self, apply_fn, params, noise, labels, num_steps, *, cfg_scale=1.0):
        return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=1.0 / self.config.denoise_timesteps,
                            cfg_scale=cfg_scale, null_class=self.null_class)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1"

[project.entry-points."{group}"]
{entry_point}
'''


def install(root: Path, module: str, text: str, group: str, entry_point: str) -> Path:
    """A one-module package with one entry point, installed into root/site (not into the project's environment)."""
    package = root / "src"
    package.mkdir()
    (package / f"{module}.py").write_text(textwrap.dedent(text))
    (package / "pyproject.toml").write_text(PYPROJECT.format(name=module.replace("_", "-"), group=group,
                                                             entry_point=entry_point))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(package)], check=True, capture_output=True)
    return site


SPEC = '''
description: A plugin method on the embedded digits.
base: bases/digits.yaml
method:
  name: uniform_time
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The package installed into its own directory (not into the project's environment)."""
    root = tmp_path_factory.mktemp("plugin")
    site = install(root, "uniform_time_method", MODULE, "shortcut.methods",
                   'uniform_time = "uniform_time_method:UniformTimeObjective"')
    experiments = root / "experiments"
    shutil.copytree(REPO / "experiments" / "bases", experiments / "bases")
    (experiments / "digits_uniform_time.yaml").write_text(SPEC)
    return site, experiments


def test_a_method_from_another_package_runs_end_to_end(plugin, tmp_path):
    site, experiments = plugin
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
           "SHORTCUT_EXPERIMENTS": str(experiments), "JAX_PLATFORMS": "cpu"}
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper", results / "paper")
    quick = ["model.size=null", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.steps=20", "train.log_every=10", "train.checkpoint_every=20", "train.batch_size=32",
             "eval.steps=[4,1]", "eval.num_samples=100", "eval.batch_size=100", "eval.grid_size=4",
             "eval.curve_every=10"]
    proc = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "digits_uniform_time",
                           "--in-process", "--no-tracking", "--workdir", str(tmp_path / "runs"),
                           "--results-dir", str(results), *sum([["--set", q] for q in quick], [])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = list((tmp_path / "runs" / "digits_uniform_time").glob("*/run.json"))
    run = json.loads(record.read_text())
    assert run["status"] == "finished" and run["spec"]["method"]["name"] == "uniform_time"
    assert {e["num_steps"] for e in run["evaluation"]} == {4, 1} and run["compute"]["total_flops"] > 0
    assert [p["train_step"] for p in run["curve"]] == [10, 10, 20, 20]
    proc = subprocess.run([sys.executable, "-m", "orchestration.make_tables", "--results-dir", str(results)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Uniform-Time Flow | DiT-h32-d1/2 |" in (results / "tables" / "table1_digits_fd_digits.md").read_text()


METRIC_MODULE = '''
"""The Frechet distance of raw pixels to the held-out digits: a metric that lives outside this project."""

import numpy as np

from shortcut.evaluation import ReferenceStats, RunningStats
from shortcut.evaluation.digits_classifier import load_digits_split
from shortcut.methods import KeyedValueError
from shortcut.evaluation.metric import Metric
from shortcut.metrics import MetricPlugin, Quantity


class PixelNet:
    name, sha256 = "pixels", "identity"
    score_names = ("is_pixels", "precision_pixels", "recall_pixels")

    def outputs(self, images):
        return np.asarray(images, np.float32).reshape(len(images), -1), None


class FdPixels(MetricPlugin):
    name = "fd_pixels"
    value = Quantity("fd_pixels: Frechet distance of raw pixels to the held-out digits", display="FD-pixels")
    scores = {"recall_pixels": Quantity("recall_pixels: improved recall on raw pixels", lower_is_better=False)}

    def check(self, spec):
        if spec.input_shape != (8, 8, 1):
            raise KeyedValueError("eval.metric", "fd_pixels needs 8x8x1 digits images")

    def load(self, spec):
        net = PixelNet()
        features = net.outputs(load_digits_split(spec.data.heldout_split)[0])[0]
        ref = ReferenceStats.from_running_stats(RunningStats(features.shape[1]).update(features),
                                                {"feature_net": net.name, "feature_net_sha256": net.sha256}, features)
        return Metric(self.name, net, ref, "pixels-of-heldout", provenance={"feature_net": net.name},
                      floor_pool=net.outputs(load_digits_split(spec.data.split)[0])[0], floor_source="train split")
'''

def test_a_metric_from_another_package_scores_a_digits_run(tmp_path):
    """A throwaway metric package, installed into its own directory, is found through the `shortcut.metrics`
    entry points: a spec may name it, a digits run records its value and scores, and the table takes the
    plugin's name, direction and description."""
    site = install(tmp_path, "pixel_metric", METRIC_MODULE, "shortcut.metrics", 'fd_pixels = "pixel_metric:FdPixels"')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "JAX_PLATFORMS": "cpu"}
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper", results / "paper")
    quick = ["eval.metric=fd_pixels", "model.size=null", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
             "train.steps=4", "train.log_every=2", "train.checkpoint_every=4", "train.batch_size=32",
             "eval.steps=[1]", "eval.num_samples=100", "eval.batch_size=100", "eval.grid_size=4", "eval.curve_every=null"]
    proc = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "digits_shortcut", "--in-process",
                           "--no-tracking", "--workdir", str(tmp_path / "runs"), "--results-dir", str(results),
                           *sum([["--set", q] for q in quick], [])], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = list((tmp_path / "runs" / "digits_shortcut").glob("*/run.json"))
    [entry] = json.loads(record.read_text())["evaluation"]
    assert entry["metric"] == "fd_pixels" and entry["value"] > 0 and entry["feature_net"] == "pixels"
    assert 0 <= entry["recall_pixels"] <= 1 and entry["noise_floor"]["value"] > 0
    proc = subprocess.run([sys.executable, "-m", "orchestration.make_tables", "--results-dir", str(results)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (results / "tables" / "table1_digits_fd_pixels.md").read_text()
    assert "FD-pixels-100" in table and "fd_pixels: Frechet distance of raw pixels to the held-out digits." in table
    # without the package, the spec that names it is refused in one line that names the metrics there are
    proc = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "digits_shortcut", "--in-process",
                           "--no-tracking", "--workdir", str(tmp_path / "runs"), "--set", "eval.metric=fd_pixels"],
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --set eval.metric=fd_pixels: eval.metric: unknown metric 'fd_pixels'; known: fd_digits, fid, none "
        "(entry-point group shortcut.metrics)"], proc.stderr
