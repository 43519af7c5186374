"""The shortcut targets against the official code's `get_targets` (kvfrans/shortcut-models @6010043).

tests/fixtures/official/targets_shortcut.npz holds, for several batch sizes, the official function's
outputs (x_t, t, dt_base, labels, v_target) for given images and labels, with a fixed stand-in network
(`standin_velocity` below, two parameter sets: online and EMA) as its train state's model. How it was
made: tests/fixtures/official/README.md. The official code is not needed here.

Checked: the official level counts (`bootstrap_levels: official`), the bootstrap targets for the same
(x_t, t, d, labels) and parameters (EMA teacher, clipping, bootstrap_cfg on the finest level), and the
layout of a whole batch (bootstrap rows first, undropped labels, flow rows at d = 1/M). The official
flow rows reuse the first eighth of the batch; this project's do not (a deliberate difference).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut.objective import Context, ShortcutConfig, ShortcutObjective

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "targets_shortcut.npz"
M = 128  # denoise_timesteps of every case
NUM_CLASSES = 10  # the null class is label 10


def standin_velocity(p: dict, x: jax.Array, t: jax.Array, level: jax.Array, labels: jax.Array) -> jax.Array:
    """A small fixed network s(x, t, level, y) [B, H, W, C]: mixes channels and neighbouring pixels and
    depends on t, the level k = -log2(d) and the label (the null class too), so every input matters."""
    cond = p["emb"][labels] + t[:, None] * p["u"] + level[:, None] * p["s"]
    h = jnp.einsum("bhwc,cd->bhwd", x, p["w"]) + 0.5 * jnp.roll(x, 1, axis=1) + cond[:, None, None, :]
    return 3.0 * jnp.tanh(h) + 0.8 * x


def apply_fn(p, x, t, d, labels):
    """This project's ApplyFn for the stand-in: the network is conditioned on the level -log2(d)."""
    return standin_velocity(p, x, t, -jnp.log2(d), labels)


@pytest.fixture(scope="module")
def official():
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    params = {name: {k.split("/", 1)[1]: jnp.asarray(v) for k, v in data.items() if k.startswith(name + "/")}
              for name in ("online", "ema")}
    return data, params


def bootstrap_target(obj: ShortcutObjective, params, x_t, t, levels, labels) -> np.ndarray:
    """obj.bootstrap_target for the stand-in network, compiled (one dispatch instead of dozens)."""
    fn = jax.jit(lambda p, x, t, y: obj.bootstrap_target(apply_fn, p, x, t, levels, y))
    return np.asarray(fn(params, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(labels)))


def objective(bootstrap_cfg: bool) -> ShortcutObjective:
    config = ShortcutConfig(name="shortcut", denoise_timesteps=M, bootstrap_fraction=0.125, bootstrap_levels="official",
                            bootstrap_cfg=bootstrap_cfg, cfg_scale=1.5, class_dropout=0.1)
    return ShortcutObjective(config, num_classes=NUM_CLASSES)


def test_official_level_counts(official):
    data, _ = official
    sizes = [int(b) for b in data["levels/batch_sizes"]]
    assert {32, 64, 256} <= set(sizes)
    obj = objective(False)
    for b in sizes:
        nb = obj.bootstrap_size(b)
        assert nb == b // 8
        np.testing.assert_array_equal(obj.bootstrap_levels(nb), data[f"levels/b{b}"], err_msg=f"batch {b}")
    # floor(nb / 7) per level, the remainder at d = 1: batch 256 -> 4 at each of k = 6..1, 4 + 4 at k = 0
    assert np.bincount(obj.bootstrap_levels(32), minlength=7).tolist() == [8, 4, 4, 4, 4, 4, 4]
    assert np.bincount(obj.bootstrap_levels(4), minlength=7).tolist() == [4, 0, 0, 0, 0, 0, 0]  # batch 32: d = 1 only
    even = ShortcutObjective(ShortcutConfig(name="shortcut", bootstrap_levels="even"), num_classes=0)
    assert np.bincount(even.bootstrap_levels(32), minlength=7).tolist() == [5, 5, 5, 5, 4, 4, 4]


@pytest.mark.parametrize("case", ["b32_cfg1", "b64_cfg1", "b256_cfg1", "b256_cfg0"])
def test_bootstrap_targets_match_official(official, case):
    data, params = official
    b, cfg = int(case[1:].split("_")[0]), case.endswith("cfg1")
    get = lambda k: data[f"{case}/{k}"]  # noqa: E731
    obj = objective(cfg)
    nb = obj.bootstrap_size(b)
    levels = obj.bootstrap_levels(nb)
    np.testing.assert_array_equal(levels, get("dt_base")[:nb])
    rows = (get("x_t")[:nb], get("t")[:nb], levels, get("labels")[:nb])
    v = bootstrap_target(obj, params["ema"], *rows)
    np.testing.assert_allclose(v, get("v_t")[:nb], rtol=0, atol=2e-6)
    # the teacher matters: the online parameters give other targets (the official default bootstrap_ema=1)
    assert np.max(np.abs(bootstrap_target(obj, params["online"], *rows) - get("v_t")[:nb])) > 1e-2
    if cfg and nb // 7:  # the guided rows (finest level) differ from unguided targets
        unguided = bootstrap_target(objective(False), params["ema"], *rows)
        diff = np.abs(unguided - get("v_t")[:nb]).reshape(nb, -1).max(axis=1)
        assert diff[: nb // 7].min() > 1e-3 and diff[nb // 7:].max() < 2e-6


def test_batch_layout_matches_official_except_the_reused_rows(official):
    data, params = official
    get = lambda k: data[f"b256_cfg1/{k}"]  # noqa: E731
    images, labels = jnp.asarray(get("images")), jnp.asarray(get("input_labels"))
    b = images.shape[0]
    obj = objective(True)
    nb = obj.bootstrap_size(b)
    targets = jax.jit(lambda batch, p, ema: obj.targets(jax.random.PRNGKey(0), batch, Context(apply_fn, p, ema)))
    tg = targets({"image": images, "label": labels}, params["online"], params["ema"])
    # bootstrap rows first at the official levels and t grid, labels never dropped; then flow rows at d = 1/M
    np.testing.assert_allclose(np.asarray(tg.d), 2.0 ** -get("dt_base"))
    np.testing.assert_array_equal(np.asarray(tg.labels)[:nb], get("labels")[:nb])
    t, d = np.asarray(tg.t), np.asarray(tg.d)
    assert np.allclose(t / d, np.round(t / d)) and np.all(t < 1)
    # the targets of our own bootstrap rows come from the EMA teacher
    v = bootstrap_target(obj, params["ema"], tg.x_t[:nb], tg.t[:nb], obj.bootstrap_levels(nb), tg.labels[:nb])
    np.testing.assert_allclose(np.asarray(tg.v[:nb]), v, atol=1e-6)
    # flow rows: x_t + (1 - t) v recovers the data x1 (official: up to its 1e-5 path offset). The official
    # code takes them from images[:B - nb], reusing the bootstrap rows' images; this project from images[nb:].
    def data_of(x_t, t, v):
        return x_t + (1 - t.reshape(-1, 1, 1, 1)) * v

    official_x1 = data_of(get("x_t")[nb:], get("t")[nb:], get("v_t")[nb:])
    np.testing.assert_allclose(official_x1, get("images")[: b - nb], atol=1e-4)
    ours_x1 = data_of(np.asarray(tg.x_t[nb:]), t[nb:], np.asarray(tg.v[nb:]))
    np.testing.assert_allclose(ours_x1, get("images")[nb:], atol=1e-5)
