"""Improved MeanFlow and sCT / sCD against the Gaussian oracle (tests/oracle.py): each loss is zero at the exact
average velocity / consistency function and not at a perturbed one; the TrigFlow conversion of a flow teacher
integrates to the same samples; the forward-mode tangent of the TrigFlow F equals a finite difference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baselines.continuous_consistency import (ContinuousConsistencyConfig, ContinuousConsistencyDistillationConfig,
                                              ContinuousConsistencyDistillationObjective,
                                              ContinuousConsistencyTrainingObjective, flow_time, normalised_tangent,
                                              trig_alpha, trig_time, trigflow_F)
from baselines.improved_meanflow import (ImprovedMeanFlowConfig, ImprovedMeanFlowObjective, guidance_input, imf_target,
                                         sample_guidance)
from shortcut.forward_mode import directional_derivative
from shortcut.model import DiT, example_inputs
from shortcut.objective import Context, expand
from tests.oracle import MU, S, SHAPE, exact_flow_map, exact_shortcut, exact_velocity, gaussian_batch

KEY = jax.random.PRNGKey(0)
SD = 0.5


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def exact_average_velocity(params, x, t, d, labels, cond=None):
    """The exact u(x, t, d) over [t, t + d], the instantaneous velocity at d = 0."""
    safe = jnp.where(d > 0, d, 1.0)
    return jnp.where(expand(d, x) > 0, exact_shortcut(None, x, t, safe, None), exact_velocity(x, t))


def path_points(n, key=KEY, t_max=0.9):
    kt, kz, kw = jax.random.split(key, 3)
    t = jax.random.uniform(kt, (n,), maxval=t_max)
    z, w = jax.random.normal(kz, (n, *SHAPE)), jax.random.normal(kw, (n, *SHAPE))
    return (1 - expand(t, z)) * z + expand(t, z) * (MU + S * w), t


# ---------------------------------------------------------------- improved MeanFlow


def test_imf_loss_is_zero_at_the_exact_average_velocity_and_not_at_a_perturbed_one():
    """With the exact u, its own velocity u(x, t, 0) as the tangent and the exact velocity as v_g, the iMF target
    is u itself (V = u + d du/dt is the exact velocity), for intervals of any length including 0."""
    x, t = path_points(512)
    d = jax.random.uniform(jax.random.PRNGKey(5), (512,), minval=0.0, maxval=1.0) * (1 - t)
    d = d.at[:64].set(0.0)
    v = exact_velocity(x, t)
    u, target = imf_target(exact_average_velocity, None, x, t, d, None, v, v)
    close(u, target, 1e-3)
    wrong = lambda p, x, t, d, y: exact_average_velocity(p, x, t, d, y) * (1 + 0.2 * expand(t + d, x))
    u, target = imf_target(wrong, None, x, t, d, None, wrong(None, x, t, jnp.zeros_like(d), None), v)
    assert float(jnp.mean(jnp.square(u - target))) > 1e-3


def test_imf_guided_targets_rows_and_sampling_with_guidance_as_an_input():
    model = DiT(hidden_size=32, depth=1, num_heads=2, out_channels=1, num_classes=10, d_conditioning="step_size",
                conditioning=("guidance",), attention_impl="xla")
    params = model.init(KEY, *example_inputs(model, (8, 8, 1)))["params"]
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, jax.random.split(KEY, len(leaves)))])
    calls = []

    def apply_fn(p, x, t, d, y, cond=None):
        calls.append(cond)
        return model.apply({"params": p}, x, t, d, y, cond)

    obj = ImprovedMeanFlowObjective(ImprovedMeanFlowConfig(name="improved_meanflow", class_dropout=0.25),
                                    num_classes=10)
    batch = {"image": jax.random.uniform(KEY, (64, 8, 8, 1), minval=-1, maxval=1), "label": jnp.arange(64) % 10}
    tg = obj.targets(KEY, batch, Context(apply_fn, params, params))
    assert all(c is not None for c in calls)  # every call sees the guidance input
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (tg.v, tg.weight, tg.t, tg.d, tg.cond["guidance"]))
    d = np.asarray(tg.d)
    assert (d[:32] == 0).all() and (d[32:] > 0).all() and (np.asarray(tg.t) + d <= 1 + 1e-6).all()
    np.testing.assert_array_equal(tg.group, [0] * 32 + [1] * 32)
    g = np.asarray(tg.cond["guidance"])
    assert ((g >= 0) & (g <= guidance_input(8.0) + 1e-6)).all() and g.std() > 0.1
    dropped = np.asarray(tg.labels) == 10
    assert dropped.any() and dropped[: dropped.sum()].all()  # the first rows, as the official cond_drop
    w = sample_guidance(KEY, 100_000, 7.0, 1.0)
    assert float(w.min()) >= 1.0 and float(w.max()) <= 8.0
    assert float(jnp.mean(jnp.log(w))) == pytest.approx(np.log(8.0) / 2, rel=0.02)  # log w uniform
    noise = jax.random.normal(KEY, (4, 8, 8, 1))
    at = lambda w: obj.sample(apply_fn, params, noise, jnp.arange(4), 1, cfg_scale=w)
    assert float(jnp.max(jnp.abs(at(3.0) - at(1.0)))) > 1e-5  # w changes the one network call


def test_imf_needs_step_size_conditioning():
    from shortcut.errors import KeyedValueError
    from shortcut.spec_files import load_spec

    with pytest.raises(KeyedValueError, match="step_size"):
        ImprovedMeanFlowObjective.from_spec(load_spec("digits_improved_meanflow", ["model.d_conditioning=level"]))


# ---------------------------------------------------------------- TrigFlow and sCT / sCD


def consistency_exact(params, x, s, d, labels):
    """The exact consistency model on our path: the average velocity from s to 1."""
    return exact_shortcut(None, x, s, 1 - s, None)


def test_trigflow_times_are_inverse_and_the_scale_maps_the_paths():
    t = jnp.linspace(0.01, jnp.pi / 2, 50)
    close(trig_time(flow_time(t, SD), SD), t, 1e-5)
    s = flow_time(t, SD)
    x1, eps = 0.3, -1.2
    close(jnp.cos(t) * x1 + jnp.sin(t) * SD * eps, trig_alpha(t, SD) * (s * x1 + (1 - s) * eps), 1e-6)
    assert float(trig_time(jnp.float32(0.5), SD)) == pytest.approx(np.arctan(2.0), rel=1e-6)


def rk4(f, x, times):
    for a, b in zip(times[:-1], times[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("teacher", ["exact", pytest.param("dit", marks=pytest.mark.slow)])  # dit: 512 eager calls
def test_the_converted_teachers_probability_flow_reaches_the_same_samples(teacher):
    """dx/dt = sigma_d F(x, t) from t = pi/2 (x = sigma_d eps) to 0 ends where dx/ds = v(x, s) from s = 0 (x = eps)
    to 1 ends: the conversion is exact, for the Gaussian's exact velocity and for a (nonlinear) random DiT."""
    eps = jax.random.normal(KEY, (8, *SHAPE))
    if teacher == "exact":
        velocity = lambda x, s: exact_velocity(x, s)
    else:
        model = DiT(hidden_size=32, depth=1, num_heads=2, out_channels=1, num_classes=0, attention_impl="xla")
        params = model.init(KEY, *example_inputs(model, SHAPE))["params"]
        leaves, tree = jax.tree.flatten(params)
        params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                           for p, k in zip(leaves, jax.random.split(KEY, len(leaves)))])
        y, d = jnp.zeros((8,), jnp.int32), jnp.full((8,), 1 / 128)
        velocity = lambda x, s: model.apply({"params": params}, x, s, d, y)
    ones = jnp.ones((8,))
    ours = rk4(lambda x, s: velocity(x, s * ones), eps, np.linspace(0.0, 1.0, 65))
    trig = rk4(lambda x, t: SD * trigflow_F(velocity, x, t * ones, SD), SD * eps, np.linspace(np.pi / 2, 0.0, 65))
    close(trig, ours, 1e-3)
    if teacher == "exact":
        close(ours, exact_flow_map(eps, 0 * ones, ones), 1e-3)


