"""Tests for shortcut.model (DiT conditioned on t, d and label)."""

import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut.model import (
    MODEL_SIZES,
    DiT,
    DiTBlock,
    PatchEmbed,
    count_params,
    d_embedder_input,
    get_2d_sincos_pos_embed,
    make_dit,
    patchify,
    timestep_embedding,
    unpatchify,
)


def _inputs(b=2, hw=8, c=4, num_classes=10, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (b, hw, hw, c))
    t = jnp.linspace(0.1, 0.9, b)
    d = jnp.full((b,), 1.0 / 128)
    labels = jax.random.randint(k2, (b,), 0, num_classes + 1)
    return x, t, d, labels


def _tiny(**kw):
    kw.setdefault("out_channels", 4)
    kw.setdefault("num_classes", 10)
    return make_dit("tiny", **kw)


def _perturb(params, scale=0.05, seed=1):
    """Add noise to every leaf so the zero-initialised layers become active (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape), jnp.float32), params
    )


def _random_params(model, *args, seed=2):
    """Random float32 params of the right shapes without running (and compiling) model.init."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)
    return _perturb(zeros, scale=0.05, seed=seed)


_JIT_CACHE: dict = {}


def _apply(model, params, *args, **kw):
    """Jitted model.apply (op-by-op dispatch is slow on CPU); one compile per model config."""
    key = (model, repr(sorted(kw.items())))
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kw))
    return _JIT_CACHE[key](params, *args)


@pytest.fixture(scope="module")
def tiny_setup():
    model = _tiny()
    x, t, d, labels = _inputs()
    params = jax.jit(model.init)(jax.random.key(0), x, t, d, labels)["params"]
    return model, params, (x, t, d, labels)


def test_ditb2_param_count():
    model = make_dit("B", out_channels=4, num_classes=0, patch_size=2)
    z = jnp.zeros
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), z((1, 32, 32, 4)), z((1,)), jnp.ones((1,)), z((1,), jnp.int32)
    )
    n = count_params(shapes["params"])
    print(f"DiT-B/2 (32x32x4, unconditional, with d embedder): {n} parameters")
    assert set(shapes) == {"params"}
    assert abs(n - 130e6) / 130e6 < 0.01, n


def test_model_sizes():
    assert MODEL_SIZES["tiny"] == dict(hidden_size=64, depth=3, num_heads=4, mlp_ratio=4.0)
    assert (MODEL_SIZES["B"]["hidden_size"], MODEL_SIZES["B"]["depth"], MODEL_SIZES["B"]["num_heads"]) == (768, 12, 12)
    m = make_dit("S", out_channels=3, num_classes=0, depth=2)
    assert (m.hidden_size, m.depth, m.num_heads, m.out_channels) == (384, 2, 6, 3)
    with pytest.raises(ValueError):
        make_dit("nope", out_channels=3, num_classes=0)
    with pytest.raises(ValueError):
        make_dit("tiny", out_channels=3, num_classes=0, d_conditioning="log")


def test_zero_at_init_then_nonzero(tiny_setup):
    model, params, (x, t, d, labels) = tiny_setup
    out = _apply(model, params, x, t, d, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)
    out2 = _apply(model, _perturb(params), x, t, d, labels)
    assert out2.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out2))) > 1e-3
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_init_scheme(tiny_setup):
    _, params, _ = tiny_setup
    for i in range(3):
        blk = params[f"block_{i}"]
        assert np.all(np.asarray(blk["adaLN_modulation"]["kernel"]) == 0)
        assert np.all(np.asarray(blk["qkv"]["bias"]) == 0)
        assert float(jnp.std(blk["fc1"]["kernel"])) > 0
    fl = params["final_layer"]
    assert np.all(np.asarray(fl["linear"]["kernel"]) == 0)
    assert np.all(np.asarray(fl["adaLN_modulation"]["kernel"]) == 0)
    # t and d embedders are separate modules with different weights
    tk = params["t_embedder"]["Dense_0"]["kernel"]
    dk = params["d_embedder"]["Dense_0"]["kernel"]
    assert tk.shape == dk.shape and not np.allclose(tk, dk)
    assert 0.015 < float(jnp.std(tk)) < 0.025
    assert 0.015 < float(jnp.std(params["y_embedder"]["embedding_table"]["embedding"])) < 0.025
    # patch conv: xavier over the flattened [p*p*C, hidden] view, bound sqrt(6 / (16 + 64))
    pk = np.asarray(params["x_embedder"]["proj"]["kernel"])
    assert pk.shape == (2, 2, 4, 64) and 0.8 * math.sqrt(6 / 80) < np.abs(pk).max() <= math.sqrt(6 / 80)


