"""dp vs fsdp on 8 fake CPU devices, a checkpoint restored on 4, and the device prefetcher's exact position."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut import methods
from shortcut.checkpoint import Checkpointer
from shortcut.data import make_mock_iterator
from shortcut.data.iterators import unpack_state
from shortcut.data.prefetch import DevicePrefetcher
from shortcut.spec_files import load_spec
from shortcut.train import build_model, init_state, make_apply_fn, make_optimizer, make_train_step, restore, train

REPO = Path(__file__).resolve().parents[1]

# XLA_FLAGS must be set before jax is imported, hence a subprocess. digits_flow with a one-block DiT of
# width 128: every kernel is over sharding.MIN_SHARD_BYTES, so fsdp splits most of the state.
FSDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    from shortcut import methods
    from shortcut.checkpoint import Checkpointer
    from shortcut.data import make_mock_iterator
    from shortcut.sharding import Parallel, bytes_per_device
    from shortcut.spec_files import load_spec
    from shortcut.train import (build_model, init_state, make_apply_fn, make_optimizer, make_train_step, restore,
                                train)

    spec = load_spec("digits_flow", ["model.size=null", "model.hidden_size=128", "model.depth=1",
                                     "model.num_heads=4", "train.steps=20", "train.batch_size=16",
                                     "train.log_every=1", "train.checkpoint_every=10"])
    model, optimizer, objective = build_model(spec), make_optimizer(spec.optimizer), methods.make_objective(spec)
    tmp, out, final = Path(sys.argv[1]), {}, {}
    for strategy in ("dp", "fsdp"):
        parallel = Parallel.create(16, strategy)
        state = parallel.place(init_state(spec, model, optimizer, objective))
        step = make_train_step(make_apply_fn(model), objective, optimizer, spec, parallel, state)
        data = make_mock_iterator(image_shape=(8, 8, 1), num_classes=10, batch_size=16, seed=0)
        result = train(spec, state, step, data, Checkpointer(tmp / strategy, keep=2), shard=parallel.shard,
                       log=lambda s: None)
        final[strategy] = result.state
        leaves = jax.tree.leaves((result.state.params, result.state.ema_params, result.state.opt_state))
        out[strategy] = {"loss": [h["loss"] for h in result.history],
                         "param_bytes": sorted(bytes_per_device(result.state.params).values()),
                         "state_bytes": max(bytes_per_device(result.state).values()),
                         "sharded_leaves": sum(not x.sharding.is_fully_replicated for x in leaves)}
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
             zip(jax.tree.leaves(final["dp"].params), jax.tree.leaves(final["fsdp"].params))]
    out["param_max_abs_diff"] = max(diffs)
    out["param_scale"] = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(final["dp"].params))

    # The fsdp checkpoint (written sharded over 8 devices) restored onto a mesh of 4.
    four = Parallel.create(16, "fsdp", devices=jax.devices()[:4])
    like = four.place(init_state(spec, model, optimizer, objective))
    checkpointer = Checkpointer(tmp / "fsdp", keep=2)
    restored, _ = restore(checkpointer, checkpointer.latest_step(), like)
    checkpointer.close()
    out["restored"] = {
        "step": int(restored.step),
        "devices": sorted({d.id for x in jax.tree.leaves(restored.params) for d in x.sharding.device_set}),
        "param_bytes": sorted(bytes_per_device(restored.params).values()),
        "max_abs_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                            zip(jax.tree.leaves((restored.params, restored.opt_state)),
                                jax.tree.leaves((final["fsdp"].params, final["fsdp"].opt_state))))}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(tmp_path_factory.mktemp("fsdp"))], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_trains_like_dp(fsdp_run):
    dp, fsdp = fsdp_run["dp"], fsdp_run["fsdp"]
    assert len(dp["loss"]) == len(fsdp["loss"]) == 20
    np.testing.assert_allclose(fsdp["loss"], dp["loss"], rtol=1e-5, atol=1e-6)
    # 20 AdamW steps amplify the different reduction order (all-reduce vs reduce-scatter) a little.
    assert fsdp_run["param_max_abs_diff"] <= 1e-4 * max(fsdp_run["param_scale"], 1.0)


def test_fsdp_shards_the_state_about_one_eighth_per_device(fsdp_run):
    dp, fsdp = fsdp_run["dp"], fsdp_run["fsdp"]
    assert dp["sharded_leaves"] == 0 and fsdp["sharded_leaves"] > 0
    assert len(set(dp["param_bytes"])) == 1 and len(dp["param_bytes"]) == 8  # replicated: the same on each
    ratio = fsdp["param_bytes"][-1] / dp["param_bytes"][-1]
    assert 1 / 8 <= ratio < 0.16, ratio  # 1/8 of the kernels plus the small replicated arrays
    assert fsdp["state_bytes"] / dp["state_bytes"] < 0.16


def test_fsdp_checkpoint_from_8_devices_restores_on_4(fsdp_run):
    r = fsdp_run["restored"]
    assert r["step"] == 20 and len(r["devices"]) == 4 and len(r["param_bytes"]) == 4
    assert r["max_abs_diff"] == 0.0
    assert r["param_bytes"][-1] / (fsdp_run["dp"]["param_bytes"][-1]) < 0.3  # sharded over the 4


# ---------------------------------------------------------------- device prefetcher


class _Counter:
    """Batches {"i": [n]}; the state is the next n."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        return {"i": np.array([self.n])}

    def get_state(self) -> bytes:
        return str(self.n).encode()

    def set_state(self, state: bytes) -> None:
        self.n = int(state)