def test_the_forward_mode_tangent_of_trigflow_F_equals_a_finite_difference():
    x, s = path_points(16)
    t = trig_time(s, SD)
    x_t = expand(trig_alpha(t, SD), x) * x
    F = lambda x, t: trigflow_F(lambda xs, ss: consistency_exact(None, xs, ss, None, None), x, t, SD)
    tangents = (SD * F(x_t, t), jnp.ones_like(t))
    _, exact = directional_derivative(F, (x_t, t), tangents)
    _, approx = directional_derivative(F, (x_t, t), tangents, method="finite_difference", step=1e-3)
    close(approx, exact, 2e-2)


TEACHER = object()


def student_and_teacher(student):
    """One ApplyFn for both: the exact velocity for the teacher's parameters, `student` otherwise."""
    return lambda p, x, s, d, y: exact_velocity(x, s) if p is TEACHER else student(p, x, s, d, y)


def scd(**kw):
    return ContinuousConsistencyDistillationObjective(ContinuousConsistencyDistillationConfig(
        name="consistency_distillation_continuous", class_dropout=0.0, tangent_warmup_steps=0, time_mean=0.0,
        time_std=0.5, **kw), num_classes=0)


def test_scd_loss_is_zero_at_the_exact_consistency_function_and_not_at_a_perturbed_one():
    """With the exact teacher, f is constant along its trajectories: the tangent is 0 and the target is the
    student's own prediction; a perturbed student gets a nonzero loss."""
    batch = dict(zip(("image", "label"), gaussian_batch(KEY, 256)))
    obj = scd()
    for student, zero in ((consistency_exact, True), (lambda p, x, s, d, y: 1.5 * consistency_exact(p, x, s, d, y), False)):
        apply_fn = student_and_teacher(student)
        tg = obj.targets(KEY, batch, Context(apply_fn, None, None, 0, TEACHER))
        err = jnp.mean(jnp.square(apply_fn(None, tg.x_t, tg.t, tg.d, tg.labels) - tg.v) * expand(tg.weight, tg.v))
        assert (float(err) < 1e-8) if zero else (float(err) > 1e-4), float(err)


