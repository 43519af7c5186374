"""`model.architecture: official` against outputs of the official code's model.DiT, and import_checkpoint.

The fixture (tests/fixtures/official/, see its README) holds a checkpoint saved by the official code
(kvfrans/shortcut-models @6010043, TrainStateEma + utils.checkpoint on one host) and that code's outputs
for random (x, t, d level, labels); no official code runs here.
"""

import json
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchestration import import_checkpoint as ic
from shortcut import model as model_lib
from shortcut.model import DiT, attention, attention_implementation

FIXTURE = Path(__file__).parent / "fixtures" / "official"
CHECKPOINT = FIXTURE / "checkpoint.pkl"
# The fixture's official model: DiT(patch_size=2, hidden_size=16, depth=2, num_heads=2, mlp_ratio=4,
# out_channels=1, num_classes=10) on 8x8x1 inputs; the spec below is the same network.
SPEC_SET = ["model.architecture=official", "model.size=null", "model.hidden_size=16", "model.depth=2",
            "model.num_heads=2"]
# float32: the 1e-5 relative; bfloat16: two units in the last place of the largest output.
RTOL = {"float32": 1e-5, "bfloat16": 2 ** -7}


def _model(dtype, **kw):
    return DiT(hidden_size=16, depth=2, num_heads=2, out_channels=1, num_classes=10, patch_size=2,
               dtype=jnp.dtype(dtype), architecture="official", **kw)


