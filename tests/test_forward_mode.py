"""The forward-mode utility (shortcut/forward_mode.py) and the DiT's extra conditioning inputs: every layer of
the DiT and both attention paths have forward-mode rules (jax.jvp agrees with a central finite difference),
the finite-difference fallback agrees with jvp on MeanFlow's targets, and a network that asks for extra
inputs is today's network until they are trained."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baselines.meanflow import MeanFlowConfig, MeanFlowObjective
from shortcut.forward_mode import directional_derivative
from shortcut.model import DiT, attention, example_inputs, loss_log_variance
from shortcut.objective import Context
from shortcut.spec_files import load_spec

KEY = jax.random.PRNGKey(0)


def perturbed(params, scale=0.05):
    """Parameters moved off their initialisation (adaLN-zero and zero-initialised inputs make a fresh DiT constant)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(KEY, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def tiny_dit(**kw):
    return DiT(hidden_size=32, depth=2, num_heads=2, out_channels=1, num_classes=3, patch_size=2, attention_impl="xla",
               **kw)


def inputs(b=4):
    kx, kt, kd = jax.random.split(jax.random.PRNGKey(1), 3)
    return (jax.random.normal(kx, (b, 8, 8, 1)), jax.random.uniform(kt, (b,)),
            jax.random.uniform(kd, (b,), minval=0.05, maxval=1.0), jnp.arange(b) % 4)


def relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("architecture", ["dit", "official"])
def test_jvp_through_every_layer_of_the_dit_matches_a_finite_difference(architecture):
    model = tiny_dit(architecture=architecture, d_conditioning="step_size")
    params = perturbed(model.init(KEY, *example_inputs(model, (8, 8, 1)))["params"])
    x, t, d, y = inputs()
    fn = lambda x, t, d: model.apply({"params": params}, x, t, d, y)
    tangents = (jax.random.normal(jax.random.PRNGKey(2), x.shape), jnp.ones_like(t), -jnp.ones_like(d))
    out, exact = directional_derivative(fn, (x, t, d), tangents)
    out_fd, approx = directional_derivative(fn, (x, t, d), tangents, method="finite_difference", step=1e-2)
    np.testing.assert_allclose(out, out_fd, rtol=1e-6, atol=1e-6)
    assert relative_error(approx, exact) < 1e-2


@pytest.mark.parametrize("architecture", ["dit", "official"])
def test_attention_has_a_forward_mode_rule(architecture):
    q, k, v = jax.random.normal(KEY, (3, 2, 5, 2, 4))
    dq, dk, dv = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 5, 2, 4))
    fn = lambda q, k, v: attention(q, k, v, architecture, "xla")
    _, exact = jax.jvp(fn, (q, k, v), (dq, dk, dv))
    _, approx = directional_derivative(fn, (q, k, v), (dq, dk, dv), method="finite_difference", step=1e-2)
    assert relative_error(approx, exact) < 1e-3


def test_finite_difference_of_a_quadratic_is_exact_and_an_unknown_method_is_refused():
    fn = lambda x, s: x**2 + s
    _, fd = directional_derivative(fn, (jnp.float32(3.0), jnp.float32(2.0)), (jnp.float32(1.0), jnp.float32(0.5)),
                                   method="finite_difference", step=0.25)
    assert float(fd) == pytest.approx(2 * 3 + 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="jvp or finite_difference"):
        directional_derivative(fn, (1.0, 1.0), (1.0, 1.0), method="reverse")


def test_meanflow_targets_by_finite_difference_agree_with_jvp():
    model = tiny_dit()
    params = perturbed(model.init(KEY, *example_inputs(model, (8, 8, 1)))["params"])
    apply_fn = lambda p, x, t, d, y: model.apply({"params": p}, x, t, d, y)
    batch = {"image": jax.random.uniform(KEY, (16, 8, 8, 1), minval=-1, maxval=1), "label": jnp.arange(16) % 3}
    targets = {}
    for how in ("jvp", "finite_difference"):
        obj = MeanFlowObjective(MeanFlowConfig(name="meanflow", derivative=how, finite_difference_step=1e-3,
                                               mean_fraction=1.0), num_classes=3)
        targets[how] = obj.targets(KEY, batch, Context(apply_fn, params, params))
    exact, approx = targets["jvp"], targets["finite_difference"]
    np.testing.assert_array_equal(exact.x_t, approx.x_t)
    assert relative_error(approx.v, exact.v) < 1e-3


def test_the_derivative_keys_keep_meanflows_hash_until_set():
    default = load_spec("digits_meanflow")
    assert default.method.derivative == "jvp"
    assert load_spec("digits_meanflow", ["method.derivative=jvp"]).hash() == default.hash()
    assert load_spec("digits_meanflow", ["method.derivative=finite_difference"]).hash() != default.hash()


# ---------------------------------------------------------------- extra conditioning inputs


def test_an_extra_input_changes_nothing_until_trained_and_then_conditions():
    plain, extra = tiny_dit(), tiny_dit(conditioning=("guidance",), log_variance=True)
    p_plain = perturbed(plain.init(KEY, *example_inputs(plain, (8, 8, 1)))["params"])
    p_extra = extra.init(KEY, *example_inputs(extra, (8, 8, 1)))["params"]
    assert set(p_extra) - set(p_plain) == {"guidance_embedder", "log_variance"}
    p_extra = {**p_extra, **p_plain}  # the shared layers trained, the new input not yet
    x, t, d, y = inputs()
    base = plain.apply({"params": p_plain}, x, t, d, y)
    for w in (0.0, 0.5, 0.9):
        np.testing.assert_array_equal(extra.apply({"params": p_extra}, x, t, d, y, {"guidance": jnp.full_like(t, w)}),
                                      base)
    np.testing.assert_array_equal(loss_log_variance(p_extra, t), jnp.zeros_like(t))
    trained = {**p_extra, "guidance_embedder": perturbed(p_extra["guidance_embedder"])}
    g0 = extra.apply({"params": trained}, x, t, d, y, {"guidance": jnp.zeros_like(t)})
    g1 = extra.apply({"params": trained}, x, t, d, y, {"guidance": jnp.full_like(t, 0.8)})
    assert float(jnp.max(jnp.abs(g1 - g0))) > 1e-4
    with pytest.raises(ValueError, match="conditioned on"):
        extra.apply({"params": p_extra}, x, t, d, y)
    with pytest.raises(ValueError, match="conditioned on"):
        plain.apply({"params": p_plain}, x, t, d, y, {"guidance": t})
