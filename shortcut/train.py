"""The training loop: one jit-compiled step (targets, loss, AdamW, EMA), checkpoints, resume.

Randomness per step is `fold_in(base_key, step)`, so a resumed run draws exactly the numbers an
uninterrupted run would have drawn, and its parameters match bit for bit on the same machine.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from shortcut import methods, progress
from shortcut.checkpoint import Checkpointer
from shortcut.compute import program_flops
from shortcut.data.prefetch import DevicePrefetcher
from shortcut.errors import ShortcutError
from shortcut.model import DiT, example_inputs
from shortcut.objective import Context, Objective
from shortcut.sharding import Parallel
from shortcut.spec import OptimizerSpec, Spec


class NonFiniteLossError(ShortcutError, RuntimeError):
    """Training produced a NaN/inf; the last good checkpoint is kept untouched."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # base key; step keys are fold_in(rng, step)
    aux: Any = None  # the objective's own state (e.g. a teacher's parameters)
    # EMAs beyond the first, one per further decay of optimizer.ema_decay (None with one decay: the state
    # and its checkpoints are then exactly what they were before twin EMA).
    more_ema: Any = None

    @property
    def target_ema(self) -> Any:
        """The EMA objectives build targets with: the last decay's (the only one with a single decay)."""
        return self.more_ema[-1] if self.more_ema else self.ema_params


def fresh_emas(params, decays: tuple[float, ...]) -> tuple[Any, Any]:
    """(ema_params, more_ema) all starting at `params`: the first decay's EMA and a tuple of the others (None
    with one decay)."""
    copy = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731
    return copy(), (tuple(copy() for _ in decays[1:]) or None)


def update_emas(state: TrainState, params, decays: tuple[float, ...]) -> tuple[Any, Any]:
    """(ema_params, more_ema) after one step to `params`: each EMA e <- decay e + (1 - decay) params with its
    own decay (twin EMA: iSM, arXiv 2510.21250, a fast EMA for the targets and a slow one to evaluate)."""
    ema = lambda e, decay: jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, e, params)  # noqa: E731
    more = tuple(ema(e, decay) for e, decay in zip(state.more_ema or (), decays[1:])) or None
    return ema(state.ema_params, decays[0]), more


def build_model(spec: Spec) -> DiT:
    """The spec's DiT, with the extra inputs its method asks for (Objective.network_options)."""
    m = spec.model
    return DiT(hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
               patch_size=m.patch_size, out_channels=spec.input_shape[-1], num_classes=spec.data.num_classes,
               d_conditioning=m.d_conditioning, dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
               architecture=m.architecture, **methods.objective_class(spec.method.name).network_options(spec.method))


def make_apply_fn(model: DiT) -> Callable:
    """ApplyFn(params, x, t, d, labels, cond=None) -> velocity, the signature objectives use."""
    return lambda params, x, t, d, labels, cond=None: model.apply({"params": params}, x, t, d, labels, cond)


def learning_rate(opt: OptimizerSpec) -> optax.Schedule:
    if opt.warmup_steps:
        return optax.linear_schedule(0.0, opt.lr, opt.warmup_steps)
    return optax.constant_schedule(opt.lr)


def make_optimizer(opt: OptimizerSpec) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(opt), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw) if opt.grad_clip else adamw


def init_state(spec: Spec, model: DiT, optimizer: optax.GradientTransformation, objective: Objective | None = None,
               teacher_params=None) -> TrainState:
    key = jax.random.PRNGKey(spec.seed)
    init_key, train_key = jax.random.split(key)
    params = model.init(init_key, *example_inputs(model, spec.input_shape))["params"]
    aux = objective.init_aux(params, teacher_params) if objective is not None else None
    ema, more = fresh_emas(params, spec.optimizer.ema_decays)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=optimizer.init(params),
                      rng=train_key, aux=aux, more_ema=more)


