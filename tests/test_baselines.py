"""Baselines: targets against the Gaussian oracle (tests/oracle.py), schedules step by step, samplers'
network evaluations, stage dependencies (teacher resolution, pair generation), and every method's digits
spec trained for a few steps through shortcut.run.run."""

import json
from types import SimpleNamespace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baselines.consistency_distillation import ConsistencyDistillationConfig, ConsistencyDistillationObjective
from baselines.consistency_training import ConsistencyTrainingConfig, ConsistencyTrainingObjective
from baselines.diffusion import DiffusionConfig, DiffusionObjective
from baselines.live_reflow import LiveReflowConfig, LiveReflowObjective
from baselines.meanflow import MeanFlowConfig, MeanFlowObjective, meanflow_target
from baselines.progressive_distillation import ProgressiveDistillationConfig, ProgressiveDistillationObjective
from baselines.reflow import ReflowConfig, ReflowObjective
from baselines import reflow_pairs
from shortcut import assembly, methods
from shortcut import teacher as teacher_lib
from shortcut.checkpoint import Checkpointer
from shortcut.objective import Context, euler_sample, expand
from shortcut.record import run_dir
from shortcut.run import run
from shortcut.spec import SpecError
from shortcut.spec_files import load_spec
from shortcut.train import TrainState, build_model, make_optimizer, make_train_step, train
from tests.oracle import MU, S, SHAPE, exact_shortcut, exact_velocity, gaussian_batch, velocity_model

M = 128
KEY = jax.random.PRNGKey(0)


def batch_of(n, seed=0):
    images, labels = gaussian_batch(jax.random.PRNGKey(seed), n)
    return {"image": images, "label": labels}


def noise_of(tg, images):
    """The noise x0 a row was built from: x_t = (1 - t) x0 + t x1."""
    t = expand(tg.t, images)
    return (tg.x_t - t * images) / (1 - t)


def consistency_exact(params, x, t, d, labels):
    """The exact consistency model's velocity: the average velocity from t to 1, (Phi_t^{1-t}(x) - x) / (1 - t)."""
    rest = 1 - t
    shortcut = exact_shortcut(None, x, t, jnp.maximum(rest, 1e-6), None)
    return jnp.where(expand(rest, x) > 1e-6, shortcut, exact_velocity(x, t))


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ---------------------------------------------------------------- diffusion


def diffusion(**kw):
    return DiffusionObjective(DiffusionConfig(name="diffusion", class_dropout=0.0, **kw), num_classes=0)