def _expected(model):
    args = (jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
    return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


@pytest.fixture(scope="module")
def fx():
    data = dict(np.load(FIXTURE / "parity.npz"))
    official = ic.load_official(CHECKPOINT)
    expected = _expected(_model("float32"))
    data["params"] = ic.map_params(official["params"], expected)
    data["params_ema"] = ic.map_params(official["params_ema"], expected)
    data["official"] = official
    return data


def _outputs(fx, dtype, params="params", **kw):
    model = _model(dtype, **kw)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    d = 2.0 ** -fx["level"]  # the official code feeds the level k; this network takes d = 2^-k
    return np.asarray(apply(fx[params], fx["x"], fx["t"], d, fx["labels"]))


def _rel_err(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_parameter_tree_maps_name_by_name(fx):
    official = ic.flatten(fx["official"]["params"])
    ours = ic.flatten(fx["params"])
    assert set(official) - {ic.official_name(p) for p in ours} == {ic.UNUSED}
    for path, value in ours.items():
        assert ic.official_name(path) in official and ic.project_name(ic.official_name(path)) == path
        np.testing.assert_array_equal(value, np.asarray(official[ic.official_name(path)])[0])  # process axis
    assert ic.project_name("DiTBlock_1/Dense_1/kernel") == "block_1/key/kernel"
    assert ic.project_name("DiTBlock_1/Dense_2/kernel") == "block_1/query/kernel"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_official_architecture_matches_the_official_code(fx, dtype):
    out = _outputs(fx, dtype)
    assert out.dtype == np.float32 and np.abs(fx[f"out_{dtype}"]).max() > 0.1
    assert _rel_err(out, fx[f"out_{dtype}"]) <= RTOL[dtype]
    assert _rel_err(_outputs(fx, dtype, "params_ema"), fx[f"out_ema_{dtype}"]) <= RTOL[dtype]


def test_fixture_tells_the_differences_apart(fx, monkeypatch):
    """The fixture fails a network that differs from the official one in scale or in q/k naming."""
    ref = fx["out_float32"]
    swapped = jax.tree.map(lambda a: a, fx["params"])
    for block in ("block_0", "block_1"):
        swapped[block]["query"], swapped[block]["key"] = swapped[block]["key"], swapped[block]["query"]
    assert _rel_err(_outputs({**fx, "params": swapped}, "float32"), ref) > 100 * RTOL["float32"]
    monkeypatch.setattr(model_lib, "attention", lambda q, k, v, arch, impl: attention(q, k, v, "dit", impl))
    assert _rel_err(_outputs(fx, "float32"), ref) > 100 * RTOL["float32"]


def test_attention_implementation_choice():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert attention_implementation("cuda", bf16, 64) == "cudnn"  # DiT-B/2
    assert attention_implementation("cuda", jnp.float16, 72) == "cudnn"  # DiT-XL/2
    assert attention_implementation("cuda", f32, 64) == "xla"  # cuDNN attention has no float32
    assert attention_implementation("cuda", bf16, 60) == "xla"  # not a multiple of 8
    assert attention_implementation("cuda", bf16, 256) == "xla"
    assert attention_implementation("rocm", bf16, 64) == "xla"
    assert attention_implementation("cpu", bf16, 64) == "xla"
    assert model_lib.default_platform() == jax.default_backend()  # cpu here


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_function_equals_the_official_order(dtype):
    """What the cuDNN path computes (jax's dot_product_attention with scale 1/head_dim; its XLA form
    runs here) equals the official order of operations to rounding."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, 4, 64)).astype(dtype)
    official = attention(q, k, v, "official", "xla")
    fused = jax.nn.dot_product_attention(q, k, v, scale=1 / 64, implementation="xla")
    tol = 1e-6 if dtype == "float32" else 2 ** -7
    assert float(jnp.abs(official.astype(jnp.float32) - fused.astype(jnp.float32)).max()) <= tol
    scaled_sqrt = jax.nn.dot_product_attention(q, k, v, implementation="xla")  # 1/sqrt(head_dim): different
    assert float(jnp.abs(official.astype(jnp.float32) - scaled_sqrt.astype(jnp.float32)).max()) > 10 * tol


@pytest.mark.skipif(model_lib.default_platform() != "cuda", reason="needs a CUDA GPU")
def test_cudnn_attention_matches_xla_on_gpu():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 256, 12, 64)).astype(jnp.bfloat16)
    a = attention(q, k, v, "official", "cudnn").astype(jnp.float32)
    b = attention(q, k, v, "official", "xla").astype(jnp.float32)
    assert float(jnp.abs(a - b).max()) <= 2 ** -6


def test_mismatches_are_named(fx, tmp_path):
    deeper = _expected(DiT(hidden_size=16, depth=3, num_heads=2, out_channels=1, num_classes=10,
                           architecture="official"))
    with pytest.raises(ic.ImportMismatch, match=r"no DiTBlock_2/Dense_0/bias \(the spec's model's "
                                                r"block_2/adaLN_modulation/bias"):
        ic.map_params(fx["official"]["params"], deeper)
    wider = _expected(DiT(hidden_size=32, depth=2, num_heads=2, out_channels=1, num_classes=10,
                          architecture="official"))
    with pytest.raises(ic.ImportMismatch, match=r"DiTBlock_0/Dense_0/bias has shape \(96,\), the spec's "
                                                r"model expects \(192,\)"):
        ic.map_params(fx["official"]["params"], wider)
    extra = {**fx["official"]["params"], "Dense_9": {"kernel": np.zeros((2, 2))}}
    with pytest.raises(ic.ImportMismatch, match="Dense_9/kernel is not a parameter of the official DiT"):
        ic.map_params(extra, _expected(_model("float32")))
    not_a_checkpoint = tmp_path / "x.pkl"
    not_a_checkpoint.write_bytes(pickle.dumps({"params": 1}))
    with pytest.raises(ic.ImportMismatch, match="no train_state.params"):
        ic.load_official(not_a_checkpoint)
    unsafe = tmp_path / "unsafe.pkl"
    unsafe.write_bytes(pickle.dumps({"train_state": {"params": shutil.rmtree}}))
    with pytest.raises(ic.ImportMismatch, match="refusing to load shutil.rmtree"):
        ic.load_official(unsafe)


def test_unconditional_spec_takes_the_official_null_row(fx):
    """The official CelebA-HQ command trains with num_classes 1 and class dropout 1 (every label null)."""
    params = jax.tree.map(np.asarray, fx["official"]["params"])
    table = params["LabelEmbedder_0"]["Embed_0"]["embedding"][0]  # [11, 16], process axis dropped
    params["LabelEmbedder_0"]["Embed_0"]["embedding"] = table[None, :2]
    unconditional = _expected(DiT(hidden_size=16, depth=2, num_heads=2, out_channels=1, num_classes=0,
                                  architecture="official"))
    mapped = ic.map_params(params, unconditional)
    np.testing.assert_array_equal(mapped["y_embedder"]["embedding_table"]["embedding"], table[1:2])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert ic.main([str(CHECKPOINT), "digits_shortcut", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("import_checkpoint: spec digits_shortcut has model.architecture dit; "
                                               "an official checkpoint needs official "
                                               "(--set model.architecture=official)")
    assert ic.main([str(CHECKPOINT), "digits_shortcut", "--workdir", str(tmp_path)]
                   + [f"--set={s}" for s in SPEC_SET + ["model.depth=3"]]) == 2
    assert capsys.readouterr().err.strip() == ("import_checkpoint: the checkpoint has no DiTBlock_2/Dense_0/bias "
                                               "(the spec's model's block_2/adaLN_modulation/bias, shape (96,))")
    assert not list(tmp_path.iterdir())  # nothing written


def test_import_then_eval_only(fx, tmp_path, capsys):
    from orchestration import run_experiment
    from shortcut.checkpoint import Checkpointer
    from shortcut.record import run_dir
    from shortcut.spec_files import load_spec
    from shortcut.train import TrainState, build_model, init_state, make_optimizer, restore

    local_save = tmp_path / "ckpt_2"  # the official code's local layout: FILENAME/FILENAME.tmp
    local_save.mkdir()
    shutil.copy(CHECKPOINT, local_save / "ckpt_2.tmp")
    evals = ["eval.steps=[4, 1]", "eval.num_samples=16", "eval.batch_size=16", "eval.grid_size=4"]
    sets = [a for s in SPEC_SET + evals for a in ("--set", s)]
    assert ic.main([str(local_save), "digits_shortcut", "--workdir", str(tmp_path / "runs")] + sets) == 0
    spec = load_spec("digits_shortcut", SPEC_SET + evals)
    rundir = run_dir(spec, tmp_path / "runs")
    record = json.loads((rundir / "run.json").read_text())
    assert record["status"] == "finished" and record["imported"]["step"] == 1
    assert record["imported"]["optimizer"] == "Adam moments imported (count 1)"

    model, optimizer = build_model(spec), make_optimizer(spec.optimizer)
    checkpointer = Checkpointer(rundir / "checkpoints", keep=2)
    state, _ = restore(checkpointer, checkpointer.latest_step(), init_state(spec, model, optimizer))
    checkpointer.close()
    assert isinstance(state, TrainState) and int(state.step) == 1
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    out = np.asarray(apply(state.ema_params, fx["x"], fx["t"], 2.0 ** -fx["level"], fx["labels"]))
    assert _rel_err(out, fx["out_ema_float32"]) <= RTOL["float32"]
    adam = ic._adam_states(state.opt_state)[0]
    official_mu = ic.flatten(ic._adam_states(fx["official"]["opt_state"])[0].mu)
    np.testing.assert_array_equal(np.asarray(adam.mu["block_1"]["query"]["kernel"]),
                                  official_mu["DiTBlock_1/Dense_2/kernel"][0])

    capsys.readouterr()
    argv = ["digits_shortcut", "--eval-only", "--in-process", "--no-tracking", "--workdir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results")] + sets
    assert run_experiment.main(argv) == 0
    record = json.loads((rundir / "run.json").read_text())
    assert record["status"] == "finished" and record["imported"]["step"] == 1
    entries = {e["num_steps"]: e for e in record["evaluation"]}
    assert set(entries) == {4, 1} and all(e["train_step"] == 1 for e in entries.values())
    assert all(np.isfinite(e["value"]) for e in entries.values())


def test_official_initialisers_and_dtypes():
    x, t, d, y = jnp.ones((2, 8, 8, 1)), jnp.array([0.2, 0.7]), jnp.array([1.0, 1 / 128]), jnp.array([3, 10])
    model = _model("bfloat16")
    params = model.init(jax.random.key(0), x, t, d, y)["params"]
    block = params["block_0"]
    assert set(block) == {"adaLN_modulation", "query", "key", "value", "proj", "fc1", "fc2"}
    kernel = np.asarray(block["adaLN_modulation"]["kernel"])  # xavier uniform over [16, 96], not zero
    assert 0.5 * np.sqrt(6 / 112) < np.abs(kernel).max() <= np.sqrt(6 / 112)
    assert not np.any(params["final_layer"]["linear"]["kernel"])
    assert not np.any(params["final_layer"]["adaLN_modulation"]["kernel"])
    out, inter = model.apply({"params": params}, x, t, d, y, capture_intermediates=True)
    assert out.dtype == jnp.float32 and not np.any(out)  # zero final layer
    calls = inter["intermediates"]
    assert calls["block_0"]["__call__"][0].dtype == jnp.bfloat16  # the residual stream
    assert calls["t_embedder"]["__call__"][0].dtype == jnp.float32  # float32 conditioning
    assert calls["y_embedder"]["__call__"][0].dtype == jnp.bfloat16


def test_architecture_in_spec_and_hash():
    from shortcut.spec_files import load_spec
    from shortcut.train import build_model

    default, official = load_spec("digits_shortcut"), load_spec("digits_shortcut", ["model.architecture=official"])
    assert default.model.architecture == "dit" and build_model(official).architecture == "official"
    explicit = load_spec("digits_shortcut", ["model.architecture=dit"])
    assert explicit.hash() == default.hash() != official.hash()  # "dit" keeps the hashes of earlier runs