def test_sct_tangent_averages_to_zero_at_the_exact_consistency_function():
    """sCT's tangent uses each sample's own velocity cos t z - sin t x1; before normalisation it is affine in it,
    so over the posterior of (x1, z) given x_t it averages to sCD's exact-teacher tangent, 0; not for a
    perturbed model."""
    t = jnp.full((1,), 0.9)
    x_t = jnp.full((1, *SHAPE), 0.4)
    cos, sin = jnp.cos(t[0]), jnp.sin(t[0])
    var = 1 / (1 / S**2 + cos**2 / (sin**2 * SD**2))
    mean = var * (MU / S**2 + cos * x_t / (sin**2 * SD**2))
    k = 20_000
    x1 = mean + jnp.sqrt(var) * jax.random.normal(KEY, (k, *SHAPE))
    z = (x_t - cos * x1) / sin
    xs, ts = jnp.broadcast_to(x_t, x1.shape), jnp.full((k,), t[0])
    for student, zero in ((consistency_exact, True), (lambda p, x, s, d, y: 1.5 * consistency_exact(p, x, s, d, y), False)):
        F = lambda x, tt: trigflow_F(lambda a, s: student(None, a, s, None, None), x, tt, SD)
        dxdt = cos * z - sin * x1
        Fv, dF = directional_derivative(F, (xs, ts), (dxdt, jnp.ones_like(ts)))
        g = normalised_tangent(Fv, dF, xs, dxdt, ts, sigma_d=SD, warmup=1.0, c=1e12) * 1e12  # c >> ||g||: raw g
        mean_g = float(jnp.max(jnp.abs(jnp.mean(g, axis=0))))
        assert (mean_g < 0.02) if zero else (mean_g > 0.05), mean_g


def test_sct_loss_has_the_learned_weighting_and_the_warmup():
    model = DiT(hidden_size=32, depth=1, num_heads=2, out_channels=1, num_classes=10, log_variance=True,
                attention_impl="xla")
    params = model.init(KEY, *example_inputs(model, (8, 8, 1)))["params"]
    apply_fn = lambda p, x, t, d, y: model.apply({"params": p}, x, t, d, y)
    obj = ContinuousConsistencyTrainingObjective(ContinuousConsistencyConfig(
        name="consistency_training_continuous", tangent_warmup_steps=100), num_classes=10)
    assert float(obj.warmup(0)) == 0.0 and float(obj.warmup(50)) == 0.5 and float(obj.warmup(500)) == 1.0
    batch = {"image": jax.random.uniform(KEY, (16, 8, 8, 1), minval=-1, maxval=1), "label": jnp.arange(16) % 10}
    tg = obj.targets(KEY, batch, Context(apply_fn, params, params, 10))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (tg.v, tg.weight, tg.t))
    assert float(jnp.min(tg.t)) > 0 and float(jnp.max(tg.t)) < 1
    (loss, mse), grads = jax.value_and_grad(lambda p: obj.loss(apply_fn, p, tg), has_aux=True)(params)
    assert float(loss) == pytest.approx(float(jnp.mean(tg.weight * mse)), rel=1e-6)  # w = 0 at initialisation
    assert float(jnp.max(jnp.abs(grads["log_variance"]["Dense_0"]["bias"]))) > 0  # and it is learned