def vp_oracle(obj, mu=MU, s=S):
    """The exact network for data N(mu, s^2) under obj's VP process, in obj's parameterisation (eps or v)."""

    def apply_fn(params, x, t, d, labels):
        a, sg = (expand(u, x) for u in obj.alpha_sigma(1 - t))
        var = a**2 * s**2 + sg**2
        eps = sg / var * (x - a * mu)
        x_data = mu + a * s**2 / var * (x - a * mu)
        return eps if obj.config.prediction == "eps" else a * eps - sg * x_data

    return apply_fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddim_with_exact_model_of_point_mass_data_is_exact_at_any_n(prediction, schedule):
    """Point-mass data: the PF-ODE trajectories are straight in DDIM's variables, so DDIM is exact at any N."""
    obj = diffusion(prediction=prediction, schedule=schedule)
    noise = jax.random.normal(KEY, (8, *SHAPE))
    for n in (1, 4, 128):
        close(obj.sample(vp_oracle(obj, s=0.0), None, noise, jnp.zeros(8, jnp.int32), n), jnp.full_like(noise, MU))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddim_with_exact_model_of_gaussian_data_converges_to_the_exact_map(schedule):
    """Gaussian data: DDIM's error to the exact PF-ODE map shrinks with N; eps and v give the same path.

    (DDIM is not exact here at small N: one step from tau to tau' scales x - a mu by
    (a' a s^2 + sigma' sigma) / (a^2 s^2 + sigma^2), not by sqrt(a'^2 s^2 + sigma'^2) / sqrt(a^2 s^2 + sigma^2).)
    """
    eps_obj, v_obj = diffusion(prediction="eps", schedule=schedule), diffusion(prediction="v", schedule=schedule)
    noise = jax.random.normal(KEY, (64, *SHAPE))
    labels = jnp.zeros(64, jnp.int32)
    a1, s1 = (float(u) for u in eps_obj.alpha_sigma(jnp.ones(())))
    exact = MU + S / np.sqrt(a1**2 * S**2 + s1**2) * (noise - a1 * MU)
    errors = []
    for n in (1, 4, 16, 128):
        out = eps_obj.sample(vp_oracle(eps_obj), None, noise, labels, n)
        close(out, v_obj.sample(vp_oracle(v_obj), None, noise, labels, n), tol=1e-3)
        errors.append(float(jnp.max(jnp.abs(out - exact))))
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5, errors
    assert errors[-1] < 0.06 and errors[-2] / errors[-1] > 4, errors  # first order in 1/N


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_targets_match_the_samplers_parameterisation(prediction):
    """x_t = alpha x1 + sigma eps at tau = 1 - t on the 1/M grid; the sampler's `predict` inverts the target."""
    obj = diffusion(prediction=prediction)
    batch = batch_of(512)
    tg = obj.targets(KEY, batch, Context(velocity_model, None, None))
    t = np.asarray(tg.t)
    assert np.allclose(t * M, np.round(t * M)) and t.min() == 0 and t.max() <= 1 - 1 / M
    close(tg.d, 1 / M)
    x_data, eps = obj.predict(tg.x_t, tg.v, 1 - tg.t)
    close(x_data, batch["image"], tol=2e-3)
    a, s = (expand(u, tg.x_t) for u in obj.alpha_sigma(1 - tg.t))
    close(tg.x_t, a * batch["image"] + s * eps, tol=1e-5)
    close(jnp.var(eps), 1.0, tol=0.05)
    assert float(jnp.max(a[t == 0])) < 0.01 and float(jnp.min(a[t == 1 - 1 / M])) > 0.99


# ---------------------------------------------------------------- consistency training


def ct(total=70, **kw):
    return ConsistencyTrainingObjective(ConsistencyTrainingConfig(name="consistency_training", class_dropout=0.0, **kw),
                                        num_classes=0, total_steps=total)


def scaled_velocity(params, x, t, d, labels):
    return params * exact_velocity(x, t)