def _wait_full(prefetcher: DevicePrefetcher) -> None:
    deadline = time.time() + 30
    while not prefetcher._queue.full() and time.time() < deadline:
        time.sleep(0.01)


def test_prefetcher_keeps_batches_in_flight_and_saves_the_consumed_position():
    inner = _Counter()
    p = DevicePrefetcher(inner, lambda b: b["i"][0], size=2, snapshot_at=lambda n: n == 3)
    assert [next(p) for _ in range(3)] == [1, 2, 3]
    _wait_full(p)
    assert inner.n >= 5  # two batches queued beyond the three consumed
    assert p.get_state() == b"3"  # the snapshot taken before batch 4 was fetched
    assert next(p) == 4
    _wait_full(p)
    mid = p.get_state()  # not a snapshot step: inner position + the fetched, unconsumed batches
    meta, files = unpack_state(mid)
    assert meta["kind"] == "prefetched" and meta["pending"] >= 2
    p.close()

    resumed = DevicePrefetcher(_Counter(), lambda b: b["i"][0], size=2, start=4)
    resumed.set_state(mid)
    assert [next(resumed) for _ in range(4)] == [5, 6, 7, 8]
    resumed.close()

    plain = DevicePrefetcher(_Counter(), lambda b: b["i"][0], size=2)
    plain.set_state(b"10")  # a checkpoint saved without pending batches: the inner state as is
    assert next(plain) == 11
    plain.close()


def test_prefetcher_raises_the_inner_error_in_order():
    class Failing(_Counter):
        def __next__(self):
            if self.n == 2:
                raise StopIteration
            return super().__next__()

    p = DevicePrefetcher(Failing(), lambda b: int(b["i"][0]), size=2)
    assert [next(p), next(p)] == [1, 2]
    with pytest.raises(StopIteration):
        next(p)
    p.close()


def test_interrupt_between_checkpoints_resumes_exactly(tmp_path):
    """Ctrl-C mid-interval saves the prefetched-but-unconsumed batches with the data state; the resumed
    run replays them and ends bit for bit where an uninterrupted run does."""
    spec = load_spec("digits_flow", ["model.size=null", "model.hidden_size=32", "model.depth=1",
                                     "model.num_heads=2", "train.steps=12", "train.batch_size=8",
                                     "train.log_every=1", "train.checkpoint_every=5"])
    model, optimizer, objective = build_model(spec), make_optimizer(spec.optimizer), methods.make_objective(spec)
    step = make_train_step(make_apply_fn(model), objective, optimizer, spec)
    data = lambda: make_mock_iterator(image_shape=(8, 8, 1), num_classes=10, batch_size=8, seed=0)
    quiet = lambda s: None
    initial = init_state(spec, model, optimizer)
    fresh = lambda: jax.tree.map(jnp.copy, initial)  # the step donates its input

    straight = train(spec, fresh(), step, data(), Checkpointer(tmp_path / "a", keep=2), log=quiet).state

    def interrupt(metrics):
        if metrics["step"] == 7:
            time.sleep(0.5)  # the prefetch thread fills its queue
            raise KeyboardInterrupt

    ckpt = Checkpointer(tmp_path / "b", keep=5)
    with pytest.raises(KeyboardInterrupt):
        train(spec, fresh(), step, data(), ckpt, log=quiet, on_log=interrupt)
    assert ckpt.all_steps() == [5, 7]
    _, data_state = restore(ckpt, 7, initial)
    assert unpack_state(data_state)[0]["kind"] == "prefetched"
    resumed = train(spec, fresh(), step, data(), ckpt, log=quiet)
    assert resumed.resumed_from == 7
    for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)),
                    jax.tree.leaves((resumed.state.params, resumed.state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_during_a_step_checkpoints_the_step_it_finished(tmp_path):
    """SIGTERM arriving inside the (state-donating) train step stops training after that step, with a
    checkpoint of it: the handler only sets a flag, so no exception lands between the step and the
    assignment of its result (which left `state` pointing at deleted buffers)."""
    spec = load_spec("digits_flow", ["model.size=null", "model.hidden_size=32", "model.depth=1",
                                     "model.num_heads=2", "train.steps=12", "train.batch_size=8",
                                     "train.log_every=1", "train.checkpoint_every=5"])
    model, optimizer, objective = build_model(spec), make_optimizer(spec.optimizer), methods.make_objective(spec)
    real_step = make_train_step(make_apply_fn(model), objective, optimizer, spec)
    calls = []

    def step(state, batch):
        out = real_step(state, batch)  # `state` is donated from here on
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    ckpt = Checkpointer(tmp_path / "c", keep=5)
    before = signal.getsignal(signal.SIGTERM)
    data = make_mock_iterator(image_shape=(8, 8, 1), num_classes=10, batch_size=8, seed=0)
    with pytest.raises(KeyboardInterrupt, match="signal"):
        train(spec, init_state(spec, model, optimizer), step, data, ckpt, log=lambda s: None)
    assert ckpt.all_steps() == [3] and len(calls) == 3
    assert signal.getsignal(signal.SIGTERM) is before
