"""Guidance as an input of the shortcut model (iSM's intrinsic guidance) and interval guidance
(shortcut/guidance.py, ShortcutObjective with `guidance: intrinsic`, `guidance_interval`): each checked against
an expectation computed another way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from shortcut import guidance
from shortcut.errors import InputError
from shortcut.model import DiT, example_inputs
from shortcut.objective import Context, ShortcutConfig, ShortcutObjective
from shortcut.spec_files import load_spec

KEY = jax.random.PRNGKey(0)
NULL = 10
W = guidance.GUIDANCE_SCALE


def objective(**kw) -> ShortcutObjective:
    return ShortcutObjective(ShortcutConfig(name="shortcut", **kw), num_classes=10)


def toy(params, x, t, d, labels, cond=None):
    """A velocity that depends on every input, w included (through cond), so a wrong input shows up."""
    e = lambda a: a.reshape(a.shape + (1,) * (x.ndim - 1))  # noqa: E731
    w = 1.0 if cond is None else e(cond[W])
    return jnp.sin(params * x + e(t)) + e(d) * x + 0.1 * e(labels.astype(jnp.float32)) + 0.3 * w * x


def batch(n=16, seed=5):
    return {"image": jax.random.normal(jax.random.PRNGKey(seed), (n, 4, 4, 1)), "label": jnp.arange(n) % 10}


# ---------------------------------------------------------------- the network


def test_a_zero_initialised_w_input_leaves_the_network_unchanged_at_any_w():
    kw = dict(hidden_size=32, depth=2, num_heads=2, out_channels=1, num_classes=10, patch_size=2,
              attention_impl="xla")
    plain = DiT(**kw)
    opts = objective(guidance="intrinsic").network_options(objective(guidance="intrinsic").config)
    assert opts == {"conditioning": (W,)} and objective().network_options(objective().config) == {}
    with_w = DiT(**kw, **opts)
    p_plain = plain.init(KEY, *example_inputs(plain, (8, 8, 1)))["params"]
    leaves, tree = jax.tree.flatten(p_plain)  # move the shared layers off their (adaLN-zero) initialisation
    p_plain = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(jax.random.fold_in(KEY, i), p.shape)
                                        for i, p in enumerate(leaves)])
    p_w = {**with_w.init(KEY, *example_inputs(with_w, (8, 8, 1)))["params"], **p_plain}
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    t, d, y = jnp.array([0.0, 0.25, 0.5, 0.9]), jnp.full((4,), 1 / 8), jnp.arange(4)
    base = plain.apply({"params": p_plain}, x, t, d, y)
    for w in (1.0, 0.0, 2.5, 3.5):
        np.testing.assert_array_equal(with_w.apply({"params": p_w}, x, t, d, y, {W: jnp.full((4,), w)}), base)


# ---------------------------------------------------------------- drawing w


def test_w_lies_on_the_grid_with_equal_frequencies():
    grid = guidance.guidance_grid(0.0, 3.5, 0.25)
    np.testing.assert_allclose(grid, np.arange(15) * 0.25)
    w = np.asarray(guidance.grid_guidance(KEY, 60_000, 0.0, 3.5, 0.25))
    idx = np.round(w / 0.25).astype(int)
    np.testing.assert_allclose(w, idx * 0.25, atol=1e-6)  # on the grid
    counts = np.bincount(idx, minlength=15)
    assert len(counts) == 15
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the 15 points


def test_w_drawn_in_targets_is_the_networks_input():
    obj = objective(guidance="intrinsic", guidance_range=(1.0, 2.0), guidance_step=0.5)
    tg = obj.targets(KEY, batch(64), Context(toy, 1.3, 0.7))
    w = np.asarray(tg.cond[W])
    dropped = np.asarray(tg.labels) == NULL
    assert set(np.round(w[~dropped], 6)) <= {1.0, 1.5, 2.0} and np.all(w[dropped] == 1.0)
    assert len(set(np.round(w[~dropped], 6))) == 3


# ---------------------------------------------------------------- targets


def test_flow_target_is_guided_at_each_rows_w_and_one_outside_the_interval():
    """bootstrap_fraction 0: every row a flow row; v = (x1 - x0) + (w_eff - 1) (s(y, 1) - s(null, 1)) with the
    teacher (EMA) parameters, w_eff = w inside [t_lo, t_hi] and 1 outside; dropped rows keep x1 - x0."""
    data = batch(64)
    ctx = Context(toy, 1.3, 0.7)
    interval = (0.25, 0.6)
    for kw in ({}, {"guidance_interval": interval}):
        obj = objective(guidance="intrinsic", bootstrap_fraction=0.0, **kw)
        tg = obj.targets(KEY, data, ctx)
        plain = objective(bootstrap_fraction=0.0).targets(KEY, data, ctx)  # same keys: the same x_t, t, labels
        for a, b in zip(tg[:4], plain[:4]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        w = tg.cond[W]
        one = {W: jnp.ones_like(w)}
        v_c = toy(0.7, tg.x_t, tg.t, tg.d, data["label"], one)
        v_u = toy(0.7, tg.x_t, tg.t, tg.d, jnp.full_like(data["label"], NULL), one)
        t = np.asarray(tg.t)
        inside = (t >= interval[0]) & (t <= interval[1]) if kw else np.ones_like(t, bool)
        dropped = np.asarray(tg.labels) == NULL
        w_eff = np.where(inside & ~dropped, np.asarray(w), 1.0)
        expect = np.asarray(plain.v) + (w_eff - 1)[:, None, None, None] * np.asarray(v_c - v_u)
        np.testing.assert_allclose(np.asarray(tg.v), expect, rtol=1e-5, atol=1e-5)
        if kw:  # outside the interval the target is the plain flow target, whatever w the row was given
            out = ~inside
            assert out.any() and (inside & ~dropped & (np.asarray(w) != 1)).any()
            np.testing.assert_array_equal(np.asarray(tg.v)[out], np.asarray(plain.v)[out])
            assert (np.asarray(w)[out & ~dropped] != 1).any()  # the input stays the row's own w


def test_bootstrap_target_is_two_half_steps_of_the_network_at_the_rows_w():
    data = batch(32)
    ctx = Context(toy, 1.3, 0.7)
    obj = objective(guidance="intrinsic", bootstrap_fraction=0.5, bootstrap_clip=None)
    tg = obj.targets(KEY, data, ctx)
    nb = obj.bootstrap_size(32)
    w = tg.cond[W][:nb]
    assert len(np.unique(np.asarray(w))) > 3
    x, t, d, y = tg.x_t[:nb], tg.t[:nb], tg.d[:nb], tg.labels[:nb]
    at_w = {W: w}
    v1 = toy(0.7, x, t, d / 2, y, at_w)  # the EMA parameters (bootstrap_ema)
    v2 = toy(0.7, x + (d / 2)[:, None, None, None] * v1, t + d / 2, d / 2, y, at_w)
    np.testing.assert_allclose(np.asarray(tg.v[:nb]), np.asarray((v1 + v2) / 2), rtol=1e-6, atol=1e-6)
    # the same rows with w = 1 would give another target: w really is the network's input here
    one = {W: jnp.ones_like(w)}
    u1 = toy(0.7, x, t, d / 2, y, one)
    assert float(jnp.max(jnp.abs(tg.v[:nb] - (u1 + toy(0.7, x + (d / 2)[:, None, None, None] * u1, t + d / 2,
                                                         d / 2, y, one)) / 2))) > 1e-3


def test_interval_limits_bootstrap_cfg_to_its_times():
    """guidance: cfg with bootstrap_cfg: each finest-level sub-step is guided at cfg_scale only when its start
    time is in the interval, plain conditional (w = 1) outside."""
    obj = objective(bootstrap_cfg=True, cfg_scale=2.0, guidance_interval=(0.3, 0.7))
    x = jax.random.normal(KEY, (6, 4, 4, 1))
    t = jnp.array([0.0, 0.2, 0.3, 0.5, 0.7, 0.9])
    d = jnp.full((6,), 1 / 64)
    y = jnp.arange(6)
    v = obj._velocity(toy, 1.1, x, t, d, y, n_cfg=6)
    c, u = toy(1.1, x, t, d, y), toy(1.1, x, t, d, jnp.full_like(y, NULL))
    inside = np.array([0, 0, 1, 1, 1, 0], bool)[:, None, None, None]
    np.testing.assert_allclose(np.asarray(v), np.where(inside, np.asarray(u + 2.0 * (c - u)), np.asarray(c)),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("kw", [{"guidance": "intrinsic"}, {"guidance": "intrinsic", "guidance_interval": (0.2, 0.6)},
                                {"guidance_interval": (0.2, 0.6)}, {}])
def test_sampler_calls_match_network_evaluations(kw):
    obj = objective(**kw)
    rows, seen_w = [], []

    def counting(params, x, t, d, labels, cond=None):
        jax.debug.callback(lambda n: rows.append(int(n)), jnp.asarray(x.shape[0]))
        if cond is not None:
            jax.debug.callback(lambda w: seen_w.append(np.asarray(w)), cond[W])
        return toy(params, x, t, d, labels, cond)

    noise = jax.random.normal(KEY, (4, 4, 4, 1))
    labels = jnp.arange(4)
    for n, w in ((1, 1.0), (4, 2.0), (8, 3.0), (10, 1.5)):
        rows.clear(), seen_w.clear()
        jax.block_until_ready(jax.jit(lambda z: obj.sample(counting, 1.2, z, labels, n, cfg_scale=w))(noise))
        jax.effects_barrier()
        calls = sum(rows) / 4
        assert calls == obj.network_evaluations(n, w), (kw, n, w)
        if kw.get("guidance") == "intrinsic":
            assert calls == n and all(np.all(s == w) for s in seen_w)
        elif w != 1.0:  # cfg: two calls for each step whose start i/N is in the interval
            lo, hi = kw.get("guidance_interval", (0.0, 1.0))
            assert calls == n + sum(lo <= i / n <= hi for i in range(n))


def test_cfg_sampler_is_unguided_outside_the_interval():
    """Hand-rolled Euler: guided (u + w (c - u)) at starts inside [0.25, 0.5], conditional outside."""
    obj = objective(guidance_interval=(0.25, 0.5))
    noise = jax.random.normal(KEY, (3, 4, 4, 1))
    y = jnp.arange(3)
    n, w = 8, 2.5
    x = noise
    for i in range(n):
        t, d = jnp.full((3,), i / n), jnp.full((3,), 1 / n)
        c = toy(1.2, x, t, d, y)
        v = toy(1.2, x, t, d, jnp.full_like(y, NULL)) * (1 - w) + w * c if 0.25 <= i / n <= 0.5 else c
        x = x + v / n
    np.testing.assert_allclose(np.asarray(obj.sample(toy, 1.2, noise, y, n, cfg_scale=w)), np.asarray(x),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- defaults, hashes and errors


def test_defaults_keep_todays_targets_and_hashes():
    data = batch(24)
    ctx = Context(lambda p, x, t, d, y: jnp.sin(x * p + t[:, None, None, None]), 1.3, 0.7)
    a = objective().targets(KEY, data, ctx)
    b = objective(guidance="cfg", guidance_interval=None, guidance_range=(0.0, 3.5),
                  guidance_step=0.25).targets(KEY, data, ctx)
    for x, y in zip(a, b):
        if x is None:
            assert y is None
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    spec = load_spec("digits_shortcut")
    same = ["method.guidance=cfg", "method.guidance_range=[0.0, 3.5]", "method.guidance_step=0.25"]
    assert load_spec("digits_shortcut", same).hash() == spec.hash()
    assert load_spec("digits_shortcut", ["method.guidance=intrinsic"]).hash() != spec.hash()
    assert load_spec("digits_shortcut", ["method.guidance_interval=[0.2, 0.8]"]).hash() != spec.hash()
    assert load_spec("digits_shortcut_intrinsic_guidance").method.guidance == "intrinsic"
    assert load_spec("digits_shortcut_interval_guidance").method.guidance_interval == (0.16, 0.78)


def test_guidance_keys_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="bootstrap_cfg"):
        objective(guidance="intrinsic", bootstrap_cfg=True)
    with pytest.raises(ValueError, match="t_lo < t_hi"):
        objective(guidance_interval=(0.8, 0.2))
    with pytest.raises(InputError, match="celeba_ditb_shortcut: method.guidance: intrinsic guidance needs class labels"):
        ShortcutObjective.from_spec(load_spec("celeba_ditb_shortcut", ["method.guidance=intrinsic"]))