def test_consistency_curriculum_doubles_n_in_equal_stages_step_by_step():
    obj = ct(total=70)
    expected = [2 ** (s // 10) for s in range(70)]  # 7 stages of 10 steps: N = 1, 2, .., 64
    assert [int(obj.discretisation(s)) for s in range(70)] == expected
    batch = batch_of(2048)
    targets = jax.jit(lambda step: obj.targets(KEY, batch, Context(scaled_velocity, 1.0, 2.0, step)).t)
    for step in range(70):
        n = expected[step]
        t = np.asarray(targets(step))
        assert np.allclose(t * n, np.round(t * n)), step
        assert len(np.unique(t)) == n and t.min() == 0 and t.max() == pytest.approx(1 - 1 / n), step


@pytest.mark.parametrize("loss_space", ["v", "f"])
def test_consistency_training_target_is_the_ema_endpoint_at_the_next_grid_point(loss_space):
    obj = ct(total=70, loss_space=loss_space)
    batch = batch_of(256)
    x1 = batch["image"]
    for step, n in ((0, 1), (25, 4), (69, 64)):
        tg = obj.targets(KEY, batch, Context(scaled_velocity, 1.0, 2.0, step))
        x0 = noise_of(tg, x1)
        t2 = tg.t + 1 / n
        x_t2 = (1 - expand(t2, x1)) * x0 + expand(t2, x1) * x1
        f = x_t2 + expand(1 - t2, x1) * 2.0 * exact_velocity(x_t2, t2)  # the EMA model (params 2.0)
        close(tg.v, (f - tg.x_t) / expand(1 - tg.t, x1), tol=1e-3)
        close(tg.d, 1 / M)
        if loss_space == "f":
            close(tg.weight, (1 - tg.t) ** 2)
        else:
            assert tg.weight is None
        if n == 1:  # stage 0 is flow matching at t = 0
            assert float(jnp.max(tg.t)) == 0.0
            close(tg.v, x1 - x0, tol=1e-4)


def test_consistency_sampler_with_exact_model_samples_the_data_distribution():
    """N = 1 is the exact map; N > 1 re-noises with fresh noise (a function of each sample's own noise only)
    and with an exact consistency model still lands on the data distribution."""
    obj = ct()
    noise = jax.random.normal(KEY, (4000, *SHAPE))
    labels = jnp.zeros(4000, jnp.int32)
    close(obj.sample(consistency_exact, None, noise, labels, 1), MU + S * noise)
    out = obj.sample(consistency_exact, None, noise, labels, 4)
    assert float(jnp.max(jnp.abs(out - (MU + S * noise)))) > 0.1  # fresh noise was injected
    assert float(jnp.mean(out)) == pytest.approx(MU, abs=0.01) and float(jnp.std(out)) == pytest.approx(S, abs=0.01)
    perm = jnp.arange(4000)[::-1]
    close(obj.sample(consistency_exact, None, noise[perm], labels, 4), out[perm], tol=1e-6)


# ---------------------------------------------------------------- consistency distillation


def test_consistency_distillation_target_from_exact_teacher_and_student_is_exact():
    """An exact teacher step of 1/M followed by the exact student's endpoint is the exact consistency map."""
    obj = ConsistencyDistillationObjective(
        ConsistencyDistillationConfig(name="consistency_distillation", class_dropout=0.0, teacher_clip=None),
        num_classes=0)
    with pytest.raises(ValueError, match="needs a trained teacher"):
        obj.init_aux(None, None)

    def model(params, x, t, d, labels):  # params names the network: 0 the teacher, else the student
        return exact_shortcut(None, x, t, d, None) if float(params) == 0 else consistency_exact(None, x, t, d, None)

    batch = batch_of(1024)
    tg = obj.targets(KEY, batch, Context(model, 1.0, 2.0, 0, obj.init_aux(1.0, jnp.zeros(()))))
    t = np.asarray(tg.t)
    assert np.allclose(t * M, np.round(t * M)) and t.max() == 1 - 1 / M and (t == 1 - 1 / M).any()
    close(tg.d, 1 / M)
    close(tg.v, consistency_exact(None, tg.x_t, tg.t, None, None), tol=2e-3)


# ---------------------------------------------------------------- progressive distillation


def pd(total=70, **kw):
    return ProgressiveDistillationObjective(
        ProgressiveDistillationConfig(name="progressive_distillation", class_dropout=0.0, teacher_clip=None, **kw),
        num_classes=0, total_steps=total)


def test_progressive_stages_halve_the_steps_and_targets_from_an_exact_teacher_are_exact():
    obj = pd(total=70)
    assert [int(obj.student_steps(s)) for s in range(0, 70, 10)] == [64, 32, 16, 8, 4, 2, 1]
    assert [int(obj.stage(s)) for s in range(70)] == [s // 10 for s in range(70)]
    batch = batch_of(1024)
    for step in range(0, 70, 10):
        n = int(obj.student_steps(step))
        half = 0.5 / n

        def teacher(params, x, t, d, labels):  # the exact 2n-step model of this stage's teacher
            return exact_shortcut(None, x, t, jnp.full_like(t, half), None)

        tg = obj.targets(KEY, batch, Context(teacher, None, None, step, "teacher"))
        t = np.asarray(tg.t)
        assert np.allclose(t * n, np.round(t * n)) and len(np.unique(t)) == n
        close(tg.d, 1 / M)
        close(tg.v, exact_shortcut(None, tg.x_t, tg.t, jnp.full_like(tg.t, 2 * half), None), tol=1e-3)


def toy_model(params, x, t, d, labels):
    return params["w"] * x + params["b"]


def toy_state(objective, optimizer, teacher):
    params = {"w": jnp.ones(()), "b": jnp.zeros(())}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1),
                      aux=objective.init_aux(params, teacher))


TEACHER = {"w": jnp.asarray(5.0), "b": jnp.asarray(1.0)}


def test_progressive_teacher_is_refreshed_to_the_ema_student_at_each_stage_boundary():
    """14 real train steps, 7 stages of 2: the teacher (aux) changes exactly after steps 2, 4, .., 12."""
    spec = load_spec("digits_progressive_distillation", ["train.steps=14", "optimizer.lr=0.05",
                                                         "optimizer.ema_decay=0.5"])
    obj = pd(total=spec.train.steps)
    optimizer = make_optimizer(spec.optimizer)
    step_fn = make_train_step(toy_model, obj, optimizer, spec)
    state = toy_state(obj, optimizer, TEACHER)
    teacher = {k: float(v) for k, v in TEACHER.items()}
    for s in range(1, 15):
        state, _ = step_fn(state, batch_of(16, seed=s))
        aux = {k: float(v) for k, v in state.aux.items()}
        if s in (2, 4, 6, 8, 10, 12):
            teacher = {k: float(v) for k, v in state.ema_params.items()}
            assert teacher != {k: float(v) for k, v in state.params.items()}  # the EMA, not the online params
        assert aux == teacher, s
    assert teacher != {k: float(v) for k, v in TEACHER.items()}


class _ToyData:
    def __init__(self, interrupt_at=None):
        self.i, self.interrupt_at = 0, interrupt_at

    def __next__(self):
        if self.i + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.i += 1
        return batch_of(16, seed=self.i)

    def get_state(self) -> bytes:
        return str(self.i).encode()

    def set_state(self, state: bytes) -> None:
        self.i = int(state)


def test_progressive_stages_resume_after_an_interruption(tmp_path):
    """The teacher lives in the checkpointed state: interrupted mid-stage and resumed, the run ends bit for bit
    where an uninterrupted one does."""
    spec = load_spec("digits_progressive_distillation", ["train.steps=14", "train.checkpoint_every=100",
                                                         "train.log_every=100", "optimizer.lr=0.05"])
    obj = pd(total=spec.train.steps)
    optimizer = make_optimizer(spec.optimizer)
    step_fn = make_train_step(toy_model, obj, optimizer, spec)
    quiet = lambda m: None

    straight = train(spec, toy_state(obj, optimizer, TEACHER), step_fn, _ToyData(), Checkpointer(tmp_path / "a", keep=2),
                     log=quiet).state
    ckpt = Checkpointer(tmp_path / "b", keep=2)
    with pytest.raises(KeyboardInterrupt):
        train(spec, toy_state(obj, optimizer, TEACHER), step_fn, _ToyData(interrupt_at=8), ckpt, log=quiet)
    assert ckpt.latest_step() == 7  # mid-stage 3, after the teacher refresh at step 6
    resumed = train(spec, toy_state(obj, optimizer, TEACHER), step_fn, _ToyData(), ckpt, log=quiet)
    assert resumed.resumed_from == 7
    for a, b in zip(jax.tree.leaves((straight.params, straight.aux)), jax.tree.leaves((resumed.state.params,
                                                                                       resumed.state.aux))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- reflow and live reflow


def test_reflow_targets_use_the_paired_noise():
    obj = ReflowObjective(ReflowConfig(name="reflow", class_dropout=0.0), num_classes=0)
    batch = batch_of(256)
    batch["noise"] = jax.random.normal(jax.random.PRNGKey(5), batch["image"].shape)
    tg = obj.targets(KEY, batch, Context(velocity_model, None, None))
    close(tg.v, batch["image"] - batch["noise"], tol=1e-6)
    close(noise_of(tg, batch["image"]), batch["noise"], tol=1e-4)
    close(tg.d, 1 / M)


def test_live_reflow_rows_are_regenerated_online_and_trained_at_d_1():
    obj = LiveReflowObjective(LiveReflowConfig(name="live_reflow", class_dropout=1.0), num_classes=10)
    batch = batch_of(64)
    batch["label"] = jnp.arange(64) % 10
    tg = obj.targets(KEY, batch, Context(scaled_velocity, 0.5, 3.0))  # generates with the online params (0.5)
    nr = obj.reflow_size(64)
    assert nr == 16
    np.testing.assert_array_equal(np.asarray(tg.group), [1] * nr + [0] * (64 - nr))
    close(tg.d[:nr], 1.0)
    close(tg.d[nr:], 1 / M)
    np.testing.assert_array_equal(np.asarray(tg.labels[:nr]), np.arange(nr) % 10)  # reflow rows keep labels
    np.testing.assert_array_equal(np.asarray(tg.labels[nr:]), 10)  # flow rows: dropout 1 -> null class
    z = tg.x_t[:nr] - expand(tg.t[:nr], tg.x_t[:nr]) * tg.v[:nr]  # x_t = (1-t) z + t x, v = x - z
    x = euler_sample(scaled_velocity, 0.5, z, tg.labels[:nr], 8, d_cond=1 / M, cfg_scale=1.0, null_class=10)
    close(tg.v[:nr], x - z, tol=1e-4)
    close(tg.v[nr:], batch["image"][nr:] - noise_of(tg, batch["image"])[nr:], tol=1e-3)


@pytest.mark.parametrize("level,expected", [("step_size", {128: 1 / M, 4: 1 / 4, 1: 1.0}),
                                            ("trained", {128: 1 / M, 4: 1.0, 1: 1.0})])
def test_live_reflow_sampling_level(level, expected):
    """step_size: each step at d = 1/N (official inference script); trained: d = 1 below M steps (official
    training-time evaluation). A network whose velocity is its d input ends at the d it was given."""
    obj = LiveReflowObjective(LiveReflowConfig(name="live_reflow", sample_level=level), num_classes=0)
    velocity_is_d = lambda p, x, t, d, y: jnp.broadcast_to(expand(d, x), x.shape)  # noqa: E731
    for n, d in expected.items():
        out = obj.sample(velocity_is_d, None, jnp.zeros((2, 2, 2, 1)), jnp.zeros((2,), jnp.int32), n)
        close(out, d, tol=1e-6)


# ---------------------------------------------------------------- MeanFlow


def meanflow(**kw):
    return MeanFlowObjective(MeanFlowConfig(name="meanflow", class_dropout=0.0, **kw), num_classes=0)


def test_meanflow_target_with_exact_model_is_the_exact_average_velocity():
    """u_tgt = v + d (J_x u v + d_t u - d_d u) with the exact u and velocity is (Phi_t^d(x) - x) / d; d = 0 gives v."""
    kt, kd, kz, kw = jax.random.split(KEY, 4)
    t = jax.random.uniform(kt, (512,), maxval=0.9)
    d = jax.random.uniform(kd, (512,), minval=0.01) * (1 - t)
    z, w = jax.random.normal(kz, (512, *SHAPE)), jax.random.normal(kw, (512, *SHAPE))
    x = (1 - expand(t, z)) * z + expand(t, z) * (MU + S * w)  # a point of the path at time t
    u, target = meanflow_target(exact_shortcut, None, x, t, d, None, exact_velocity(x, t), d)
    close(target, exact_shortcut(None, x, t, d, None), tol=1e-3)
    close(u, target, tol=1e-3)
    _, flow = meanflow_target(exact_shortcut, None, x, t, jnp.full_like(t, 1 / M), None, exact_velocity(x, t),
                              jnp.zeros_like(t))
    close(flow, exact_velocity(x, t), tol=1e-6)


def test_meanflow_batch_split_conditioning_and_finite_targets_with_level_conditioning():
    spec = load_spec("digits_meanflow", ["model.hidden_size=32", "model.depth=1", "model.num_heads=2"])
    assert spec.model.d_conditioning == "level"
    model = build_model(spec)
    apply_fn = lambda p, x, t, d, y: model.apply({"params": p}, x, t, d, y)
    x = jnp.zeros((1, 8, 8, 1))
    params = model.init(KEY, x, jnp.zeros(1), jnp.ones(1), jnp.zeros(1, jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)  # perturb: adaLN-zero makes a fresh DiT output exactly 0
    keys = jax.random.split(KEY, len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    obj = methods.make_objective(spec)
    images = jax.random.uniform(KEY, (64, 8, 8, 1), minval=-1, maxval=1)
    batch = {"image": images, "label": jnp.arange(64) % 10}
    tg = jax.jit(lambda b: obj.targets(KEY, b, Context(apply_fn, params, params)))(batch)
    nm = obj.mean_size(64)
    assert nm == 16
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (tg.v, tg.weight, tg.d, tg.t))
    d, t = np.asarray(tg.d), np.asarray(tg.t)
    assert (d[:nm] >= 1 / M).all() and (t[:nm] + d[:nm] <= 1 + 1e-6).all() and (d[nm:] == 1 / M).all()
    np.testing.assert_array_equal(np.asarray(tg.group), [1] * nm + [0] * (64 - nm))
    x0 = noise_of(tg, images)
    close(tg.v[nm:], images[nm:] - x0[nm:], tol=1e-3)  # r = t rows: plain flow matching
    assert float(jnp.max(jnp.abs(tg.v[:nm] - (images - x0)[:nm]))) > 1e-3  # r != t rows: the JVP term
    assert (np.asarray(tg.weight) > 0).all()


# ---------------------------------------------------------------- samplers: network evaluations


def all_objectives():
    """Every registered method (shortcut/methods.py: the entry points), built as a spec builds it, so a new
    method is tested here without being listed."""
    out = {}
    for name in methods.method_names():
        cls = methods.objective_class(name)
        spec = SimpleNamespace(method=cls.Config(name=name), data=SimpleNamespace(num_classes=10),
                               train=SimpleNamespace(steps=70), model=SimpleNamespace(d_conditioning="step_size"))
        out[name] = cls.from_spec(spec)
    return out


def test_every_method_is_registered_with_its_table_name():
    names = methods.method_names()
    assert {"shortcut", "flow_matching", "diffusion", "consistency_training", "consistency_distillation",
            "progressive_distillation", "reflow", "live_reflow", "meanflow", "improved_meanflow",
            "consistency_training_continuous", "consistency_distillation_continuous"} <= set(names)
    assert names[:5] == ["diffusion", "flow_matching", "consistency_training", "live_reflow", "shortcut"]
    assert methods.display_name("progressive_distillation") == "Progressive Distillation"
    assert methods.display_name("not_installed_here") == "Not Installed Here"
    with pytest.raises(methods.KeyedValueError, match="expected one of"):
        methods.objective_class("no_such_method")


@pytest.mark.parametrize("name", sorted(all_objectives()))
def test_samplers_make_exactly_the_stated_number_of_network_evaluations(name):
    obj = all_objectives()[name]
    rows = []

    def counting(params, x, t, d, labels, cond=None):
        jax.debug.callback(lambda n: rows.append(int(n)), jnp.asarray(x.shape[0]))
        return velocity_model(params, x, t, d, labels)

    guidance_is_an_input = bool(obj.network_options(obj.config).get("conditioning"))  # one call per step, any w

    noise = jax.random.normal(KEY, (4, *SHAPE))
    labels = jnp.arange(4) % 10
    for n, w in ((1, 1.0), (4, 1.0), (4, 1.5), (16, 1.0)):
        rows.clear()
        sample = jax.jit(lambda z: obj.sample(counting, None, z, labels, n, cfg_scale=w))
        jax.block_until_ready(sample(noise))
        jax.effects_barrier()
        assert sum(rows) / 4 == obj.network_evaluations(n, w) == n * (2 if w != 1.0 and not guidance_is_an_input
                                                                      else 1), (n, w)


# ---------------------------------------------------------------- specs and stage dependencies

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.batch_size=8", "train.steps=4",
        "train.log_every=2", "train.checkpoint_every=2", "eval.steps=[1]", "eval.num_samples=8", "eval.batch_size=8",
        "eval.grid_size=8"]


def tiny(name, *extra, teacher_extra=()):
    """Spec with tiny overrides; a teacher spec gets the same tiny model and length through teacher_overrides."""
    overrides = TINY + list(extra)
    if load_spec(name).teacher is not None:
        overrides.append("teacher_overrides=" + json.dumps(TINY + list(teacher_extra)))
    return load_spec(name, overrides)


def test_teacher_enters_the_hash_and_bad_teachers_are_spec_errors(tmp_path):
    a, b = tiny("digits_consistency_distillation"), tiny("digits_consistency_distillation", teacher_extra=["seed=3"])
    assert a.hash() != b.hash() and a.teacher_spec().hash() != b.teacher_spec().hash()
    assert a.hash() == tiny("digits_consistency_distillation").hash()
    assert load_spec("digits_flow").teacher is None
    with pytest.raises(SpecError, match="teacher: no such spec"):
        load_spec("digits_consistency_distillation", ["teacher=no_such_spec"])
    with pytest.raises(SpecError, match="teacher_overrides: given without"):
        load_spec("digits_flow", ["teacher_overrides=[seed=1]"])
    base = Path(__file__).resolve().parents[1] / "experiments" / "bases" / "digits.yaml"
    for me, other in (("one", "two"), ("two", "one")):
        (tmp_path / f"{me}.yaml").write_text(f"base: {base}\nteacher: {tmp_path / other}.yaml\n"
                                             "method:\n  name: consistency_distillation\n")
    with pytest.raises(SpecError, match="cycle of teachers: one -> two -> one"):
        load_spec(str(tmp_path / "one.yaml")).hash()


def test_pair_generation_resumes_after_a_kill_and_matches_an_uninterrupted_one(tmp_path):
    spec = tiny("digits_reflow", "method.num_pairs=40", "method.pair_chunk_size=16", "method.pair_steps=4")
    tspec = spec.teacher_spec()
    model = build_model(tspec)
    params = model.init(KEY, jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.ones(1), jnp.zeros(1, jnp.int32))["params"]
    teacher = teacher_lib.Teacher(tspec, tmp_path / "teacher", 0, params, assembly.build(tspec))
    logs = []
    reflow_pairs.generate_pairs(spec, teacher, tmp_path / "a", log=logs.append, max_chunks=1)  # "killed" after a chunk
    assert json.loads((tmp_path / "a" / "progress.json").read_text())["done"] == [0]
    assert not reflow_pairs.pairs_complete(tmp_path / "a")
    reflow_pairs.generate_pairs(spec, teacher, tmp_path / "a", log=logs.append)
    assert any("resuming pair generation, 1/3 chunks" in m for m in logs)
    assert sum("pairs chunk" in m for m in logs) == 3  # chunk 0 was not regenerated
    reflow_pairs.generate_pairs(spec, teacher, tmp_path / "b", log=lambda m: None)
    for name in ("noise", "image", "label"):
        a, b = np.load(tmp_path / "a" / f"{name}.npy"), np.load(tmp_path / "b" / f"{name}.npy")
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "label.npy"), np.arange(40) % 10)
    # The stored sample is the teacher's own 4-step sample of the stored noise.
    noise = np.load(tmp_path / "a" / "noise.npy")[:8]
    expected = methods.make_objective(tspec).sample(lambda p, x, t, d, y: model.apply({"params": p}, x, t, d, y),
                                                    params, jnp.asarray(noise), jnp.arange(8) % 10, 4)
    close(np.load(tmp_path / "a" / "image.npy")[:8], expected, tol=1e-4)
    # The iterator: batches of pairs, a restorable position, every pair once per epoch.
    it = reflow_pairs.PairIterator(tmp_path / "a", batch_size=8, seed=0)
    first = [next(it) for _ in range(5)]
    assert sorted(np.concatenate([np.asarray(b["label"]) for b in first]).tolist()) == sorted(np.arange(40) % 10)
    state = it.get_state()
    after = next(it)
    it2 = reflow_pairs.PairIterator(tmp_path / "a", batch_size=8, seed=0)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["noise"], after["noise"])


