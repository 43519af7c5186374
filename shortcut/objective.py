"""Training objectives: the interface, the shared flow-matching targets, and the shortcut objective.

Conventions (paper, checked against the official code):
  x_t = (1 - t) x0 + t x1, noise x0 ~ N(0, I) at t = 0, data x1 at t = 1; the network s(x_t, t, d, y)
  predicts a velocity; the flow-matching target is x1 - x0. d is a step size in (0, 1], a power of
  two; M = `denoise_timesteps` is the finest step count, so d = 1/M is the finest level.

An objective has two jobs: `targets` builds regression targets for a batch, `sample` generates with
N steps. The train loop, checkpointing and evaluation call only these and never branch on the
method's name. `ApplyFn(params, x, t, d, labels) -> velocity` is how objectives call the network (with `cond=` when
the method asked for extra conditioning inputs, `Objective.network_options`);
`Context` carries what targets may depend on besides the batch (parameters, EMA parameters, the
step, and `aux`: state the objective owns, such as a distillation teacher's parameters).

Choices where the paper and the official code differ (official default kept unless stated):
  * flow rows use t on the grid {0, 1/M, .., (M-1)/M} and are conditioned on d = 1/M (the paper
    writes d = 0); 128-step sampling uses the same level.
  * the path has no 1e-5 offset (the official code uses x_t = (1-(1-1e-5)t) x0 + t x1): paper form.
  * bootstrap_fraction defaults to the paper's 0.25 (Table 3) and the levels are spread evenly
    (`bootstrap_levels: even`); the official code uses 1/8 with floor(nb / K) rows per level and the
    remainder at d = 1 (`bootstrap_levels: official`), which the CelebA-HQ / ImageNet specs follow.
  * bootstrap and flow rows are disjoint slices of the batch (the official code takes its flow rows
    from the first 7/8 of the batch, so the first eighth is used twice and the last never), and draw
    their own times and noise (the official code reuses the keys).
  * the intermediate point and the bootstrap target are clipped to [-4, 4] like the official code
    (`bootstrap_clip`, None disables it).

Later recipe choices, each a key whose default is the paper's recipe (docs/methods.md, "The shortcut
design space"): `split`, `t_sampling`, `ot_pairing` (and `ot_pool`, `ot_classes`), `loss`, `loss_weighting`, `guidance`
(iSM's intrinsic guidance, w an input of the network) and `guidance_interval`; twin EMA is
`optimizer.ema_decay` given as a list (shortcut/train.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field, model_validator

from shortcut import guidance, losses, pairing
from shortcut.errors import InputError
from shortcut.methods import MethodConfig

ApplyFn = Callable[..., jax.Array]  # (params, x, t, d, labels, cond=None) -> velocity


class Targets(NamedTuple):
    """A batch of regression targets: the network is trained so that s(x_t, t, d, labels) ~ v."""

    x_t: jax.Array
    t: jax.Array
    d: jax.Array
    labels: jax.Array
    v: jax.Array
    group: jax.Array  # int [B]: index into the objective's `groups`, for separate loss logging
    weight: jax.Array | None = None  # per-row loss weight [B]; None = 1
    cond: dict | None = None  # the extra conditioning inputs {name: [B]} (Objective.network_options)


class Context(NamedTuple):
    """What an objective's targets may use besides the batch."""

    apply_fn: ApplyFn
    params: Any
    ema_params: Any
    step: jax.Array | int = 0
    aux: Any = None


