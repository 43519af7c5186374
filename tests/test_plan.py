"""The memory estimator (shortcut/memory.py) and the planner (orchestration/plan.py), checked against arithmetic:
the state's bytes against parameters x bytes x copies, the compiled train step's FLOPs against a count by hand
of the DiT's layer shapes, and a run that cannot fit stopped with one line before it writes anything."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from shortcut import memory
from shortcut.sharding import MIN_SHARD_BYTES
from shortcut.spec_files import load_spec

REPO = Path(__file__).resolve().parents[1]

# A small latent DiT: 128x128 images -> 16x16x4 latents -> 64 tokens of width 128 (patch 2), float32.
SMALL = ["model.size=null", "model.hidden_size=128", "model.depth=2", "model.num_heads=4", "model.dtype=float32",
         "data.image_size=128", "train.batch_size=64", "eval.batch_size=64"]


def _independent_fsdp_bytes(tree, n: int) -> int:
    """Bytes per device of `tree` under fsdp on n devices, by the rule of shortcut/sharding.py, restated:
    arrays of at least MIN_SHARD_BYTES with a dimension n divides are split n ways, the rest replicated."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        split = nbytes >= MIN_SHARD_BYTES and any(d % n == 0 for d in leaf.shape)
        total += nbytes // n if split else nbytes
    return total


def test_state_bytes_are_parameters_times_four_copies():
    spec = load_spec("celeba_ditb_shortcut", SMALL)
    state = memory.abstract_state(spec)
    p = memory.state_bytes(spec, 1, "dp", state=state)
    n_params = p["num_params"]
    assert n_params == sum(math.prod(a.shape) for a in jax.tree.leaves(state.params))
    assert p["params"] == p["ema"] == 4 * n_params  # float32 parameters and their EMA copy
    assert 2 * 4 * n_params <= p["opt_state"] <= 2 * 4 * n_params + 16  # Adam's two moments (+ its step count)
    assert p["aux"] == 0
    # dp on 8 devices: every device holds all of it; fsdp: the big arrays split 8 ways, the small replicated
    dp8 = memory.state_bytes(spec, 8, "dp", state=state)
    fsdp8 = memory.state_bytes(spec, 8, "fsdp", state=state)
    assert dp8["state"] == p["state"]
    assert fsdp8["params"] == fsdp8["ema"] == _independent_fsdp_bytes(state.params, 8)
    assert fsdp8["params"] < p["params"] / 4  # nearly everything is in large kernels
    assert dp8["batch"] == fsdp8["batch"] == 8 * (16 * 16 * 4 * 4 + 4)  # 64 / 8 latents + labels per device


def test_teacher_parameters_count_for_the_distillation_methods():
    teacher_overrides = "teacher_overrides=[" + ", ".join(SMALL) + "]"  # the teacher's network is the student's
    spec = load_spec("celeba_ditb_progressive_distillation", SMALL + [teacher_overrides])
    p = memory.state_bytes(spec, 1, "dp")
    assert p["aux"] == p["params"]  # the teacher's parameters live in the state
    full = memory.state_bytes(load_spec("celeba_ditb_progressive_distillation", SMALL), 1, "dp")
    assert full["aux"] > 100 * full["params"]  # without the overrides the teacher is the spec's DiT-B/2
    assert memory.state_bytes(load_spec("celeba_ditb_reflow", SMALL), 1, "dp")["aux"] == 0  # pairs, not a teacher


def test_check_fits_names_both_figures_and_fsdp():
    spec = load_spec("celeba_ditb_shortcut", SMALL)
    dp = memory.state_bytes(spec, 8, "dp")
    fsdp = memory.state_bytes(spec, 8, "fsdp")
    assert memory.check_fits(spec, dp["total"], devices=8, strategy="dp")["total"] == dp["total"]
    with pytest.raises(memory.MemoryPlanError) as e:
        memory.check_fits(spec, (dp["total"] + fsdp["total"]) / 2, devices=8, strategy="dp")
    message = str(e.value)
    assert "\n" not in message
    assert memory.gib(dp["total"]) in message and "resources.sharding=fsdp" in message
    assert memory.gib(fsdp["total"]) in message


def test_a_run_that_cannot_fit_stops_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "digits_shortcut", "--set",
                          "model.hidden_size=100000000", "--in-process", "--no-tracking", "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: digits_shortcut does not fit"), out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written to the run directory


