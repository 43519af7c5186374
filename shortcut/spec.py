"""The spec's schema and hash: what one run is, typed and frozen (`Spec`), and what identifies it.

The spec hash identifies *what is trained* (seed, data, model, method, optimizer, train): two
resolved specs with the same hash train the same model, whatever their names, evaluation settings
or output locations. It keys the work directory, so a rerun resumes and a changed spec starts fresh.
A spec with a `teacher` (another spec, trained first) also hashes the teacher's own hash. A Spec is made
*resolved*: its teacher's Spec inside (shortcut/spec_files.py reads it from the experiment files, once,
where the driver loads the spec); `to_tree` / `from_tree` carry it whole as JSON, so whatever receives a
spec (a worker, a sweep trial, a plan) reads no file.

Every error is a `SpecError` that names the file (or the override), the key and what was expected.
`--smoke` is one transform of the spec (`smoke_version`: a tiny model, a few steps, `smoke: true`), applied
once where a spec is loaded; everything below reads `spec.smoke` (mock data, stand-in weights).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any, Literal, NamedTuple

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, field_validator, model_validator

from shortcut import methods, metrics
from shortcut.errors import InputError, KeyedValueError, first_error

HASHED_SECTIONS = ("seed", "data", "model", "method", "optimizer", "train")
LATENT_KEYS_NOT_HASHED = ("weights", "encoded_dir", "batch_size")
# Keys added after runs were recorded, hashed only away from the value all earlier runs had, so that
# adding a key keeps the hash (and run directory) of every existing spec.
KEYS_HASHED_WHEN_SET = {("model", "architecture"): "dit", ("method", "bootstrap_levels"): "even",
                        ("method", "sample_level"): "step_size", ("data", "heldout_split"): None,
                        ("method", "derivative"): "jvp", ("method", "finite_difference_step"): 1e-3,
                        # the shortcut method's design space (shortcut/objective.py, ShortcutConfig)
                        **{("method", k): v for k, v in (
                            ("split", "half"), ("t_sampling", "uniform"), ("t_mean", 0.0), ("t_std", 1.0),
                            ("ot_pairing", "none"), ("ot_epsilon", 0.05), ("ot_pool", 1), ("ot_classes", "across"), ("loss", "l2"),
                            ("wavelet_levels", 1), ("loss_weighting", "none"), ("weighting_p", 1.0), ("weighting_c", 1e-3),
                            ("guidance", "cfg"), ("guidance_range", [0.0, 3.5]), ("guidance_step", 0.25),
                            ("guidance_interval", None))}}


def hashed_content(content: dict) -> dict:
    """A spec's sections (a JSON dump, or a results record's spec) without what the hash leaves out: the latent
    data's file keys and every key of KEYS_HASHED_WHEN_SET at the value earlier runs had (or absent). Sections
    are copied; `content` is not changed."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in content.items()}
    latent = (out.get("data") or {}).get("latent")
    if latent:  # where files are and how they are batched do not change the model
        out["data"]["latent"] = {k: v for k, v in latent.items() if k not in LATENT_KEYS_NOT_HASHED}
    for (section, key), earlier in KEYS_HASHED_WHEN_SET.items():
        if isinstance(out.get(section), dict) and key in out[section] and out[section][key] == earlier:
            del out[section][key]
    return out


TEACHER_SPEC = "teacher_spec"  # in a self-contained tree (Spec.to_tree): the teacher's own resolved tree


class SpecError(InputError):
    """A spec problem, reported as one line: `<file>: <key>: <what was expected>`."""

    def __init__(self, source: str, key: str, message: str):
        source, key, message = (_one_line(x) for x in (source, key, message))  # whatever a user or parser put in
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