def expand(a: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcast a per-example vector [B] against a batch [B, ...]."""
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """The linear path x_t = (1 - t) x0 + t x1 (noise at t = 0, data at t = 1), t per example."""
    return (1 - expand(t, x1)) * x0 + expand(t, x1) * x1


def drop_labels(key: jax.Array, labels: jax.Array, prob: float, null_class: int) -> jax.Array:
    """Replace each label by the null class with probability `prob` (classifier-free guidance)."""
    if prob <= 0:
        return labels
    return jnp.where(jax.random.bernoulli(key, prob, labels.shape), null_class, labels)


def flow_targets(key: jax.Array, images: jax.Array, labels: jax.Array, *, m: int, class_dropout: float,
                 null_class: int, t: jax.Array | None = None, x0: jax.Array | None = None) -> Targets:
    """Flow-matching targets: t on the grid k/M, d = 1/M, v = x1 - x0, labels dropped to the null class.
    `t` and the noise `x0` are drawn here (t uniform on the grid) unless given."""
    k_t, k_noise, k_label = jax.random.split(key, 3)
    b = images.shape[0]
    if t is None:
        t = jax.random.randint(k_t, (b,), 0, m).astype(jnp.float32) / m
    if x0 is None:
        x0 = jax.random.normal(k_noise, images.shape, images.dtype)
    x_t = interpolate(x0, images, t)
    d = jnp.full((b,), 1.0 / m, jnp.float32)
    return Targets(x_t, t, d, drop_labels(k_label, labels, class_dropout, null_class), images - x0,
                   jnp.zeros((b,), jnp.int32))


def predict(apply_fn: ApplyFn, params, tg: Targets) -> jax.Array:
    """The network at the targets' inputs (with their extra conditioning when there is some)."""
    if tg.cond is None:
        return apply_fn(params, tg.x_t, tg.t, tg.d, tg.labels)
    return apply_fn(params, tg.x_t, tg.t, tg.d, tg.labels, cond=tg.cond)


def row_mse(apply_fn: ApplyFn, params, tg: Targets) -> jax.Array:
    """Each row's mean squared error [B] between the network at the targets' inputs and their v."""
    return losses.mse_rows(predict(apply_fn, params, tg), tg.v)


def guided_velocity(apply_fn: ApplyFn, params, x, t, d, labels, cfg_scale: float, null_class: int) -> jax.Array:
    """s(x, t, d, y) with classifier-free guidance: uncond + w (cond - uncond); w = 1 is plain conditional."""
    if cfg_scale == 1.0:
        return apply_fn(params, x, t, d, labels)
    both = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([d, d]),
                    jnp.concatenate([labels, jnp.full_like(labels, null_class)]))
    cond, uncond = jnp.split(both, 2)
    return uncond + cfg_scale * (cond - uncond)


def euler_sample(apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
                 d_cond: float, cfg_scale: float, null_class: int, interval=None) -> jax.Array:
    """N Euler steps of size 1/N from t = 0 (noise) to t = 1, conditioning the network on `d_cond`; with a
    guidance `interval` [t_lo, t_hi], a step whose start i/N lies outside it is unguided (one network call)."""
    b = noise.shape[0]
    dt = 1.0 / num_steps
    d = jnp.full((b,), d_cond, jnp.float32)

    def step(i, x):
        t = jnp.full((b,), i * dt, jnp.float32)
        if interval is None or cfg_scale == 1.0:
            return x + dt * guided_velocity(apply_fn, params, x, t, d, labels, cfg_scale, null_class)
        v = jax.lax.cond(guidance.in_interval(i * dt, interval),
                         lambda: guided_velocity(apply_fn, params, x, t, d, labels, cfg_scale, null_class),
                         lambda: apply_fn(params, x, t, d, labels))
        return x + dt * v

    return jax.lax.fori_loop(0, num_steps, step, noise)


