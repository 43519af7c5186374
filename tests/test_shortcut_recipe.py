"""The shortcut design-space keys (docs/methods.md): each checked against an expectation computed another way."""

from __future__ import annotations

import itertools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from shortcut import losses, pairing
from shortcut.checkpoint import Checkpointer
from shortcut.data.info import DatasetInfo
from shortcut.data.iterators import BatchIterator
from shortcut.errors import InputError
from shortcut.objective import Context, ShortcutConfig, ShortcutObjective
from shortcut.spec_files import load_spec
from shortcut.train import TrainState, checkpoint_tree, fresh_emas, resume, update_emas


def objective(**kw) -> ShortcutObjective:
    return ShortcutObjective(ShortcutConfig(name="shortcut", **kw), num_classes=10)


# ---------------------------------------------------------------- minibatch optimal transport


def test_exact_pairing_reaches_the_brute_force_optimum():
    x0 = jax.random.normal(jax.random.PRNGKey(0), (7, 2, 2, 1))
    x1 = jax.random.normal(jax.random.PRNGKey(1), (7, 2, 2, 1))
    cost = np.asarray(((x0.reshape(7, 1, -1) - x1.reshape(1, 7, -1)) ** 2).sum(-1), np.float64)
    best = min(sum(cost[perm[j], j] for j in range(7)) for perm in itertools.permutations(range(7)))
    paired = jax.jit(lambda a, b: pairing.pair_noise(jax.random.PRNGKey(2), a, b, "exact"))(x0, x1)
    assert float(jnp.sum((paired - x1) ** 2)) == pytest.approx(best, rel=1e-5)
    assert sorted(map(tuple, np.asarray(paired).reshape(7, -1).round(6))) == \
        sorted(map(tuple, np.asarray(x0).reshape(7, -1).round(6)))  # a permutation: every noise row once
    assert best < float(jnp.sum((x0 - x1) ** 2))  # the toy batch is not already optimal


def test_sinkhorn_pairing_recovers_a_hidden_permutation():
    """Noise that is a shuffled copy of the data (plus a little jitter) has one clearly optimal pairing; a
    Sinkhorn plan with small epsilon puts nearly all its mass there, so the draws find it."""
    x1 = jax.random.normal(jax.random.PRNGKey(3), (12, 2, 2, 1))
    perm = np.random.default_rng(0).permutation(12)
    x0 = x1[perm] + 0.01 * jax.random.normal(jax.random.PRNGKey(4), x1.shape)
    paired = pairing.pair_noise(jax.random.PRNGKey(5), x0, x1, "sinkhorn", epsilon=0.01)
    np.testing.assert_allclose(np.asarray(paired), np.asarray(x0[np.argsort(perm)]))


class _Batches(BatchIterator):
    """Batch i depends only on i (a restorable position), rows of 2 x 2 x 1."""

    def __init__(self, b: int):
        super().__init__(DatasetInfo("toy", (2, 2, 1), 10, 100), {"b": b})
        self.b, self.i = b, 0

    def __next__(self):
        self.i += 1
        x = np.asarray(jax.random.normal(jax.random.PRNGKey(100 + self.i), (self.b, 2, 2, 1)))
        return {"image": x, "label": np.full(self.b, self.i, np.int32)}

    def get_state(self) -> bytes:
        return json.dumps(self.i).encode()

    def set_state(self, state: bytes) -> None:
        self.i = json.loads(state)


def _cost(noise, data) -> float:
    return float(np.sum((np.asarray(noise) - np.asarray(data)) ** 2))