def _one_line(text: str) -> str:
    """`text` on one printable line: whitespace runs become one space, other control characters escapes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(str(text).split()))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inf/nan are never a setting


class LatentSpec(_Section):
    """Train in the latent space of a pretrained autoencoder (the paper's CelebA-HQ/ImageNet setting).
    Images are encoded on the fly (a posterior sample times `scale`, each batch), or once into a latent
    TFDS dataset of posterior moments that training samples from (`pre_encoded`, the faster choice at
    paper scale); samples are decoded to pixels before evaluation (shortcut/data/latents.py)."""

    autoencoder: Literal["sd-vae-ft-mse"] = "sd-vae-ft-mse"
    scale: float = 0.18215
    downsample: int = 8
    channels: int = 4
    encoding: Literal["on_the_fly", "pre_encoded"] = "on_the_fly"
    weights: str | None = Field(default=None, description="diffusers weights file; default: the standard lookup "
                                "($SHORTCUT_VAE_WEIGHTS, then ~/.cache/shortcut-models/sd-vae-ft-mse/)")
    encoded_dir: str | None = Field(default=None, description="pre_encoded: where the latent dataset goes; default "
                                    "<data_dir>/latents/<dataset>_<split>_<size>_<VAE sha256[:12]>")
    batch_size: int = Field(default=32, ge=1, description="images per encode/decode call")


class DataSpec(_Section):
    dataset: str
    channels: int = Field(ge=1)
    num_classes: int = Field(ge=0, description="0 = unconditional")
    split: str = "train"
    heldout_split: str | None = Field(default=None, description="a split of the same data that training never sees "
                                      "(digits: `heldout`, 20 % of every class): the reference of the metric and of "
                                      "the memorisation score, so reproducing training images is not rewarded")
    image_size: int | None = Field(default=None, ge=1, description="resize to this size; None keeps the native size")
    flip: bool = False
    data_dir: str | None = None
    shuffle_buffer: int = Field(default=10_000, ge=1)
    latent: LatentSpec | None = None

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from shortcut.data.sources import unknown_dataset

        message = unknown_dataset(name)
        if message:
            raise KeyedValueError("data.dataset", message)
        return name


class ModelSpec(_Section):
    size: Literal["tiny", "S", "B", "XL"] | None = None
    hidden_size: int | None = Field(default=None, ge=1)
    depth: int | None = Field(default=None, ge=1)
    num_heads: int | None = Field(default=None, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    patch_size: int = Field(default=2, ge=1)
    d_conditioning: Literal["level", "step_size"] = "level"
    dtype: Literal["float32", "bfloat16"] = "float32"
    architecture: Literal["official", "dit"] = Field(
        default="dit", description="official: the function of the official code's model.DiT (1/head_dim attention "
        "logits, separate q/k/v, xavier adaLN in blocks, its dtype behaviour); dit: the standard DiT (adaLN-Zero)")

    @model_validator(mode="after")
    def _resolve_size(self) -> "ModelSpec":
        from shortcut.model import MODEL_SIZES

        sized = dict(MODEL_SIZES[self.size]) if self.size else {}
        for key in ("hidden_size", "depth", "num_heads"):
            value = getattr(self, key)
            if value is None and key not in sized:
                raise KeyedValueError(f"model.{key}", "required when no model.size (tiny, S, B, XL) is given")
            object.__setattr__(self, key, value if value is not None else sized[key])
        if self.hidden_size % self.num_heads:
            raise KeyedValueError("model.num_heads", f"must divide hidden_size {self.hidden_size}, got {self.num_heads}")
        return self


class OptimizerSpec(_Section):
    lr: float = Field(default=1e-4, gt=0)
    b1: float = Field(default=0.9, ge=0, lt=1)
    b2: float = Field(default=0.999, ge=0, lt=1)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    ema_decay: float | tuple[float, ...] = Field(
        default=0.999, description="the EMA decay, or a list of decays, one EMA each, all in the train state and "
        "its checkpoints: the first is evaluated, objectives build their targets with the last (twin EMA, iSM: "
        "[0.9999, 0.95])")

    @field_validator("ema_decay")
    @classmethod
    def _decays(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        decays = value if isinstance(value, tuple) else (value,)
        if not decays or not all(0 <= x < 1 for x in decays):
            raise ValueError(f"expected a decay in [0, 1) or a non-empty list of them, got {value!r}")
        return decays[0] if len(decays) == 1 else value  # [a] is a, and hashes as a

    @property
    def ema_decays(self) -> tuple[float, ...]:
        """The EMA decays, one or several (twin EMA), in the train state's order (shortcut/train.py)."""
        return self.ema_decay if isinstance(self.ema_decay, tuple) else (self.ema_decay,)


class TrainSpec(_Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch size")
    log_every: int = Field(default=100, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)


class EvalSetting(NamedTuple):
    """One evaluation: N sampling steps at guidance w. `key` names it in records and metric names:
    `<N>_steps`, or `<N>_steps_w<w>` for each scale of a step count evaluated at several."""

    num_steps: int
    cfg_scale: float
    key: str

    @property
    def samples_key(self) -> str:
        """The key of its sample grid in run.json's `samples` (`128`, `128_w1.5`) and file `steps_<key>.png`."""
        return self.key.replace("_steps", "")


class EvalSpec(_Section):
    """Evaluation protocol: `steps` (sampling step counts) and, per step count, guidance `cfg_scale` w:
    one number for all, or a mapping `{128: [1.0, 1.5], 4: 1.0, 1: 1.0}` (a list evaluates that step
    count once per scale; the first fills its table column, the others add columns)."""

    steps: tuple[int, ...] = (128, 4, 1)
    num_samples: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=256, ge=1)
    cfg_scale: float | dict[int, float | tuple[float, ...]] = Field(
        default=1.0, description="classifier-free guidance w (1 = no guidance): a number, or a mapping from step "
        "count to w or to a list of w")
    params: Literal["ema", "online"] = Field(default="ema", description="evaluate the EMA parameters (paper) or the "
                                             "online ones (the official training-time evaluation's default)")
    grid_size: int = Field(default=64, ge=1, description="samples shown in each PNG grid")
    save_samples: bool = Field(default=False, description="also write each setting's evaluation samples to "
                               "samples/steps_<N>.npz (arr_0 uint8 [N, H, W, 3], arr_1 labels: the ADM layout)")
    metric: str = Field(default="none", description="a registered metric (shortcut/metrics.py: fd_digits, fid, "
                        "...) or none")
    every: int | None = Field(default=None, ge=1, description="also evaluate every N training steps")
    curve_every: int | None = Field(default=None, ge=1, description="every N training steps, a cheap evaluation at "
                                    "`curve_steps` (no grids): the run's convergence curve, in run.json's `curve`")
    curve_steps: tuple[int, ...] = Field(default=(1, 4), description="step counts of the curve, those of them in "
                                         "`steps` (a curve ends at the run's own evaluation), at their first scale")
    reference_stats: str | None = Field(default=None, description="fid: reference statistics file (default: "
                                        "$SHORTCUT_WEIGHTS_DIR/fid_stats/<dataset>_<split>_<size>.npz, see fid_stats)")
    inception_weights: str | None = Field(default=None, description="fid: weights file (default: standard lookup)")
    verify_inception: bool = Field(default=True, description="require the standard FID weights' sha256; false "
                                   "only for pipeline tests with other weights (the record says so)")

    @field_validator("metric")
    @classmethod
    def _registered_metric(cls, name: str) -> str:
        return metrics.check_name(name)

    @field_validator("cfg_scale", mode="before")
    @classmethod
    def _cfg_scale_shape(cls, value: Any) -> Any:
        expected = ("expected a number or a mapping from step count to w or to a list of w, "
                    "e.g. {128: [1.0, 1.5], 4: 1.0}")
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if number(value):
            return value
        if not isinstance(value, dict):
            raise ValueError(expected)
        for n, w in value.items():
            if not (isinstance(n, int) or (isinstance(n, str) and n.isdigit())):
                raise KeyedValueError("eval.cfg_scale", f"{expected}; {n!r} is not a step count")
            if not (number(w) or (isinstance(w, list) and w and all(number(x) for x in w) and len(set(w)) == len(w))):
                raise KeyedValueError(f"eval.cfg_scale.{n}",
                                      f"expected a number or a list of distinct numbers, got {w!r}")
        return value

    @model_validator(mode="after")
    def _check_cfg_scale(self) -> "EvalSpec":
        if isinstance(self.cfg_scale, dict):
            steps = set(self.steps)
            for n, w in self.cfg_scale.items():
                if n not in steps:
                    raise KeyedValueError(f"eval.cfg_scale.{n}", f"{n} steps is not in eval.steps {list(self.steps)}")
            missing = [n for n in self.steps if n not in self.cfg_scale]
            if missing:
                raise KeyedValueError("eval.cfg_scale", f"no scale for {missing[0]} steps (in eval.steps); give one "
                                      "per step count, or one number for all")
        return self

    def curve_settings(self) -> tuple[EvalSetting, ...]:
        """The settings of a convergence-curve point: each `curve_steps` count at its first scale."""
        first = {}
        for setting in self.settings():
            first.setdefault(setting.num_steps, setting)
        return tuple(first[n] for n in self.curve_steps if n in first)

    def scales(self, num_steps: int) -> tuple[float, ...]:
        """The guidance scales N steps are evaluated at."""
        w = self.cfg_scale[num_steps] if isinstance(self.cfg_scale, dict) else self.cfg_scale
        return tuple(float(x) for x in w) if isinstance(w, tuple) else (float(w),)

    def settings(self) -> tuple[EvalSetting, ...]:
        """Every (step count, scale) to evaluate, in `steps` order."""
        out = []
        for n in self.steps:
            scales = self.scales(n)
            for w in scales:
                out.append(EvalSetting(n, w, f"{n}_steps" if len(scales) == 1 else f"{n}_steps_w{w:g}"))
        return tuple(out)


class ResourcesSpec(_Section):
    """What one run asks of Ray (orchestration/execution/cluster.py): `hosts` workers, one per host, each with
    `cpus` CPUs and `gpus` GPUs or `tpus` TPU chips. A fractional `gpus` (< 1) shares a device."""

    cpus: float = Field(default=1, gt=0, description="CPUs per worker")
    gpus: float = Field(default=0, ge=0, description="GPUs per worker; a fraction < 1 shares one device")
    tpus: int = Field(default=0, ge=0, description="TPU chips per worker (one worker per TPU host)")
    hosts: int = Field(default=1, ge=1, description="workers, one per host, joined by jax.distributed")
    sharding: Literal["dp", "fsdp"] = Field(default="dp", description="dp: state replicated on every device; "
                                            "fsdp: parameters, EMA and optimizer state sharded over the devices "
                                            "(shortcut/sharding.py); the batch is split over the devices either way")

    @model_validator(mode="after")
    def _check(self) -> "ResourcesSpec":
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise KeyedValueError("resources.gpus", f"a fraction must be < 1 (a shared device), got {self.gpus}")
        if self.gpus and self.tpus:
            raise KeyedValueError("resources.tpus", "give GPUs or TPU chips, not both")
        return self


SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform")


class SweepSpec(_Section):
    """A Ray Tune search (orchestration/sweep.py). `space` maps a dotted spec key to one of
    `{choice: [..]}`, `{grid: [..]}` (every value, times num_samples), `{uniform: [lo, hi]}` or
    `{loguniform: [lo, hi]}`. Only keys that change what is trained may be searched (they key the
    trial's run directory through the spec hash)."""

    space: dict[str, dict[str, list]] = Field(min_length=1)
    metric: str | None = Field(default=None, description="reported metric to optimise; default "
                               "`<eval.metric>/<fewest eval.steps>_steps`, e.g. fd_digits/1_steps")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(default=4, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1, description="default: as many as resources allow")
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1, description="ASHA: evaluations before a trial may be stopped")
    reduction_factor: int = Field(default=2, ge=2)
    max_failures: int = Field(default=2, ge=0, description="retries of a failed trial, from its checkpoint")

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict) -> dict:
        for key, dist in space.items():
            where = f"sweep.space.{key}"
            if key.split(".")[0] not in HASHED_SECTIONS:
                raise KeyedValueError(where, f"only keys under {', '.join(HASHED_SECTIONS)} can be searched "
                                             "(other keys do not change what is trained)")
            if len(dist) != 1 or next(iter(dist)) not in SEARCH_KINDS:
                raise KeyedValueError(where, f"expected one of {', '.join(SEARCH_KINDS)}: [...], got {dist}")
            kind, values = next(iter(dist.items()))
            if not values:
                raise KeyedValueError(where, f"{kind}: needs values")
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise KeyedValueError(where, f"{kind}: values must be finite, got {values}")
            if kind in ("uniform", "loguniform"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                    raise KeyedValueError(where, f"{kind}: expected [low, high] with low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise KeyedValueError(where, f"loguniform: bounds must be > 0, got {values}")
        return space


class OutputSpec(_Section):
    workdir: str = "runs"


class Spec(_Section):
    name: str
    description: str = ""
    seed: int = 0
    data: DataSpec
    model: ModelSpec
    method: SerializeAsAny[methods.MethodConfig]
    optimizer: OptimizerSpec = OptimizerSpec()
    train: TrainSpec
    eval: EvalSpec = EvalSpec()
    resources: ResourcesSpec = ResourcesSpec()
    output: OutputSpec = OutputSpec()
    sweep: SweepSpec | None = Field(default=None, description="search space for `sweep NAME`; not hashed")
    teacher: str | None = Field(default=None, description="spec whose finished run this one starts from "
                                "(distillation, reflow); resolved by the loader, trained first by the driver")
    teacher_overrides: tuple[str, ...] = Field(default=(), description="KEY=VALUE overrides applied to the teacher spec")
    smoke: bool = Field(default=False, description="set by --smoke (smoke_version), not by hand: mock data and "
                        "stand-in weights for a pipeline check; hashed only when true")
    _teacher: "Spec | None" = PrivateAttr(default=None)  # the teacher's resolved Spec (with_teacher)

    @field_validator("method", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> methods.MethodConfig:
        return methods.parse_config(value)

    @model_validator(mode="after")
    def _check_consistency(self) -> "Spec":
        m = self.method.denoise_timesteps
        for n in self.eval.steps:
            if n < 1 or n > m or n & (n - 1):
                raise KeyedValueError("eval.steps", f"each step count must be a power of two <= M={m}, got {n}")
        size = self.input_shape[0]
        if size % self.model.patch_size:
            raise KeyedValueError("model.patch_size", f"must divide the model input size {size}")
        if self.eval.metric != metrics.NONE:
            metrics.plugin(self.eval.metric).check(self)
        if self.train.batch_size < 2:
            raise KeyedValueError("train.batch_size", "must be at least 2")
        if self.teacher_overrides and self.teacher is None:
            raise KeyedValueError("teacher_overrides", "given without a `teacher`")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (H, W, C) of one model input: the image, or its latent."""
        if self.data.image_size is None:
            raise KeyedValueError("data.image_size", "is required (the native size of the data)")
        size = self.data.image_size
        if self.data.latent:
            return (size // self.data.latent.downsample,) * 2 + (self.data.latent.channels,)
        return (size, size, self.data.channels)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """Shape (H, W, C) of one dataset image (what is evaluated; the model sees `input_shape`)."""
        return (self.data.image_size, self.data.image_size, self.data.channels)

    def hash(self) -> str:
        """Stable sha256 of the training-relevant content (see module docstring)."""
        content = hashed_content(self.model_dump(mode="json", include=set(HASHED_SECTIONS)))
        if self.smoke:
            content["smoke"] = True
        if self.teacher is not None:
            content["teacher"] = self.teacher_spec().hash()
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def teacher_spec(self) -> "Spec | None":
        """The teacher's spec (with `teacher_overrides`; its --smoke version for a --smoke spec), or None."""
        if self.teacher is not None and self._teacher is None:
            raise SpecError(self.name, "teacher", "not resolved: make specs with load_spec or validate")
        return self._teacher

    def with_teacher(self, teacher: "Spec | None") -> "Spec":
        """This spec, resolved: `teacher` is its teacher's Spec (set once, by whoever makes the spec)."""
        if teacher is not None:
            self._teacher = teacher
        return self

    def to_tree(self) -> dict:
        """The resolved spec as one JSON tree that becomes this Spec again with `Spec.from_tree`, no file read:
        its keys as a run record holds them, and its teacher's own tree under `teacher_spec`."""
        tree = self.model_dump(mode="json")
        if self.teacher is not None:
            tree[TEACHER_SPEC] = self.teacher_spec().to_tree()
        return tree

    @classmethod
    def from_tree(cls, tree: dict, source: str = "spec") -> "Spec":
        """The Spec of a self-contained tree (`to_tree`)."""
        tree = dict(tree)
        teacher = tree.pop(TEACHER_SPEC, None)
        spec = make_spec(tree, source).with_teacher(None if teacher is None else cls.from_tree(teacher, source))
        spec.teacher_spec()  # a tree that names a teacher carries it
        return spec

    def with_values(self, values: dict[str, Any], source: str) -> "Spec":
        """This spec with dotted keys set (`{"optimizer.lr": 3e-4}`, a sweep trial's values), validated; the
        teacher stays the one resolved (a teacher follows its student's `teacher_overrides`, not its values)."""
        return make_spec(with_values(self.model_dump(mode="json"), values), source).with_teacher(self._teacher)


def make_spec(tree: dict, source: str, origin: dict[str, str] | None = None) -> Spec:
    """Validate a tree into a Spec (its teacher not yet resolved: `with_teacher`); an error names the file or
    override that set the offending key (`origin`: key -> where it was set), else `source`."""
    try:
        return Spec.model_validate(tree)
    except pydantic.ValidationError as e:
        key, message = first_error(e)
        raise SpecError(source_of(key, origin or {}, source), key, message) from None


def source_of(key: str, origin: dict[str, str], default: str) -> str:
    """Where `key` (or the section holding it) was set."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in origin:
            return origin[".".join(parts[:i])]
    return default


def with_values(tree: dict, values: dict[str, Any]) -> dict:
    """A copy of a spec tree with dotted keys set to values."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def smoke_version(spec: Spec) -> Spec:
    """The same spec with a tiny model, a few steps and few samples, for mock data on one CPU (its teacher's
    --smoke version inside)."""
    tree = spec.model_dump(mode="json")
    tree["model"] = dict(tree["model"], size=None, hidden_size=32, depth=2, num_heads=2, dtype="float32")
    tree["train"] = dict(tree["train"], steps=4, batch_size=8, log_every=2, checkpoint_every=2)
    tree["eval"] = dict(tree["eval"], num_samples=8, batch_size=8, grid_size=8)
    tree["resources"] = {"cpus": 1, "gpus": 0, "tpus": 0, "hosts": 1, "sharding": spec.resources.sharding}
    if tree["data"].get("latent"):
        tree["data"]["latent"] = dict(tree["data"]["latent"], batch_size=8)
    tree["method"] = methods.objective_class(spec.method.name).smoke_method(tree["method"])  # e.g. fewer reflow pairs
    tree["smoke"] = True
    teacher = spec.teacher_spec()
    return make_spec(tree, f"{spec.name} (--smoke)").with_teacher(None if teacher is None else smoke_version(teacher))