class Objective:
    """Base of every method: `targets` for training, `sample` with N steps (see module docstring).

    A method is one module with a subclass of this and its `Config`, registered under the entry-point
    group `shortcut.methods` (shortcut/methods.py). Everything below with a default is optional.
    """

    Config: type[MethodConfig] = MethodConfig
    groups: tuple[str, ...] = ("flow",)  # names of Targets.group values, for loss logging
    display_name: str = ""  # the method's name in tables (default: its spec name, title-cased)
    table_order: float = 100.0  # row order in tables: Table 1's end-to-end methods, then two-phase ones

    def __init__(self, config: MethodConfig, *, num_classes: int):
        self.config = config
        self.null_class = num_classes  # the label table's extra row

    @classmethod
    def from_spec(cls, spec) -> "Objective":
        """The objective of a resolved spec; override when it needs more of the spec than `method`."""
        return cls(spec.method, num_classes=spec.data.num_classes)

    @staticmethod
    def smoke_method(method: dict) -> dict:
        """The `method:` section of a --smoke run (e.g. fewer reflow pairs); unchanged by default."""
        return method

    @classmethod
    def network_options(cls, config: MethodConfig) -> dict:
        """What the method asks of the network (shortcut/model.py DiT fields): `conditioning`, the names of
        extra scalar inputs, and `log_variance`; nothing by default, so the network is the plain DiT."""
        return {}

    @property
    def init_from_teacher(self) -> bool:
        """Whether the student starts from its teacher's weights (a config option of distillation methods)."""
        return False

    @property
    def teacher_in_student_network(self) -> bool:
        """Whether the teacher's parameters go through the student's network (distillation, a warm start), so
        that both must have the same architecture; a method that only samples from its teacher says no."""
        return True

    def training_data(self, dataset: Callable[[], Any], *, spec, teacher, rundir, log: Callable[[str], None]) -> Any:
        """The iterator of training batches (this process's): by default the spec's dataset, `dataset()` (made
        only when called). A method that trains on something else makes it here from its `teacher`
        (shortcut/teacher.py Teacher), in its run directory `rundir` (reflow: pairs its teacher generates),
        or wraps `dataset()`."""
        return dataset()

    def batch_inputs(self, image, label) -> dict:
        """One training batch as the train step receives it, from the dataset's image and label arrays (or
        their shapes): what `training_data` yields. A method whose data carries more adds it here."""
        return {"image": image, "label": label}

    def preparation_flops(self, spec, teacher) -> dict[str, float | None]:
        """Compute spent on the run's training data before its first step, beyond the teacher's own training,
        by its key in the record's `compute` (reflow: {"pairs_flops": the teacher's sampling}); none by default."""
        return {}

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        """Regression targets for a batch {"image": [B,H,W,C] in [-1,1], "label": [B], ...}."""
        raise NotImplementedError

    def loss(self, apply_fn: ApplyFn, params, tg: Targets) -> tuple[jax.Array, jax.Array]:
        """(the loss the optimiser minimises, each row's plain MSE): by default the mean of the rows' `row_loss`
        times their `weight`; a method with a loss of another form (e.g. a learned weighting) overrides it."""
        pred = predict(apply_fn, params, tg)
        rows = self.row_loss(pred, tg.v)
        weighted = rows if tg.weight is None else rows * tg.weight
        return jnp.mean(weighted), losses.mse_rows(pred, tg.v)

    def init_aux(self, params, teacher_params=None) -> Any:
        """The objective's own training state (kept in the TrainState and checkpointed); None by default."""
        return None

    def row_loss(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        """The optimised loss of each row [B] (before Targets.weight): mean squared error by default."""
        return losses.mse_rows(pred, target)

    def next_aux(self, aux, *, params, step: jax.Array, ema_params=None) -> Any:
        """Update `aux` after an optimizer step (inside jit); `step` is the number of steps done;
        params / ema_params are the parameters after that step."""
        return aux

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        raise NotImplementedError

    def network_evaluations(self, num_steps: int, cfg_scale: float = 1.0) -> int:
        """Network calls per sample (CFG doubles them)."""
        return num_steps * (1 if cfg_scale == 1.0 else 2)


class ShortcutConfig(MethodConfig):
    bootstrap_fraction: float = Field(default=0.25, ge=0, lt=1, description="share of each batch with bootstrap targets")
    bootstrap_levels: Literal["even", "official"] = Field(
        default="even", description="how bootstrap rows are spread over the K = log2(M) levels: even (counts differ "
        "by at most one, the remainder to the coarsest levels) or official (floor(n / K) rows per level, the "
        "remainder at d = 1, as the official code)")
    bootstrap_ema: bool = Field(default=True, description="build bootstrap targets with the EMA parameters")
    bootstrap_cfg: bool = Field(default=False, description="finest bootstrap level uses CFG with cfg_scale")
    cfg_scale: float = Field(default=1.5, description="w for bootstrap_cfg")
    bootstrap_clip: float | None = Field(default=4.0, gt=0)
    # The design space of later work (docs/methods.md); every default is the paper's recipe.
    split: Literal["half", "uniform"] = Field(
        default="half", description="where the two-step bootstrap target splits a step d: at d/2 (the paper) or "
        "at a uniform multiple of 1/M inside it (the SplitMeanFlow identity)")
    t_sampling: Literal["uniform", "logit_normal"] = Field(
        default="uniform", description="how flow and bootstrap rows draw t on their grids: uniform (the paper) or "
        "logit-normal (ESC), t = sigmoid(t_mean + t_std * n) in this framework's time (t = 1 data) rounded down "
        "to the row's grid")
    t_mean: float = Field(default=0.0, description="logit_normal: mean of logit(t), in this framework's time "
                          "(ESC's -0.4 with t = 1 noise is +0.4 here)")
    t_std: float = Field(default=1.0, gt=0, description="logit_normal: standard deviation of logit(t)")
    ot_pairing: pairing.Pairing = Field(
        default="none", description="noise-data pairing within each batch: none (independent), exact (the "
        "minibatch optimal assignment, SciPy) or sinkhorn (entropic OT, OTT-JAX)")
    ot_epsilon: float = Field(default=0.05, gt=0, description="sinkhorn: entropic regularisation, relative to the "
                              "mean squared distance")
    ot_classes: Literal["across", "within"] = Field(
        default="across", description="across: pair noise and data regardless of class (the noise a class trains "
        "from is then not N(0, I)); within: only pairs of one class, each class's noise stays N(0, I) "
        "(shortcut/pairing.py; needs classes)")
    ot_pool: int = Field(default=1, ge=1, description="K: solve one pairing over K consecutive batches' noise and "
                         "data, then train on them in turn (iSM's pooled OT, shortcut/pairing.py); 1: each batch "
                         "alone")
    loss: Literal["l2", "wavelet"] = Field(default="l2", description="l2 (mean squared error) or wavelet (iSM's "
                                           "multi-level Haar loss of the error, shortcut/losses.py)")
    wavelet_levels: int = Field(default=1, ge=1, description="wavelet: levels of the Haar transform (2^levels "
                                "must divide the model input's height and width)")
    loss_weighting: Literal["none", "adaptive"] = Field(
        default="none", description="adaptive: weight each row by 1 / (L + weighting_c)^weighting_p under "
        "stop-gradient, L the row's loss times the sample's size (for l2 its squared error summed over the "
        "sample, as MeanFlow and ESC)")
    weighting_p: float = Field(default=1.0, ge=0, description="adaptive: the power p")
    weighting_c: float = Field(default=1e-3, gt=0, description="adaptive: the constant c")
    guidance: Literal["cfg", "intrinsic"] = Field(
        default="cfg", description="cfg: classifier-free guidance at sampling (two network calls per guided step) "
        "and, with bootstrap_cfg, in the finest bootstrap level (the paper); intrinsic (iSM): the guidance scale w "
        "is an input of the network, drawn per row on the grid guidance_range, guidance_step, the flow rows' target "
        "is guided at w and the bootstrap targets are built at w, so sampling at w is one call per step (needs "
        "classes)")
    guidance_range: tuple[float, float] = Field(default=(0.0, 3.5), description="intrinsic: [w_min, w_max], the "
                                                "range of w drawn in training")
    guidance_step: float = Field(default=0.25, gt=0, description="intrinsic: w is uniform on the grid "
                                 "w_min, w_min + guidance_step, .., w_max")
    guidance_interval: tuple[float, float] | None = Field(
        default=None, description="[t_lo, t_hi] in this framework's time (t = 0 noise, t = 1 data): guidance only "
        "for t inside it, w = 1 outside, in the training targets and in sampling (interval guidance; needs classes)")

    @model_validator(mode="after")
    def _check_guidance(self):
        if not 0 <= self.guidance_range[0] <= self.guidance_range[1]:
            raise ValueError(f"guidance_range {list(self.guidance_range)}: needs 0 <= w_min <= w_max")
        lo_hi = self.guidance_interval
        if lo_hi is not None and not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            raise ValueError(f"guidance_interval {list(lo_hi)}: needs 0 <= t_lo < t_hi <= 1")
        if self.guidance == "intrinsic" and self.bootstrap_cfg:
            raise ValueError("guidance: intrinsic builds the bootstrap targets at each row's own w; bootstrap_cfg "
                             "(a fixed cfg_scale in the finest level) must be false")
        return self


class ShortcutObjective(Objective):
    """Shortcut models (Frans et al. 2025): flow matching at d = 1/M plus self-consistency targets.

    Bootstrap rows, for level k (d = 2^-k, k = 0 .. log2(M) - 1) and t on the grid of multiples of d:
        v1 = s(x_t, t, d/2);  x' = x_t + (d/2) v1;  v2 = s(x', t + d/2, d/2);  target = (v1 + v2) / 2
    computed with the EMA parameters (or the online ones) under stop_gradient.

    Guidance (docs/methods.md). `guidance: cfg` (the paper): classifier-free guidance at sampling, and with
    bootstrap_cfg a fixed scale in the finest level, which the targets then carry up (and, iSM finds, compound
    over) the levels. `guidance: intrinsic` (iSM, "Improved Training Technique for Shortcut Models", NeurIPS
    2025, arXiv 2510.21250): w is an input of the network (`guidance_scale`, zero-initialised), drawn per row
    uniformly on the grid `guidance_range` / `guidance_step`; the flow rows regress onto
        (x1 - x0) + (w - 1) (s(x_t, t, 1/M | y, 1) - s(x_t, t, 1/M | null, 1))     (no gradient; `_guide_flow`)
    and the bootstrap rows onto two half steps of s(., ., d/2 | y, w) at their own w, so sampling at w is one
    call per step. `guidance_interval` [t_lo, t_hi] (Kynkäänniemi et al. 2024, arXiv 2404.07724, as iSM): w = 1
    outside the interval, in the flow rows' targets and in CFG sampling; our time, t = 0 noise, t = 1 data.
    """

    Config = ShortcutConfig
    groups = ("flow", "bootstrap")
    display_name = "Shortcut Models"
    table_order = 50

    def __init__(self, config: ShortcutConfig, *, num_classes: int):
        super().__init__(config, num_classes=num_classes)
        self.num_levels = int(np.log2(config.denoise_timesteps))

    @classmethod
    def from_spec(cls, spec) -> "ShortcutObjective":
        cfg = spec.method
        if cfg.ot_pool > 1 and cfg.ot_pairing == "none":
            raise InputError(f"{spec.name}: method.ot_pool: {cfg.ot_pool} pools batches for a pairing; set "
                             f"method.ot_pairing to exact or sinkhorn, or ot_pool to 1")
        if cfg.ot_classes == "within" and cfg.ot_pairing == "none":
            raise InputError(f"{spec.name}: method.ot_classes: within pairs noise and data within each class; set "
                             f"method.ot_pairing to exact or sinkhorn")
        if cfg.loss == "wavelet" and any(n % 2 ** cfg.wavelet_levels for n in spec.input_shape[:2]):
            raise InputError(f"{spec.name}: method.wavelet_levels: 2^{cfg.wavelet_levels} must divide the model "
                             f"input's height and width {spec.input_shape[:2]}")
        if spec.data.num_classes == 0:
            unconditional = {"ot_classes": (cfg.ot_classes == "within", "within needs class labels (the data is "
                                            "unconditional: every pair is of one class); leave it unset"),
                             "guidance": (cfg.guidance == "intrinsic", "intrinsic guidance needs class labels (the "
                                          "data is unconditional); use cfg"),
                             "guidance_interval": (cfg.guidance_interval is not None, "interval guidance needs "
                                                   "class labels (the data is unconditional, nothing is guided); "
                                                   "leave it unset")}
            for key, (bad, why) in unconditional.items():
                if bad:
                    raise InputError(f"{spec.name}: method.{key}: {why}")
        return super().from_spec(spec)

    @classmethod
    def network_options(cls, config: ShortcutConfig) -> dict:
        """Intrinsic guidance conditions the network on w (shortcut/model.py's extra conditioning, zero-initialised)."""
        return {"conditioning": (guidance.GUIDANCE_SCALE,)} if config.guidance == "intrinsic" else {}

    def training_data(self, dataset, *, spec, teacher, rundir, log) -> Any:
        """The dataset; with `ot_pool` K > 1, its batches with noise paired over pools of K (pairing.PooledNoise)."""
        cfg = self.config
        if cfg.ot_pool == 1:
            return dataset()
        return pairing.PooledNoise(dataset(), pool=cfg.ot_pool, pairing=cfg.ot_pairing, epsilon=cfg.ot_epsilon,
                                   seed=spec.seed, within_class=cfg.ot_classes == "within")

    def batch_inputs(self, image, label) -> dict:
        """With `ot_pool` K > 1 a batch carries its pooled, paired "noise" (the image's shape)."""
        return super().batch_inputs(image, label) | ({"noise": image} if self.config.ot_pool > 1 else {})

    def bootstrap_size(self, batch_size: int) -> int:
        return int(round(batch_size * self.config.bootstrap_fraction))

    def bootstrap_levels(self, n: int) -> np.ndarray:
        """Static levels k (d = 2^-k, k = 0..K-1) for n bootstrap rows, finest level first.

        `even`: counts differ by at most one, the remainder to the coarsest levels (1 step first).
        `official`: floor(n / K) rows per level, the whole remainder at k = 0 (d = 1); with n < K only
        d = 1 is trained. Finest first lets bootstrap_cfg guide a static slice of rows.
        """
        counts = np.full(self.num_levels, n // self.num_levels)
        if self.config.bootstrap_levels == "even":
            counts[: n % self.num_levels] += 1
        else:
            counts[0] += n % self.num_levels
        return np.repeat(np.arange(self.num_levels), counts)[::-1].copy()

    def grid_times(self, key: jax.Array, cells) -> jax.Array:
        """t on each row's grid {0, 1/n, .., (n-1)/n}, n = `cells` (an int, or one per row), drawn by `t_sampling`.

        uniform: k uniform on {0..n-1} (the paper). logit_normal (ESC, arXiv 2512.11831): a continuous draw
        u = sigmoid(t_mean + t_std * N(0, 1)) is rounded down onto the grid, k = min(floor(u n), n - 1), so
        a grid point k/n gets the mass of [k/n, (k+1)/n).
        """
        cfg = self.config
        cells = jnp.asarray(cells)
        shape = cells.shape if cells.ndim else ()
        if cfg.t_sampling == "uniform":
            k = jax.random.randint(key, shape, 0, cells)
        else:
            u = jax.nn.sigmoid(cfg.t_mean + cfg.t_std * jax.random.normal(key, shape))
            k = jnp.minimum(jnp.floor(u * cells), cells - 1)
        return k.astype(jnp.float32) / cells

    def split_points(self, key: jax.Array, levels: np.ndarray) -> jax.Array | None:
        """The first sub-step of each bootstrap row's two-step target: None for `half` (d/2); for `uniform`
        j/M with j uniform on {1, .., dM - 1}, so both sub-steps stay on the trained grid of multiples of 1/M
        (SplitMeanFlow, Guo et al. 2025, arXiv 2507.16884: (t-r) u(r, t) = (s-r) u(r, s) + (t-s) u(s, t))."""
        if self.config.split == "half":
            return None
        m = self.config.denoise_timesteps
        fine = jnp.asarray(m // 2 ** np.asarray(levels))  # d M, at least 2
        return jax.random.randint(key, fine.shape, 1, fine).astype(jnp.float32) / m

    def targets(self, key: jax.Array, batch: dict, ctx: Context) -> Targets:
        cfg = self.config
        images, labels = batch["image"], batch["label"]
        b = images.shape[0]
        flow_kw = dict(m=cfg.denoise_timesteps, class_dropout=cfg.class_dropout, null_class=self.null_class)
        x0 = batch.get("noise")  # paired over a pool of batches (pairing.PooledNoise), or drawn here or below
        if x0 is None and cfg.ot_pairing != "none":
            k_pair, k_draw = jax.random.split(jax.random.fold_in(key, 1))
            x0 = pairing.pair_noise(k_pair, jax.random.normal(k_draw, images.shape, images.dtype), images,
                                    cfg.ot_pairing, epsilon=cfg.ot_epsilon,
                                    labels=labels if cfg.ot_classes == "within" else None)
        nb = self.bootstrap_size(b)
        teacher = ctx.ema_params if cfg.bootstrap_ema else ctx.params
        intrinsic = cfg.guidance == "intrinsic"
        w = (guidance.grid_guidance(jax.random.fold_in(key, 4), b, *cfg.guidance_range, cfg.guidance_step)
             if intrinsic else None)  # each row's guidance scale (intrinsic guidance)
        if nb == 0:
            flow = flow_targets(key, images, labels, **flow_kw, t=self._flow_times(key, b), x0=x0)
            return self._guide_flow(ctx.apply_fn, teacher, flow, labels, w) if intrinsic else flow
        k_flow, k_t, k_noise = jax.random.split(key, 3)
        flow = flow_targets(k_flow, images[nb:], labels[nb:], **flow_kw, t=self._flow_times(k_flow, b - nb),
                            x0=None if x0 is None else x0[nb:])
        if intrinsic:
            flow = self._guide_flow(ctx.apply_fn, teacher, flow, labels[nb:], w[nb:])

        levels = self.bootstrap_levels(nb)
        d = jnp.asarray(2.0 ** -levels, jnp.float32)
        t = self.grid_times(k_t, jnp.asarray(2 ** levels))
        x1, y = images[:nb], labels[:nb]
        x0 = jax.random.normal(k_noise, x1.shape, x1.dtype) if x0 is None else x0[:nb]
        x_t = interpolate(x0, x1, t)
        first = self.split_points(jax.random.fold_in(key, 2), levels)
        cond = {guidance.GUIDANCE_SCALE: w[:nb]} if intrinsic else None
        v = jax.lax.stop_gradient(self.bootstrap_target(ctx.apply_fn, teacher, x_t, t, levels, y, first=first,
                                                        cond=cond))
        boot = Targets(x_t, t, d, y, v, jnp.ones((nb,), jnp.int32), cond=cond)
        both = Targets(*(jnp.concatenate([a, f]) for a, f in zip(boot[:6], flow[:6])))
        if intrinsic:
            both = both._replace(cond={k: jnp.concatenate([boot.cond[k], flow.cond[k]]) for k in boot.cond})
        return both

    def _guide_flow(self, apply_fn: ApplyFn, params, flow: Targets, labels: jax.Array, w: jax.Array) -> Targets:
        """Intrinsic guidance's flow rows: the target guided at the row's w (1 outside the guidance interval),
            v = (x1 - x0) + (w - 1) (s(x_t, t, 1/M | y, w = 1) - s(x_t, t, 1/M | null, w = 1)),
        both velocities from `params` (the bootstrap targets' parameters) without gradient; its expectation
        over the data is the guided velocity v_u + w (v_c - v_u). Rows whose label was dropped keep x1 - x0
        and are conditioned on w = 1 (the unconditional, unguided velocity the guidance is built from)."""
        n = flow.x_t.shape[0]
        dropped = flow.labels == self.null_class
        w_in = jnp.where(dropped, 1.0, w)  # the network's input: the row's w (the interval is part of what w means)
        scale = jnp.where(dropped, 1.0, guidance.interval_scale(w, flow.t, self.config.guidance_interval))
        ones = {guidance.GUIDANCE_SCALE: jnp.ones((2 * n,), jnp.float32)}
        cat = lambda a: jnp.concatenate([a, a])  # noqa: E731
        both = apply_fn(params, cat(flow.x_t), cat(flow.t), cat(flow.d),
                        jnp.concatenate([labels, jnp.full_like(labels, self.null_class)]), cond=ones)
        v_c, v_u = jnp.split(jax.lax.stop_gradient(both), 2)
        v = guidance.guided_target(flow.v, v_c, v_u, scale - 1)
        return flow._replace(v=v, cond={guidance.GUIDANCE_SCALE: w_in})

    def _flow_times(self, key: jax.Array, n: int) -> jax.Array | None:
        """Flow rows' t by `t_sampling`; None (flow_targets' own uniform draw) for uniform."""
        if self.config.t_sampling == "uniform":
            return None
        return self.grid_times(jax.random.fold_in(key, 3), jnp.full((n,), self.config.denoise_timesteps))

    def bootstrap_target(self, apply_fn: ApplyFn, params, x_t: jax.Array, t: jax.Array, levels: np.ndarray,
                         labels: jax.Array, first: jax.Array | None = None, cond: dict | None = None) -> jax.Array:
        """The self-consistency target for rows at static `levels` (finest first, as from `bootstrap_levels`),
        clipped like the official code; with bootstrap_cfg the finest level's rows are guided with cfg_scale
        (inside `guidance_interval` only, each sub-step by its own start time). `cond`: the network's extra
        inputs for both sub-steps (intrinsic guidance: each row's own w).

        Two steps of sizes a = `first` and d - a: v1 = s(x_t, t, a), x' = x_t + a v1, v2 = s(x', t + a, d - a),
        target = (a v1 + (d - a) v2) / d; with `first` None, a = d/2 and the target is (v1 + v2) / 2 (the paper).
        """
        cfg = self.config
        d = jnp.asarray(2.0 ** -np.asarray(levels), jnp.float32)
        a = d / 2 if first is None else first
        n_cfg = int(np.sum(levels == self.num_levels - 1)) if cfg.bootstrap_cfg else 0
        velocity = functools.partial(self._velocity, apply_fn, params, n_cfg=n_cfg, cond=cond)
        v1 = velocity(x_t, t, a, labels)
        x_mid = self._clip(x_t + expand(a, x_t) * v1)
        v2 = velocity(x_mid, t + a, d - a, labels)
        if first is None:
            return self._clip((v1 + v2) / 2)
        return self._clip((expand(a, v1) * v1 + expand(d - a, v2) * v2) / expand(d, v1))

    def row_loss(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        """`loss` of each row (l2 or the wavelet loss), times the adaptive weight under `loss_weighting: adaptive`,
        whose L is the row's loss times the sample's size (for l2, the squared error summed over the sample)."""
        cfg = self.config
        rows = losses.mse_rows(pred, target) if cfg.loss == "l2" else \
            losses.wavelet_rows(pred, target, cfg.wavelet_levels)
        if cfg.loss_weighting == "adaptive":
            rows = rows * losses.adaptive_weight(rows * np.prod(pred.shape[1:]), cfg.weighting_p, cfg.weighting_c)
        return rows

    def _velocity(self, apply_fn, params, x, t, d, labels, *, n_cfg: int, cond: dict | None = None) -> jax.Array:
        """The network's velocity; the first n_cfg rows (the finest level) with CFG scale w (1 outside the
        guidance interval)."""
        if cond is not None:
            return apply_fn(params, x, t, d, labels, cond=cond)
        if n_cfg == 0:
            return apply_fn(params, x, t, d, labels)
        interval = self.config.guidance_interval
        if interval is None:
            guided = guided_velocity(apply_fn, params, x[:n_cfg], t[:n_cfg], d[:n_cfg], labels[:n_cfg],
                                     self.config.cfg_scale, self.null_class)
        else:
            both = apply_fn(params, jnp.concatenate([x[:n_cfg]] * 2), jnp.concatenate([t[:n_cfg]] * 2),
                            jnp.concatenate([d[:n_cfg]] * 2),
                            jnp.concatenate([labels[:n_cfg], jnp.full_like(labels[:n_cfg], self.null_class)]))
            c, u = jnp.split(both, 2)
            scale = guidance.interval_scale(jnp.float32(self.config.cfg_scale), t[:n_cfg], interval)
            guided = guidance.guided_target(u, c, u, scale)
        rest = apply_fn(params, x[n_cfg:], t[n_cfg:], d[n_cfg:], labels[n_cfg:])
        return jnp.concatenate([guided, rest])

    def _clip(self, x: jax.Array) -> jax.Array:
        c = self.config.bootstrap_clip
        return x if c is None else jnp.clip(x, -c, c)

    def sample(self, apply_fn: ApplyFn, params, noise: jax.Array, labels: jax.Array, num_steps: int, *,
               cfg_scale: float = 1.0) -> jax.Array:
        """N Euler steps, each conditioned on its own step size d = 1/N. Intrinsic guidance: the network at
        w = cfg_scale, one call per step (the interval is part of what the network learned for w); cfg: guided
        steps (inside `guidance_interval`, if set) call the network twice, conditional and unconditional."""
        if self.config.guidance == "intrinsic":
            cond = {guidance.GUIDANCE_SCALE: jnp.full((noise.shape[0],), cfg_scale, jnp.float32)}
            at_w = lambda params, x, t, d, y: apply_fn(params, x, t, d, y, cond=cond)  # noqa: E731
            return euler_sample(at_w, params, noise, labels, num_steps, d_cond=1.0 / num_steps, cfg_scale=1.0,
                                null_class=self.null_class)
        return euler_sample(apply_fn, params, noise, labels, num_steps, d_cond=1.0 / num_steps,
                            cfg_scale=cfg_scale, null_class=self.null_class, interval=self.config.guidance_interval)

    def network_evaluations(self, num_steps: int, cfg_scale: float = 1.0) -> int:
        """Network calls per sample: one per step with intrinsic guidance; with cfg, two for each guided step
        (every step, or the steps whose start i/N lies in `guidance_interval`)."""
        if self.config.guidance == "intrinsic" or cfg_scale == 1.0:
            return num_steps
        starts = jnp.arange(num_steps) * (1.0 / num_steps)  # as euler_sample computes i * dt
        guided = np.asarray(guidance.in_interval(starts, self.config.guidance_interval))
        return num_steps + int(guided.sum())