def _assert_trained(record, spec):
    assert record["status"] == "finished" and record["spec_hash"] == spec.hash()
    assert record["train"]["final"]["step"] == spec.train.steps
    assert np.isfinite(record["train"]["final"]["loss"])
    assert record["samples"]["1"]["network_evaluations"] == 1


def test_a_student_uses_its_finished_teacher_and_never_trains_one(tmp_path):
    """Consistency distillation, progressive distillation and reflow end to end with one tiny teacher, which
    the library never trains itself (the graph, or `run_experiment STUDENT`, runs it first)."""
    logs = []
    cd = tiny("digits_consistency_distillation")
    teacher_dir = run_dir(cd.teacher_spec(), tmp_path)
    with pytest.raises(teacher_lib.TeacherError, match="has no finished run .*run it first: run_experiment digits_flow"):
        run(cd, workdir=tmp_path, log=logs.append)
    assert not teacher_dir.exists()
    _assert_trained(run(cd.teacher_spec(), workdir=tmp_path, log=logs.append), cd.teacher_spec())
    record = run(cd, workdir=tmp_path, log=logs.append)
    _assert_trained(record, cd)
    teacher_record = json.loads((teacher_dir / "run.json").read_text())
    assert teacher_record["status"] == "finished" and record["teacher"]["run_dir"] == str(teacher_dir)
    assert record["teacher"]["spec_hash"] == cd.teacher_spec().hash() and record["teacher"]["step"] == 4

    logs.clear()
    pd_spec = tiny("digits_progressive_distillation", "train.steps=7")  # one step per stage
    _assert_trained(run(pd_spec, workdir=tmp_path, log=logs.append), pd_spec)
    rf = tiny("digits_reflow", "method.num_pairs=16", "method.pair_chunk_size=8")
    _assert_trained(run(rf, workdir=tmp_path, log=logs.append), rf)
    assert sum("using the finished teacher digits_flow" in m for m in logs) == 2
    assert json.loads((teacher_dir / "run.json").read_text())["started"] == teacher_record["started"]
    assert reflow_pairs.pairs_complete(run_dir(rf, tmp_path) / "pairs")

    failed = tiny("digits_consistency_distillation", teacher_extra=["seed=7"])
    failed_dir = run_dir(failed.teacher_spec(), tmp_path)
    failed_dir.mkdir(parents=True)
    (failed_dir / "run.json").write_text(json.dumps({"status": "failed", "error": "NonFiniteLossError: boom"}))
    with pytest.raises(teacher_lib.TeacherError, match="failed in .*NonFiniteLossError: boom"):
        run(failed, workdir=tmp_path, log=lambda m: None)
    assert not (failed_dir / "checkpoints").exists()  # not retrained
    assert json.loads((run_dir(failed, tmp_path) / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("name", ["digits_diffusion", "digits_consistency_training", "digits_live_reflow",
                                  "digits_meanflow", "digits_improved_meanflow",
                                  "digits_consistency_training_continuous"])
def test_digits_spec_trains_a_few_steps(name, tmp_path):
    spec = tiny(name)
    record = run(spec, workdir=tmp_path, log=lambda m: None)
    _assert_trained(record, spec)
    assert "teacher" not in record


def test_run_experiment_runs_a_missing_teacher_first(tmp_path):
    """A single student from the command line is two runs: its teacher (when it has no finished run), then it."""
    import subprocess
    import sys

    sets = sum([["--set", o] for o in TINY + ["teacher_overrides=" + json.dumps(TINY)]], [])
    argv = [sys.executable, "-m", "orchestration.run_experiment", "digits_consistency_distillation", "--in-process",
            "--no-tracking", "--workdir", str(tmp_path), "--results-dir", str(tmp_path / "results"), *sets]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "its teacher digits_flow has no finished run" in proc.stderr and "running it first" in proc.stderr
    student = tiny("digits_consistency_distillation")
    teacher = json.loads((run_dir(student.teacher_spec(), tmp_path) / "run.json").read_text())
    assert teacher["status"] == "finished"
    assert json.loads((run_dir(student, tmp_path) / "run.json").read_text())["teacher"]["spec_hash"] == teacher["spec_hash"]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)  # now the teacher is reused
    assert again.returncode == 0 and "running it first" not in again.stderr