def test_a_pooled_assignment_costs_no_more_than_the_per_batch_ones_and_uses_each_row_once():
    k, b = 2, 4  # a pool of 8 rows: brute force over all 8! assignments
    pooled = pairing.PooledNoise(_Batches(b), pool=k, pairing="exact", epsilon=0.05, seed=0)
    batches = [next(pooled) for _ in range(k)]
    data = np.concatenate([x["image"] for x in batches])
    noise = np.concatenate([x["noise"] for x in batches])
    # the data come through unchanged, each batch once, in order, with its labels
    fresh = _Batches(b)
    for x in batches:
        want = next(fresh)
        np.testing.assert_array_equal(x["image"], want["image"])
        np.testing.assert_array_equal(x["label"], want["label"])
    # the noise is one draw of k * b rows, each used once (a permutation of the draw)
    process_0 = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    k_draw, _ = jax.random.split(jax.random.fold_in(process_0, 0))  # pool 0
    drawn = np.asarray(jax.random.normal(k_draw, data.shape)).reshape(k * b, -1)
    assert sorted(map(tuple, noise.reshape(k * b, -1).round(5))) == sorted(map(tuple, drawn.round(5)))
    # the pooled cost is the optimum over the whole pool, and no more than pairing each batch alone
    cost = ((drawn[:, None] - data.reshape(1, k * b, -1)) ** 2).sum(-1)
    best = min(cost[perm, np.arange(k * b)].sum() for perm in itertools.permutations(range(k * b)))
    assert _cost(noise, data) == pytest.approx(best, rel=1e-5)
    per_batch = sum(_cost(pairing.pair_noise(None, jnp.asarray(drawn[i * b:(i + 1) * b].reshape(b, 2, 2, 1)),
                                             jnp.asarray(data[i * b:(i + 1) * b]), "exact"), data[i * b:(i + 1) * b])
                    for i in range(k))
    assert _cost(noise, data) <= per_batch + 1e-5


def test_a_pool_resumes_mid_pool_with_the_same_batches():
    pooled = pairing.PooledNoise(_Batches(4), pool=3, pairing="sinkhorn", epsilon=0.05, seed=1)
    for _ in range(4):  # into the second pool
        next(pooled)
    state = pooled.get_state()
    expected = [next(pooled) for _ in range(4)]
    again = pairing.PooledNoise(_Batches(4), pool=3, pairing="sinkhorn", epsilon=0.05, seed=1)
    again.set_state(state)
    for want, got in zip(expected, (next(again) for _ in range(4))):
        for key in ("image", "label", "noise"):
            np.testing.assert_array_equal(want[key], got[key])


def test_ot_pool_1_is_todays_pairing_and_a_pool_needs_a_pairing():
    spec = load_spec("digits_shortcut", ["method.ot_pairing=exact"])
    assert load_spec("digits_shortcut", ["method.ot_pairing=exact", "method.ot_pool=1"]).hash() == spec.hash()
    assert load_spec("digits_shortcut", ["method.ot_pairing=exact", "method.ot_pool=8"]).hash() != spec.hash()
    data = _Batches(4)
    one = objective(ot_pairing="exact")
    assert one.training_data(lambda: data, spec=spec, teacher=None, rundir=None, log=print) is data
    assert set(one.batch_inputs(1, 2)) == {"image", "label"}
    assert set(objective(ot_pairing="exact", ot_pool=8).batch_inputs(1, 2)) == {"image", "label", "noise"}
    with pytest.raises(InputError, match="method.ot_pool: 8 pools batches for a pairing"):
        ShortcutObjective.from_spec(load_spec("digits_shortcut", ["method.ot_pool=8"]))


def test_the_step_trains_on_the_pooled_noise():
    batch = {"image": jax.random.normal(jax.random.PRNGKey(6), (16, 4, 4, 1)), "label": jnp.arange(16) % 10,
             "noise": jax.random.normal(jax.random.PRNGKey(9), (16, 4, 4, 1))}
    ctx = Context(lambda p, x, t, d, y: x * 0, None, None)
    tg = objective(ot_pairing="exact", ot_pool=4, bootstrap_fraction=0.0).targets(jax.random.PRNGKey(7), batch, ctx)
    np.testing.assert_allclose(np.asarray(batch["image"] - tg.v), np.asarray(batch["noise"]), atol=1e-6)



def _row_index(rows: np.ndarray, of: np.ndarray) -> list[int]:
    """For each row of `of`, the index of the equal row of `rows`."""
    flat = rows.reshape(len(rows), -1)
    return [int(np.argmin(np.abs(flat - r.reshape(1, -1)).sum(1))) for r in of]