def make_train_step(apply_fn: Callable, objective: Objective, optimizer: optax.GradientTransformation,
                    spec: Spec, parallel: Parallel | None = None, state: TrainState | None = None) -> Callable:
    """The jit-compiled update: (state, batch) -> (state, metrics). With `parallel` (and the `state`
    whose shapes it shards) it is compiled with the state's dp/fsdp shardings and the batch split over
    the devices, so the state keeps its sharding from step to step."""
    decays = spec.optimizer.ema_decays
    schedule = learning_rate(spec.optimizer)
    groups = objective.groups

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        ctx = Context(apply_fn, state.params, state.target_ema, state.step, state.aux)
        tg = objective.targets(key, batch, ctx)

        # `loss` is the optimised objective (weighted where the objective weights rows); the per-group
        # losses are plain MSEs, comparable across steps and methods.
        (loss, per_row), grads = jax.value_and_grad(lambda p: objective.loss(apply_fn, p, tg), has_aux=True)(
            state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema, more_ema = update_emas(state, params, decays)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        for i, name in enumerate(groups):
            mask = tg.group == i
            metrics[f"loss_{name}"] = jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                                  more_ema=more_ema)
        aux = objective.next_aux(state.aux, params=params, ema_params=new_state.target_ema, step=new_state.step)
        return new_state.replace(aux=aux), metrics

    if parallel is None:
        return jax.jit(step, donate_argnums=0)
    state_sharding = parallel.state_shardings(state)
    return jax.jit(step, donate_argnums=0, in_shardings=(state_sharding, parallel.data),
                   out_shardings=(state_sharding, parallel.replicated))


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]
    resumed_from: int | None
    seconds: float


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGINT, seen between steps: an interruption like Ctrl-C (the run records "interrupted")."""


class StopTraining(Exception):
    """Raised by a hook (e.g. a sweep scheduler's early stop) to end training early; the state at that
    point is checkpointed and the run is recorded as stopped, with this exception's message as the reason."""


class _StopSignals:
    """SIGTERM and SIGINT set a flag that the loop checks between steps. Raising from the handler itself
    could land between the donating train step and the assignment of its result, leaving `state` deleted."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        # Handlers can only be installed from the main thread (a Ray Tune trial runs in another one).
        self.installed = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if self.installed else {}

    def _handle(self, signum, frame):
        self.received = signum

    def check(self) -> None:
        if self.received is not None:
            raise _Terminated(f"signal {self.received}")

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(spec: Spec, state: TrainState, train_step: Callable, data: Iterator, checkpointer: Checkpointer,
          *, shard: Callable = lambda x: x, log: Callable[[str], None] = print,
          on_log: Callable[[dict], None] = lambda m: None,
          on_eval: Callable[[TrainState, int], None] | None = None,
          on_curve: Callable[[TrainState, int], None] | None = None,
          on_compiled: Callable[[float | None], None] = lambda flops: None, prefetch: int = 2) -> TrainResult:
    """Run `spec.train.steps` steps from the latest checkpoint (if any), checkpointing as configured,
    calling `on_eval(state, step)` every `spec.eval.every` steps and `on_curve(state, step)` every
    `spec.eval.curve_every` steps (not at the end: the caller evaluates there). Before the first step,
    `on_compiled` gets the FLOPs of one compiled train step (compute.py; None if unknown).
    `prefetch` batches are put on the devices (`shard`) ahead of the step that takes them."""
    cfg = spec.train
    resumed_from, data_state = None, None
    found = resume(checkpointer, state, log=log, set_aside=True)
    if found is not None:
        resumed_from, (state, data_state) = found
    start = int(state.step)

    def saved_at(n: int) -> bool:  # the steps whose data position a checkpoint may need
        return n == cfg.steps or n % cfg.checkpoint_every == 0 or bool(spec.eval.every) and n % spec.eval.every == 0

    data = DevicePrefetcher(data, lambda batch: {k: shard(v) for k, v in batch.items()}, size=prefetch, start=start,
                            snapshot_at=saved_at)
    if data_state is not None:
        data.set_state(data_state)
        log(f"resumed from checkpoint at step {resumed_from}")
    history: list[dict] = []
    last_saved = resumed_from
    bar = progress.bar(cfg.steps, f"{spec.name} train", unit="step", initial=start)
    signals = _StopSignals()
    t0 = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    step = start
    try:
        for step in range(start, cfg.steps):
            signals.check()
            batch = next(data)
            if step == start and hasattr(train_step, "lower"):
                on_compiled(program_flops(train_step, state, batch))
            state, metrics = train_step(state, batch)
            window_steps += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(
                        f"non-finite loss {metrics['loss']} at step {done}; last good checkpoint: "
                        f"{last_saved if last_saved is not None else 'none'} in {checkpointer.directory}. "
                        "Lower optimizer.lr or set optimizer.grad_clip.")
                now = time.perf_counter()
                metrics.update(step=done, steps_per_sec=window_steps / (now - window_start))
                window_start, window_steps = now, 0
                history.append(metrics)
                on_log(metrics)
                bar.note(f"loss {metrics['loss']:.4f}")
                if not bar.shown:  # the plain lines where no bar stands in for them
                    log(" ".join([f"step {done}/{cfg.steps}"] + [f"{k} {v:.4g}" for k, v in metrics.items()
                                                                 if k not in ("step", "lr")]))
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                last_saved = _save(checkpointer, done, state, data)
            if on_eval and spec.eval.every and done % spec.eval.every == 0 and done < cfg.steps:
                on_eval(state, done)
            if on_curve and spec.eval.curve_every and done % spec.eval.curve_every == 0 and done < cfg.steps:
                on_curve(state, done)
            bar.update(1)
        signals.check()
        if last_saved != cfg.steps:
            last_saved = _save(checkpointer, cfg.steps, state, data)
    except (KeyboardInterrupt, StopTraining) as e:  # _Terminated is a KeyboardInterrupt
        done = int(state.step)
        if done != last_saved and _finite(state):
            log(f"{'stopped' if isinstance(e, StopTraining) else 'interrupted'}: saving a checkpoint at step {done}")
            _save(checkpointer, done, state, data)
        raise
    finally:
        data.close()
        checkpointer.wait()
        signals.restore()
        bar.close()
    return TrainResult(state, history, resumed_from, time.perf_counter() - t0)


def checkpoint_tree(state: TrainState) -> dict:
    """The state as its checkpoints hold it: a mapping of its fields, `more_ema` left out with one EMA, so that
    a one-EMA checkpoint is exactly what it was before twin EMA (and those checkpoints restore)."""
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if tree["more_ema"] is None:
        del tree["more_ema"]
    return tree


def restore(checkpointer: Checkpointer, step: int, like: TrainState) -> tuple[TrainState, bytes]:
    """`Checkpointer.restore` for a TrainState: (state, data iterator bytes) saved at `step`, with the structure
    and shardings of `like` (its checkpoint_tree)."""
    tree, data = checkpointer.restore(step, checkpoint_tree(like))
    return TrainState(**tree), data


def resume(checkpointer: Checkpointer, like: TrainState, **kwargs) -> tuple[int, tuple[TrainState, bytes]] | None:
    """`Checkpointer.resume` for a TrainState: (step, (state, data iterator bytes)) of the newest readable step,
    with the structure and shardings of `like`; None when there is no checkpoint."""
    return checkpointer.restore_latest(lambda step: restore(checkpointer, step, like), **kwargs)


def _finite(state: TrainState) -> bool:
    leaves = jax.tree.leaves(state.params)
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def _save(checkpointer: Checkpointer, step: int, state: TrainState, data) -> int:
    if not _finite(state):
        raise NonFiniteLossError(f"parameters became non-finite by step {step}; not saving over the last good "
                                 f"checkpoint in {checkpointer.directory}")
    checkpointer.save(step, checkpoint_tree(state), data.get_state())
    return step