def test_bf16_close_to_fp32(tiny_setup):
    model, params, (x, t, d, labels) = tiny_setup
    p = _perturb(params)
    ref = _apply(model, p, x, t, d, labels)
    m16 = _tiny(dtype=jnp.bfloat16)
    out = _apply(m16, p, x, t, d, labels)
    assert out.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(out - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    assert err < 0.05 * scale, (err, scale)
    assert err > 0  # bf16 really was used
    # params created under bf16 compute are still float32
    p16 = jax.eval_shape(m16.init, jax.random.key(0), x, t, d, labels)["params"]
    assert all(q.dtype == jnp.float32 for q in jax.tree_util.tree_leaves(p16))


def _numpy_pos_embed(dim, gh, gw):
    """Independent loop implementation of the MAE/DiT 2-D sin-cos formula."""
    out = np.zeros((gh * gw, dim))
    quarter = dim // 4
    for r in range(gh):
        for c in range(gw):
            tok = r * gw + c
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                out[tok, i] = math.sin(c * omega)
                out[tok, quarter + i] = math.cos(c * omega)
                out[tok, 2 * quarter + i] = math.sin(r * omega)
                out[tok, 3 * quarter + i] = math.cos(r * omega)
    return out


def test_pos_embed(tiny_setup):
    model, params, (x, t, d, labels) = tiny_setup
    np.testing.assert_allclose(get_2d_sincos_pos_embed(64, 4, 4), _numpy_pos_embed(64, 4, 4), atol=1e-6)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(16, 3, 5), _numpy_pos_embed(16, 3, 5), atol=1e-6)
    # the model uses exactly this table, and it is not a parameter
    _, inter = _apply(model, params, x, t, d, labels, mutable=["intermediates"])
    used = inter["intermediates"]["pos_embed"][0]
    np.testing.assert_allclose(np.asarray(used), _numpy_pos_embed(64, 4, 4), atol=1e-6)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t, d, labels)
    assert set(variables) == {"params"}
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    assert not any("pos" in jax.tree_util.keystr(path) for path, _ in flat)
    assert not any(leaf.shape == (16, 64) for _, leaf in flat)


def test_pos_embed_is_used(tiny_setup):
    # A spatially constant input gives identical patch tokens; only the positional embedding
    # can make the output differ between patches.
    model, params, (x, t, d, labels) = tiny_setup
    out = np.asarray(_apply(model, _perturb(params), jnp.ones_like(x), t, d, labels))
    assert np.abs(out[:, :2, :2] - out[:, 4:6, 2:4]).max() > 1e-4


def _np_block(blk, x, c, num_heads):
    """Independent numpy forward of one adaLN-Zero DiT block."""
    def dense(name, v):
        return v @ np.asarray(blk[name]["kernel"], np.float64) + np.asarray(blk[name]["bias"], np.float64)

    def ln(v):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)

    silu_c = c / (1 + np.exp(-c))
    sm, cm, gm, sf, cf, gf = np.split(dense("adaLN_modulation", silu_c), 6, axis=-1)
    b, n, h = x.shape
    hd = h // num_heads
    y = ln(x) * (1 + cm[:, None]) + sm[:, None]
    q, k, v = np.split(dense("qkv", y), 3, axis=-1)
    q, k, v = (a.reshape(b, n, num_heads, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, h)
    x = x + gm[:, None] * dense("proj", att)
    y = ln(x) * (1 + cf[:, None]) + sf[:, None]
    y = dense("fc1", y)
    y = 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    return x + gf[:, None] * dense("fc2", y)


def test_block_matches_numpy_reference():
    blk = DiTBlock(hidden_size=32, num_heads=4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    c = rng.standard_normal((2, 32)).astype(np.float32)
    shapes = jax.eval_shape(blk.init, jax.random.key(0), x, c)["params"]
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)
    p = _perturb(zeros, scale=0.2, seed=3)
    out = jax.jit(blk.apply)({"params": p}, x, c)
    ref = _np_block(jax.tree_util.tree_map(np.asarray, p), x.astype(np.float64), c.astype(np.float64), 4)
    assert np.abs(ref - x).max() > 1e-2  # the block does something
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4, rtol=2e-4)


def test_t_and_d_change_output(tiny_setup):
    model, params, (x, t, d, labels) = tiny_setup
    p = _perturb(params)
    f = lambda t_, d_: _apply(model, p, x, t_, d_, labels)
    base = f(t, d)
    out_t = f(t + 0.25, d)
    out_d = f(t, jnp.full_like(d, 0.5))
    assert float(jnp.max(jnp.abs(out_t - base))) > 1e-4
    assert float(jnp.max(jnp.abs(out_d - base))) > 1e-4
    # d acts through its own embedder: zeroing the d embedder removes the d dependence only
    p_nod = jax.tree_util.tree_map(jnp.zeros_like, p["d_embedder"])
    p2 = {**p, "d_embedder": p_nod}
    g = lambda t_, d_: _apply(model, p2, x, t_, d_, labels)
    np.testing.assert_array_equal(np.asarray(g(t, d)), np.asarray(g(t, jnp.full_like(d, 0.5))))
    assert float(jnp.max(jnp.abs(g(t + 0.25, d) - g(t, d)))) > 1e-4