def test_within_class_exact_pairing_reaches_the_class_respecting_optimum():
    """Noise row i belongs to labels[i]'s class; the assignment is the cheapest of those that pair each data row
    with a noise row of its own class (brute force over all 8! permutations, kept when they respect classes)."""
    x0 = jax.random.normal(jax.random.PRNGKey(10), (8, 2, 2, 1))
    x1 = jax.random.normal(jax.random.PRNGKey(11), (8, 2, 2, 1))
    labels = jnp.asarray([0, 1, 2, 0, 1, 0, 2, 1])
    cost = np.asarray(((x0.reshape(8, 1, -1) - x1.reshape(1, 8, -1)) ** 2).sum(-1), np.float64)
    y = np.asarray(labels)
    best = min(sum(cost[perm[j], j] for j in range(8)) for perm in itertools.permutations(range(8))
               if all(y[perm[j]] == y[j] for j in range(8)))
    paired = jax.jit(lambda a, b, c: pairing.pair_noise(None, a, b, "exact", labels=c))(x0, x1, labels)
    assert float(jnp.sum((paired - x1) ** 2)) == pytest.approx(best, rel=1e-5)
    source = _row_index(np.asarray(x0), np.asarray(paired))
    assert sorted(source) == list(range(8)) and all(y[i] == y[j] for j, i in enumerate(source))
    across = pairing.pair_noise(None, x0, x1, "exact")
    assert _cost(across, x1) < best - 1e-3  # the class constraint binds on this batch


def test_within_class_sinkhorn_draws_stay_in_their_class():
    x1 = jax.random.normal(jax.random.PRNGKey(12), (12, 2, 2, 1))
    labels = jnp.arange(12) % 3
    x0 = x1[::-1] + 0.01 * jax.random.normal(jax.random.PRNGKey(13), x1.shape)  # nearest noise is of another class
    y = np.asarray(labels)
    for seed in range(5):
        paired = pairing.pair_noise(jax.random.PRNGKey(seed), x0, x1, "sinkhorn", epsilon=0.05, labels=labels)
        assert all(y[i] == y[j] for j, i in enumerate(_row_index(np.asarray(x0), np.asarray(paired))))


def test_only_within_class_pairing_keeps_each_class_noise_centred():
    """Two classes of constant images, +1 and -1, in 16 dimensions. Pairing across classes sends the noise
    rows with the largest sum to the +1 class: their mean moves along the all-ones direction; within each class
    the noise is a permutation of the class's own i.i.d. rows, centred (a few standard errors at most)."""
    n, dim, batches = 32, 16, 20
    labels = jnp.arange(n) % 2
    x1 = jnp.where(labels[:, None] == 0, 1.0, -1.0) * jnp.ones((n, dim))
    shift = {}
    for mode in ("across", "within"):
        along = []
        for i in range(batches):
            x0 = jax.random.normal(jax.random.PRNGKey(i), (n, dim))
            paired = pairing.pair_noise(None, x0, x1, "exact", labels=labels if mode == "within" else None)
            along.append(np.asarray(paired[labels == 0]).sum(1) / np.sqrt(dim))  # each row along ones / |ones|
        shift[mode] = float(np.mean(along))  # N(0, 1) per row when centred: standard error 1 / sqrt(320)
    assert shift["across"] > 0.5
    assert abs(shift["within"]) < 4 / np.sqrt(batches * n / 2)


def test_a_pool_within_classes_keeps_each_batch_on_its_own_rows():
    """_Batches gives every row of batch i the label i: within classes, a pool pairs each batch with its own
    block of the draw, exactly as pairing each batch alone would."""
    k, b = 2, 4
    pooled = pairing.PooledNoise(_Batches(b), pool=k, pairing="exact", epsilon=0.05, seed=0, within_class=True)
    batches = [next(pooled) for _ in range(k)]
    process_0 = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    k_draw, _ = jax.random.split(jax.random.fold_in(process_0, 0))
    drawn = jax.random.normal(k_draw, (k * b, 2, 2, 1))
    for i, x in enumerate(batches):
        alone = pairing.pair_noise(None, drawn[i * b:(i + 1) * b], jnp.asarray(x["image"]), "exact")
        np.testing.assert_allclose(x["noise"], np.asarray(alone), atol=1e-6)


def test_ot_classes_is_hashed_only_when_within_and_needs_a_pairing_and_classes():
    spec = load_spec("digits_shortcut", ["method.ot_pairing=exact"])
    assert load_spec("digits_shortcut", ["method.ot_pairing=exact", "method.ot_classes=across"]).hash() == spec.hash()
    within = load_spec("digits_shortcut", ["method.ot_pairing=exact", "method.ot_classes=within"])
    assert within.hash() != spec.hash()
    ShortcutObjective.from_spec(within)
    with pytest.raises(InputError, match="method.ot_classes: within pairs noise and data within each class"):
        ShortcutObjective.from_spec(load_spec("digits_shortcut", ["method.ot_classes=within"]))
    with pytest.raises(InputError, match="method.ot_classes: within needs class labels"):
        ShortcutObjective.from_spec(load_spec("digits_shortcut", ["method.ot_pairing=exact", "method.ot_classes=within",
                                                                  "data.num_classes=0"]))


