"""Objectives against an analytic oracle (tests/oracle.py).

For data x1 ~ N(mu, s^2 I) and noise x0 ~ N(0, I) on the path x_t = (1 - t) x0 + t x1, per dimension:
    x_t ~ N(t mu, sigma_t^2),  sigma_t^2 = (1 - t)^2 + t^2 s^2
    exact velocity   v(x, t)      = mu + (t s^2 - (1 - t)) / sigma_t^2 * (x - t mu)
    exact flow map   Phi_t^d(x)   = (t + d) mu + sigma_{t+d} / sigma_t * (x - t mu)
    exact shortcut   s*(x, t, d)  = (Phi_t^d(x) - x) / d
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baselines.flow_matching import FlowMatchingConfig, FlowMatchingObjective
from shortcut.objective import Context, ShortcutConfig, ShortcutObjective, flow_targets
from tests.oracle import MU, S, SHAPE, exact_shortcut, exact_velocity, gaussian_batch, sigma, velocity_model


def shortcut(**kw):
    kw.setdefault("bootstrap_clip", None)
    return ShortcutObjective(ShortcutConfig(name="shortcut", **kw), num_classes=0)


def test_flow_targets_average_to_exact_velocity():
    """(a) E[x1 - x0 | x_t] is the exact velocity: regress MC targets on x_t per grid time."""
    images, labels = gaussian_batch(jax.random.PRNGKey(0), 200_000)
    tg = flow_targets(jax.random.PRNGKey(1), images, labels, m=8, class_dropout=0.0, null_class=0)
    x, v, t = np.asarray(tg.x_t[..., 0]), np.asarray(tg.v[..., 0]), np.asarray(tg.t)
    for grid_t in (0.0, 0.25, 0.5, 0.875):
        rows = t == grid_t
        xs, vs = x[rows].ravel(), v[rows].ravel()
        slope, intercept = np.polyfit(xs, vs, 1)
        exact_slope = (grid_t * S**2 - (1 - grid_t)) / float(sigma(grid_t)) ** 2
        exact_intercept = MU - exact_slope * grid_t * MU
        assert slope == pytest.approx(exact_slope, abs=0.01), grid_t
        assert intercept == pytest.approx(exact_intercept, abs=0.01), grid_t
        # Residual variance is what conditioning cannot explain; the mean residual must vanish.
        assert np.mean(vs - (slope * xs + intercept)) == pytest.approx(0.0, abs=1e-6)


def test_flow_targets_path_and_grid():
    images, labels = gaussian_batch(jax.random.PRNGKey(0), 4096)
    tg = flow_targets(jax.random.PRNGKey(1), images, labels, m=128, class_dropout=0.0, null_class=0)
    t = np.asarray(tg.t)
    assert np.allclose(t * 128, np.round(t * 128)) and t.min() >= 0 and t.max() <= 127 / 128
    assert len(np.unique(t)) > 100
    np.testing.assert_allclose(np.asarray(tg.d), 1 / 128)
    x0 = images - tg.v  # v = x1 - x0
    tt = t.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(tg.x_t), np.asarray((1 - tt) * x0 + tt * images), atol=1e-5)


def test_label_dropout_fraction_and_null_class():
    labels = jnp.arange(20_000) % 10
    images = jnp.zeros((20_000, 1, 1, 1))
    tg = flow_targets(jax.random.PRNGKey(3), images, labels, m=128, class_dropout=0.1, null_class=10)
    dropped = np.asarray(tg.labels) == 10
    assert dropped.mean() == pytest.approx(0.1, abs=0.01)
    np.testing.assert_array_equal(np.asarray(tg.labels)[~dropped], np.asarray(labels)[~dropped])


def test_bootstrap_target_is_two_half_step_euler_composition():
    """(b1) With any model, the bootstrap target is the average of two chained half-step velocities."""
    obj = shortcut()
    images, labels = gaussian_batch(jax.random.PRNGKey(0), 256)
    tg = obj.targets(jax.random.PRNGKey(1), {"image": images, "label": labels}, Context(velocity_model, None, None))
    nb = obj.bootstrap_size(256)
    x, t, d = tg.x_t[:nb], tg.t[:nb], tg.d[:nb]
    h = (d / 2).reshape(-1, 1, 1, 1)
    v1 = exact_velocity(x, t)
    v2 = exact_velocity(x + h * v1, t + d / 2)
    np.testing.assert_allclose(np.asarray(tg.v[:nb]), np.asarray((v1 + v2) / 2), rtol=1e-5, atol=1e-5)


def test_bootstrap_target_from_exact_model_is_exact_shortcut():
    """(b2) Two exact half-shortcuts compose into the exact shortcut over d."""
    obj = shortcut()
    images, labels = gaussian_batch(jax.random.PRNGKey(0), 512)
    tg = obj.targets(jax.random.PRNGKey(1), {"image": images, "label": labels}, Context(exact_shortcut, None, None))
    nb = obj.bootstrap_size(512)
    expected = exact_shortcut(None, tg.x_t[:nb], tg.t[:nb], tg.d[:nb], None)
    np.testing.assert_allclose(np.asarray(tg.v[:nb]), np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_bootstrap_uses_ema_params_not_online():
    def scaled(params, x, t, d, labels):
        return params * jnp.ones_like(x)

    obj = shortcut()
    images, labels = gaussian_batch(jax.random.PRNGKey(0), 64)
    nb = obj.bootstrap_size(64)
    tg = obj.targets(jax.random.PRNGKey(1), {"image": images, "label": labels}, Context(scaled, 1.0, 2.0))
    np.testing.assert_allclose(np.asarray(tg.v[:nb]), 2.0)
    tg = shortcut(bootstrap_ema=False).targets(jax.random.PRNGKey(1), {"image": images, "label": labels},
                                               Context(scaled, 1.0, 2.0))
    np.testing.assert_allclose(np.asarray(tg.v[:nb]), 1.0)


@pytest.mark.parametrize("steps", [1, 2, 4, 128])
def test_sampling_with_exact_shortcut_lands_on_exact_flow_map(steps):
    """Any number of shortcut steps of an exact model reproduces Phi_0^1(x0) = mu + s x0."""
    obj = shortcut()
    noise = jax.random.normal(jax.random.PRNGKey(0), (16, *SHAPE))
    out = obj.sample(exact_shortcut, None, noise, jnp.zeros((16,), jnp.int32), steps)
    np.testing.assert_allclose(np.asarray(out), np.asarray(MU + S * noise), rtol=1e-4, atol=1e-4)


def test_one_euler_step_of_the_velocity_is_not_the_flow_map():
    """The oracle is sharp: naive 1-step Euler on the exact velocity misses the flow map."""
    obj = FlowMatchingObjective(FlowMatchingConfig(name="flow_matching"), num_classes=0)
    noise = jax.random.normal(jax.random.PRNGKey(0), (16, *SHAPE))
    labels = jnp.zeros((16,), jnp.int32)
    one = obj.sample(velocity_model, None, noise, labels, 1)
    many = obj.sample(velocity_model, None, noise, labels, 128)
    assert float(jnp.max(jnp.abs(one - (MU + S * noise)))) > 0.1
    np.testing.assert_allclose(np.asarray(many), np.asarray(MU + S * noise), atol=0.02)


def test_batch_split_levels_and_t_grids():
    """(c) bootstrap share, even spread over k = 0..6, t on multiples of d, flow rows at d = 1/M."""
    obj = shortcut(bootstrap_fraction=0.25)
    b = 256
    images, labels = gaussian_batch(jax.random.PRNGKey(0), b)
    tg = obj.targets(jax.random.PRNGKey(1), {"image": images, "label": labels}, Context(velocity_model, None, None))
    group, d, t = np.asarray(tg.group), np.asarray(tg.d), np.asarray(tg.t)
    nb = 64
    assert (group == 1).sum() == nb and (group[:nb] == 1).all() and (group[nb:] == 0).all()
    levels = -np.log2(d[:nb])
    assert np.allclose(levels, np.round(levels))
    counts = np.bincount(levels.astype(int), minlength=7)
    assert len(counts) == 7 and counts.max() - counts.min() <= 1  # k = 0..6, d = 1 .. 1/64
    assert counts[0] == counts.max()  # remainder goes to the one-step level first
    assert np.allclose(t[:nb] / d[:nb], np.round(t[:nb] / d[:nb]))  # multiples of d
    assert (t[:nb] + d[:nb] <= 1 + 1e-6).all()
    np.testing.assert_allclose(d[nb:], 1 / 128)
    assert np.allclose(t[nb:] * 128, np.round(t[nb:] * 128))


def test_t_is_uniform_over_each_levels_grid():
    obj = shortcut(bootstrap_fraction=0.5)
    images, labels = gaussian_batch(jax.random.PRNGKey(0), 7 * 2 * 400)
    tg = obj.targets(jax.random.PRNGKey(2), {"image": images, "label": labels}, Context(velocity_model, None, None))
    nb = obj.bootstrap_size(images.shape[0])
    d, t = np.asarray(tg.d[:nb]), np.asarray(tg.t[:nb])
    two_step = t[d == 0.5]
    assert set(np.unique(two_step)) == {0.0, 0.5}
    assert np.mean(two_step == 0.0) == pytest.approx(0.5, abs=0.1)
    assert set(np.unique(t[d == 1.0])) == {0.0}


def test_bootstrap_cfg_guides_only_the_finest_level():
    def label_model(params, x, t, d, labels):
        return jnp.where((labels == 10).reshape(-1, 1, 1, 1), 0.0, 1.0) * jnp.ones_like(x)

    obj = ShortcutObjective(ShortcutConfig(name="shortcut", bootstrap_cfg=True, cfg_scale=3.0, bootstrap_clip=None),
                            num_classes=10)
    images = jnp.zeros((128, 2, 2, 1))
    labels = jnp.arange(128) % 10
    tg = obj.targets(jax.random.PRNGKey(0), {"image": images, "label": labels}, Context(label_model, None, None))
    nb = obj.bootstrap_size(128)
    d, v = np.asarray(tg.d[:nb]), np.asarray(tg.v[:nb, 0, 0, 0])
    np.testing.assert_allclose(v[d == 1 / 64], 3.0)  # uncond 0 + 3 * (1 - 0)
    np.testing.assert_allclose(v[d != 1 / 64], 1.0)


def test_zero_bootstrap_fraction_is_flow_matching():
    images, labels = gaussian_batch(jax.random.PRNGKey(0), 32)
    batch, ctx = {"image": images, "label": labels}, Context(velocity_model, None, None)
    a = shortcut(bootstrap_fraction=0.0).targets(jax.random.PRNGKey(1), batch, ctx)
    b = FlowMatchingObjective(FlowMatchingConfig(name="flow_matching"), num_classes=0).targets(
        jax.random.PRNGKey(1), batch, ctx)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_network_evaluations_counted_by_the_sampler():
    calls = []

    def counting(params, x, t, d, labels):
        calls.append(float(d[0]))
        return jnp.zeros_like(x)

    noise = jnp.zeros((2, *SHAPE))
    labels = jnp.zeros((2,), jnp.int32)
    with jax.disable_jit():
        shortcut().sample(counting, None, noise, labels, 4)
    assert calls == [0.25] * 4 == [0.25] * shortcut().network_evaluations(4)
    calls.clear()
    with jax.disable_jit():
        FlowMatchingObjective(FlowMatchingConfig(name="flow_matching"), num_classes=0).sample(
            counting, None, noise, labels, 4)
    assert calls == [1 / 128] * 4