def test_d_embedder_input_modes(tiny_setup):
    d = jnp.array([1.0, 0.5, 1 / 64, 1 / 128])
    np.testing.assert_allclose(d_embedder_input(d, "level"), [0.0, 1.0, 6.0, 7.0])
    np.testing.assert_allclose(d_embedder_input(d, "step_size"), np.asarray(d))
    with pytest.raises(ValueError):
        d_embedder_input(d, "bogus")
    # The two modes give different networks for the same params (different embedder inputs).
    model, params, (x, t, d2, labels) = tiny_setup
    p = _perturb(params)
    a = _apply(model, p, x, t, d2, labels)
    b = _apply(_tiny(d_conditioning="step_size"), p, x, t, d2, labels)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_timestep_embedding_unscaled():
    e = timestep_embedding(jnp.array([0.0, 0.5]), 256)
    assert e.shape == (2, 256)
    np.testing.assert_allclose(e[0], np.r_[np.ones(128), np.zeros(128)])
    np.testing.assert_allclose(e[1, 0], math.cos(0.5), rtol=1e-6)  # freq 1 for i = 0, no x1000
    np.testing.assert_allclose(e[1, 128], math.sin(0.5), rtol=1e-6)


def test_patchify_unpatchify():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    tok = patchify(x, 2)
    assert tok.shape == (2, 6, 12)
    # token 4 = row 1, col 1 -> pixels [2:4, 2:4], ordered (dy, dx, c)
    np.testing.assert_array_equal(tok[1, 4], np.asarray(x[1, 2:4, 2:4, :]).reshape(-1))
    np.testing.assert_array_equal(unpatchify(tok, 2, 2, 3), x)

    # The conv of PatchEmbed reads pixels in the same layout: with an identity kernel its tokens
    # equal patchify(x), so unpatchify inverts the conv's layout exactly.
    p, c = 2, 3
    feat = p * p * c
    pe = PatchEmbed(hidden_size=feat, patch_size=p)
    assert jax.eval_shape(pe.init, jax.random.key(0), x)["params"]["proj"]["kernel"].shape == (p, p, c, feat)
    ident = jnp.eye(feat).reshape(p, p, c, feat)
    v = {"params": {"proj": {"kernel": ident, "bias": jnp.zeros(feat)}}}
    conv_tok = pe.apply(v, x)
    np.testing.assert_allclose(conv_tok, tok, atol=1e-5)
    np.testing.assert_allclose(unpatchify(conv_tok, p, 2, 3), x, atol=1e-5)


def test_label_table_rows():
    x, t, d, _ = _inputs()
    for nc in (0, 10):
        m = _tiny(num_classes=nc)
        labels = jnp.full((2,), nc, jnp.int32)  # the null class
        shapes = jax.eval_shape(m.init, jax.random.key(0), x, t, d, labels)["params"]
        assert shapes["y_embedder"]["embedding_table"]["embedding"].shape == (nc + 1, 64)


def test_null_class_differs_from_real(tiny_setup):
    model, params, (x, t, d, _) = tiny_setup
    p = _perturb(params)
    a = _apply(model, p, x, t, d, jnp.array([3, 3]))
    b = _apply(model, p, x, t, d, jnp.array([10, 10]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_tiny_jit_forward_fast():
    m = make_dit("tiny", out_channels=1, num_classes=10)
    x = jnp.ones((8, 8, 8, 1))
    t = jnp.full((8,), 0.5)
    d = jnp.full((8,), 1 / 128)
    y = jnp.arange(8, dtype=jnp.int32)
    params = _random_params(m, x, t, d, y)
    f = jax.jit(m.apply)
    start = time.perf_counter()
    out = f({"params": params}, x, t, d, y).block_until_ready()
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    f({"params": params}, x * 2, t, d, y).block_until_ready()
    run = time.perf_counter() - start
    assert out.shape == (8, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
    assert compile_and_run < 20 and run < 1.0, (compile_and_run, run)


def test_dit_rejects_bad_shapes():
    m = _tiny(patch_size=3)
    x, t, d, labels = _inputs()
    with pytest.raises(ValueError):
        m.init(jax.random.key(0), x, t, d, labels)
    assert isinstance(_tiny(), DiT) and isinstance(_tiny(), nn.Module)