def test_within_class_pairing_reaches_the_training_targets():
    batch = {"image": jax.random.normal(jax.random.PRNGKey(6), (16, 4, 4, 1)), "label": jnp.arange(16) % 2}
    ctx = Context(lambda p, x, t, d, y: x * 0, None, None)
    tg = objective(ot_pairing="exact", ot_classes="within", bootstrap_fraction=0.0).targets(
        jax.random.PRNGKey(7), batch, ctx)
    noise = np.asarray(batch["image"] - tg.v)
    _, k_draw = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), 1))
    drawn = np.asarray(jax.random.normal(k_draw, (16, 4, 4, 1)))
    y = np.arange(16) % 2
    source = _row_index(drawn, noise)
    assert sorted(source) == list(range(16)) and all(y[i] == y[j] for j, i in enumerate(source))


# ---------------------------------------------------------------- twin EMA


def test_each_ema_follows_its_own_decay():
    decays = (0.9, 0.5)
    params = {"w": jnp.zeros(3)}
    ema, more = fresh_emas(params, decays)
    state = TrainState(jnp.int32(0), params, ema, (), jax.random.PRNGKey(0), more_ema=more)
    seq = [jnp.full(3, float(i)) for i in range(1, 6)]
    for p in seq:
        ema, more = update_emas(state, {"w": p}, decays)
        state = state.replace(params={"w": p}, ema_params=ema, more_ema=more)

    def closed_form(decay):  # e_n = sum_i (1 - a) a^(n-i) p_i, starting from e_0 = 0
        return sum((1 - decay) * decay ** (len(seq) - 1 - i) * float(p[0]) for i, p in enumerate(seq))

    assert float(state.ema_params["w"][0]) == pytest.approx(closed_form(0.9), rel=1e-6)
    assert float(state.more_ema[0]["w"][0]) == pytest.approx(closed_form(0.5), rel=1e-6)
    assert state.target_ema is state.more_ema[-1]


def test_the_memory_estimate_counts_every_ema():
    from shortcut import memory

    one = memory.state_bytes(load_spec("digits_shortcut"))
    twin = memory.state_bytes(load_spec("digits_shortcut", ["optimizer.ema_decay=[0.999, 0.95]"]))
    assert one["ema"] == one["params"] and twin["ema"] == 2 * twin["params"]
    assert twin["state"] - one["state"] == one["params"]


def test_one_decay_keeps_the_state_and_checkpoints_as_before(tmp_path):
    @flax.struct.dataclass
    class Before:  # the train state before twin EMA
        step: jax.Array
        params: dict
        ema_params: dict
        opt_state: tuple
        rng: jax.Array
        aux: object = None

    params = {"w": jnp.arange(3.0)}
    ema, more = fresh_emas(params, (0.99,))
    assert more is None
    old = Before(jnp.int32(4), params, {"w": jnp.ones(3)}, (), jax.random.PRNGKey(0))
    like = TrainState(jnp.int32(0), params, ema, (), jax.random.PRNGKey(1))
    before, now, twin_dir = (Checkpointer(tmp_path / name, keep=2) for name in ("before", "now", "twin"))
    before.save(4, old, b"old")
    now.save(4, checkpoint_tree(like.replace(step=jnp.int32(4))), b"new")
    for c in (before, now):
        c.wait()
    step, (state, data) = resume(before, like)  # a checkpoint written before twin EMA
    assert (step, data) == (4, b"old") and state.more_ema is None and float(state.ema_params["w"][0]) == 1.0
    meta = [json.loads((tmp_path / name / "4" / "state" / "_METADATA").read_text()) for name in ("before", "now")]
    assert meta[0] == meta[1]  # a one-EMA checkpoint holds exactly the tree it held before
    twin = like.replace(more_ema=({"w": jnp.full(3, 7.0)},))
    twin_dir.save(6, checkpoint_tree(twin), b"twin")
    twin_dir.wait()
    _, (state, _) = resume(twin_dir, twin)
    assert float(state.more_ema[0]["w"][0]) == 7.0
    for c in (before, now, twin_dir):
        c.close()


def test_a_list_of_decays_is_hashed_and_a_single_one_is_not_changed():
    base = load_spec("digits_shortcut")
    assert load_spec("digits_shortcut", ["optimizer.ema_decay=0.99"]).hash() == base.hash()
    assert load_spec("digits_shortcut", ["optimizer.ema_decay=[0.99]"]).hash() == base.hash()
    twin = load_spec("digits_shortcut", ["optimizer.ema_decay=[0.99, 0.95]"])
    assert twin.optimizer.ema_decays == (0.99, 0.95) and twin.hash() != base.hash()