PLAN_SCRIPT = r"""
import json, sys
from orchestration import plan
from shortcut.spec_files import load_spec
topology = plan.parse_topology("cpu:8")
assert plan.prepare_jax(topology)
out = {}
for strategy in ("dp", "fsdp"):
    spec = load_spec("celeba_ditb_shortcut", json.loads(sys.argv[1]))
    out[strategy] = plan.plan(spec, topology, strategy=strategy, bisect=False, sampling=False, log=lambda m: None)
spec = load_spec("digits_shortcut", ["eval.batch_size=64"])
out["digits"] = plan.plan(spec, topology, bisect=False, sampling=True, log=lambda m: None)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def small_plans():
    # LLVM's optimisation of the CPU code halves the compile time and changes neither XLA's buffers nor its FLOPs
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {fast}".strip())
    out = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, json.dumps(SMALL)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def dit_forward_flops(*, tokens: int, hidden: int, depth: int, mlp_ratio: float, patch_in: int, freq: int = 256) -> int:
    """Multiply-add FLOPs (2 per MAC) of one DiT forward for one sample, from its layer shapes."""
    n, d = tokens, hidden
    patch = 2 * n * patch_in * d
    embedders = 2 * (2 * freq * d + 2 * d * d)  # t and d: sinusoid -> Dense -> Dense
    block = (2 * d * 6 * d  # adaLN modulation
             + 2 * n * d * 3 * d + 2 * n * d * d  # q, k, v and the output projection
             + 2 * 2 * n * n * d  # logits and probabilities x values
             + 2 * 2 * n * d * int(d * mlp_ratio))  # fc1, fc2
    final = 2 * d * 2 * d + 2 * n * d * patch_in
    return patch + embedders + depth * block + final


def test_plan_memory_matches_the_estimator_and_the_analytic_counts(small_plans):
    spec = load_spec("celeba_ditb_shortcut", SMALL)
    state = memory.abstract_state(spec)
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(state.params))
    dp, fsdp = small_plans["dp"]["train"], small_plans["fsdp"]["train"]
    assert small_plans["dp"]["num_params"] == n_params
    a = dp["arguments"]
    assert a["params"] == a["ema"] == 4 * n_params and 8 * n_params <= a["opt_state"] <= 8 * n_params + 16
    f = fsdp["arguments"]
    assert f["params"] == f["ema"] == _independent_fsdp_bytes(state.params, 8)
    for t in (dp, fsdp):  # what the estimator says each device holds is what XLA lays out as arguments
        parts = t["arguments"]
        ours = sum(parts[k] for k in ("params", "ema", "opt_state", "aux", "other", "batch"))
        # up to the labels: CelebA is unconditional (one-row label table), and XLA drops the unused argument
        assert 0 <= ours - parts["xla_total"] <= 8 * 4, (ours, parts["xla_total"])
        assert t["fits"] and t["peak"] >= parts["xla_total"]
    assert fsdp["arguments"]["xla_total"] < dp["arguments"]["xla_total"] / 4  # (temporaries hold gathered weights)


def test_plan_flops_are_three_forwards_plus_the_bootstrap_forwards(small_plans):
    spec = load_spec("celeba_ditb_shortcut", SMALL)
    forward = dit_forward_flops(tokens=64, hidden=128, depth=2, mlp_ratio=4.0, patch_in=2 * 2 * 4)
    batch = spec.train.batch_size
    bootstrap = round(batch * spec.method.bootstrap_fraction)  # two no-gradient forwards each
    expected = 3 * batch * forward + 2 * bootstrap * forward
    for strategy in ("dp", "fsdp"):
        got = small_plans[strategy]["train"]["flops_per_step"]
        assert abs(got / expected - 1) < 0.10, (strategy, got, expected)


def test_plan_reports_sampling_and_projections(small_plans):
    r = small_plans["digits"]
    assert r["estimate"].startswith("CPU estimate")
    s = r["sampling"]
    assert s["eval_batch"] == 64 and s["steps"]["1.0"]["flops_per_device"] > 0
    assert set(s["fid50k"]) == {"128_steps", "4_steps", "1_steps"}
    assert r["train"]["step_time_s"] is None  # no peak FLOP/s for a CPU: no time projection


def test_topologies_parse_and_a_missing_libtpu_says_how_to_install():
    from orchestration import plan

    assert plan.parse_topology("tpu:v3-8").num_devices == 8
    assert plan.parse_topology("tpu:v4-8").num_devices == 4  # megacore: one device per chip
    assert plan.parse_topology("tpu:v5e-4").num_devices == 4
    assert plan.parse_topology("cpu:8").num_devices == 8
    for bad in ("tpu:v9-8", "cpu:x", "gpu:h100-8", "v3-8"):
        with pytest.raises(plan.PlanError):
            plan.parse_topology(bad)
    if importlib.util.find_spec("libtpu") is None:
        with pytest.raises(plan.PlanError, match=r"pip install -e '\.\[plan\]'"):
            plan.topology_devices(plan.parse_topology("tpu:v3-8"))


def test_largest_batch_bisects():
    from orchestration.planning.compile import largest_batch

    calls = []

    def try_batch(b):
        calls.append(b)
        return {"oom": b > 37, "peak": b}

    best, trail = largest_batch(try_batch, 16, {}, capacity=None, max_compiles=20)
    assert best == 37 and len(calls) <= 10
    best, _ = largest_batch(lambda b: {"oom": True, "peak": None}, 8, {}, capacity=None)
    assert best is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e '.[plan]')")
def test_plan_celeba_ditb_for_a_tpu_v3_8(tmp_path):
    out_file = tmp_path / "plan.json"
    out = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "celeba_ditb_shortcut", "--plan",
                          "tpu:v3-8", "--no-bisect", "--plan-out", str(out_file)], cwd=REPO, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out_file.read_text())
    t = r["train"]
    assert r["num_devices"] == 8 and r["device_kind"] == "TPU v3" and t["fits"]
    assert t["arguments"]["params"] == 4 * r["num_params"]
    assert t["flops_per_step"] > 0 and t["run_days"] > 0


def test_libtpus_out_of_memory_messages_parse():
    from orchestration.planning.compile import _oom_bytes

    temps = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (15.50G) exceeds available HBM (15.48G).")
    need, cap, what = _oom_bytes(temps)
    assert (need, cap, what) == (15.5 * 2**30, 15.48 * 2**30, "temporaries")
    assert _oom_bytes(RuntimeError("Used 20.5G of 15.48G hbm. Exceeded hbm capacity by 5G."))[2] == "total"
    assert _oom_bytes(RuntimeError("something else")) == (None, None, "")