# ---------------------------------------------------------------- losses


def test_haar_bands_match_pywavelets():
    pywt = pytest.importorskip("pywt")
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
    approx, (horizontal, vertical, diagonal) = pywt.dwt2(x, "haar", axes=(1, 2))
    ll, (lh, hl, hh) = losses.haar_level(jnp.asarray(x, jnp.float32))
    for ours, ref in ((ll, approx), (lh, horizontal), (hl, vertical), (hh, diagonal)):
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_wavelet_loss_of_a_known_signal():
    # A 4x4 error: one 2x2 block of ones in the top-left corner, zeros elsewhere.
    err = np.zeros((1, 4, 4, 1), np.float32)
    err[0, :2, :2] = 1.0
    # Level 1: that block is one Haar cell (a = b = c = d = 1): LL = 2 there, all details 0; the other cells 0.
    #   Bands: LH, HL, HH all zero (mean 0); LL = [[2, 0], [0, 0]] -> mean square 4/4 = 1.
    one = losses.wavelet_rows(jnp.asarray(err), jnp.zeros_like(err), levels=1)
    assert float(one[0]) == pytest.approx(1.0)
    # Level 2 on LL = [[2, 0], [0, 0]]: a = 2, b = c = d = 0 -> LL = LH = HL = HH = 1 (each a single value).
    #   Sum: level-1 details 0 + level-2 details 1 + 1 + 1 + approximation 1 = 4.
    two = losses.wavelet_rows(jnp.asarray(err), jnp.zeros_like(err), levels=2)
    assert float(two[0]) == pytest.approx(4.0)
    assert float(losses.mse_rows(jnp.asarray(err), jnp.zeros_like(err))[0]) == pytest.approx(0.25)


def test_adaptive_weight_is_a_stopped_inverse_power():
    err = jnp.array([0.5, 3.0])
    w = losses.adaptive_weight(err, 1.0, 1e-3)
    np.testing.assert_allclose(np.asarray(w), 1 / (np.array([0.5, 3.0]) + 1e-3), rtol=1e-6)
    grad = jax.grad(lambda e: jnp.sum(losses.adaptive_weight(e, 1.0, 1e-3) * e))(err)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(w), rtol=1e-6)  # no gradient through the weight


def test_row_loss_follows_the_keys():
    pred = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
    target = jnp.zeros_like(pred)
    mse = losses.mse_rows(pred, target)
    np.testing.assert_allclose(np.asarray(objective().row_loss(pred, target)), np.asarray(mse))
    np.testing.assert_allclose(np.asarray(objective(loss="wavelet", wavelet_levels=2).row_loss(pred, target)),
                               np.asarray(losses.wavelet_rows(pred, target, 2)))
    adaptive = objective(loss_weighting="adaptive", weighting_p=0.5).row_loss(pred, target)
    np.testing.assert_allclose(np.asarray(adaptive), np.asarray(mse / (mse * 16 + 1e-3) ** 0.5), rtol=1e-6)


# ---------------------------------------------------------------- time and split sampling


def grid_moments(cells: int, pmf: np.ndarray) -> tuple[float, float]:
    t = np.arange(cells) / cells
    mean = float(np.sum(pmf * t))
    return mean, float(np.sum(pmf * (t - mean) ** 2))


@pytest.mark.parametrize("sampling,mean,std", [("uniform", 0.0, 1.0), ("logit_normal", 0.4, 1.0),
                                               ("logit_normal", -0.8, 1.6)])
def test_time_samplers_have_their_grid_distributions_moments(sampling, mean, std):
    cells, n = 16, 200_000
    obj = objective(t_sampling=sampling, t_mean=mean, t_std=std)
    t = np.asarray(obj.grid_times(jax.random.PRNGKey(0), jnp.full((n,), cells)))
    assert np.allclose(t * cells, np.round(t * cells)) and t.min() >= 0 and t.max() <= (cells - 1) / cells
    if sampling == "uniform":
        pmf = np.full(cells, 1 / cells)
    else:  # k/n carries the logit-normal mass of [k/n, (k+1)/n)
        edges = stats.norm.cdf((stats.logistic.ppf(np.arange(cells + 1) / cells) - mean) / std)
        pmf = np.diff(edges)
    want_mean, want_var = grid_moments(cells, pmf)
    se = np.sqrt(want_var / n)
    assert abs(t.mean() - want_mean) < 5 * se
    assert t.var() == pytest.approx(want_var, rel=0.02)


def test_bootstrap_times_stay_on_each_levels_grid():
    obj = objective(t_sampling="logit_normal", t_mean=0.4)
    levels = np.array([3, 2, 1, 0] * 500)
    t = np.asarray(obj.grid_times(jax.random.PRNGKey(1), jnp.asarray(2 ** levels)))
    d = 2.0 ** -levels
    assert np.allclose(t / d, np.round(t / d)) and np.all(t <= 1 - d)


def test_uniform_split_at_half_equals_the_papers_target():
    obj = objective(split="uniform")
    levels = np.array([6, 5, 3, 0])
    x_t = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 1))
    t = jnp.array([0.25, 0.5, 0.0, 0.0])
    labels = jnp.arange(4)
    apply = lambda p, x, tt, d, y: jnp.tanh(x * p + tt[:, None, None, None] - 2 * d[:, None, None, None])  # noqa: E731
    today = obj.bootstrap_target(apply, 1.7, x_t, t, levels, labels)
    half = jnp.asarray(2.0 ** -levels / 2, jnp.float32)
    split = obj.bootstrap_target(apply, 1.7, x_t, t, levels, labels, first=half)
    np.testing.assert_allclose(np.asarray(split), np.asarray(today), rtol=1e-6, atol=1e-7)


def test_uniform_split_points_are_inside_each_step_on_the_fine_grid():
    obj = objective(split="uniform")
    levels = np.array([6, 5, 2, 0] * 300)
    first = np.asarray(obj.split_points(jax.random.PRNGKey(2), levels)) * 128
    d_fine = 128 / 2 ** levels
    assert np.allclose(first, np.round(first)) and np.all(first >= 1) and np.all(first <= d_fine - 1)
    assert np.all(first[levels == 6] == 1)  # d = 2/M has one split point, its half
    assert len(np.unique(first[levels == 0])) > 50  # d = 1 splits anywhere on the grid


def test_default_keys_keep_todays_targets_and_hashes():
    """Every new key at its default: the same targets as the paper's recipe, and no spec hash changes."""
    batch = {"image": jax.random.normal(jax.random.PRNGKey(5), (24, 4, 4, 1)), "label": jnp.arange(24) % 10}
    apply = lambda p, x, t, d, y: jnp.sin(x * p + t[:, None, None, None])  # noqa: E731
    ctx = Context(apply, 1.3, 0.7)
    a = objective().targets(jax.random.PRNGKey(3), batch, ctx)
    b = objective(split="half", t_sampling="uniform", ot_pairing="none", loss="l2").targets(
        jax.random.PRNGKey(3), batch, ctx)
    for x, y in zip(a[:6], b[:6]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    spec = load_spec("digits_shortcut")
    defaults = ["method.split=half", "method.t_sampling=uniform", "method.ot_pairing=none", "method.loss=l2",
                "method.loss_weighting=none", "method.wavelet_levels=1"]
    assert load_spec("digits_shortcut", defaults).hash() == spec.hash()
    assert load_spec("digits_shortcut", ["method.loss=wavelet"]).hash() != spec.hash()


def test_ot_pairing_changes_only_which_noise_goes_with_which_image():
    batch = {"image": jax.random.normal(jax.random.PRNGKey(6), (16, 4, 4, 1)), "label": jnp.arange(16) % 10}
    ctx = Context(lambda p, x, t, d, y: x * 0, None, None)
    tg = objective(ot_pairing="exact", bootstrap_fraction=0.0).targets(jax.random.PRNGKey(7), batch, ctx)
    # flow rows: v = x1 - x0, so the noise is x1 - v; it is a permutation of one fresh draw
    noise = np.asarray(batch["image"] - tg.v).reshape(16, -1)
    k_pair, k_draw = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), 1))
    drawn = np.asarray(jax.random.normal(k_draw, (16, 4, 4, 1))).reshape(16, -1)
    assert sorted(map(tuple, noise.round(5))) == sorted(map(tuple, drawn.round(5)))
    assert np.sum((noise - np.asarray(batch["image"]).reshape(16, -1)) ** 2) < \
        np.sum((drawn - np.asarray(batch["image"]).reshape(16, -1)) ** 2)
