"""Registry of training methods: a method name in a spec -> its objective class and config schema.

Objectives are imported lazily by dotted path, so shortcut/ never imports baselines/ at module
load and adding a method is one line here plus its module.
"""

from __future__ import annotations

import importlib
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

OBJECTIVES: dict[str, str] = {
    "shortcut": "shortcut.objective:ShortcutObjective",
    "flow_matching": "baselines.flow_matching:FlowMatchingObjective",
    "diffusion": "baselines.diffusion:DiffusionObjective",
    "consistency_training": "baselines.consistency_training:ConsistencyTrainingObjective",
    "consistency_distillation": "baselines.consistency_distillation:ConsistencyDistillationObjective",
    "progressive_distillation": "baselines.progressive_distillation:ProgressiveDistillationObjective",
    "reflow": "baselines.reflow:ReflowObjective",
    "live_reflow": "baselines.live_reflow:LiveReflowObjective",
    "meanflow": "baselines.meanflow:MeanFlowObjective",
}


class KeyedValueError(ValueError):
    """A validation failure that knows the spec key it is about (e.g. `method.bootstrap_fraction`)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(message)


class MethodConfig(BaseModel):
    """Settings every method shares; each objective extends this with its own `Config`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inf/nan are never a setting

    name: str
    denoise_timesteps: int = Field(default=128, ge=2, description="M, the finest number of steps")
    class_dropout: float = Field(default=0.1, ge=0, le=1, description="label dropout to the null class (CFG)")

    @field_validator("denoise_timesteps")
    @classmethod
    def _power_of_two(cls, m: int) -> int:
        if m & (m - 1):
            raise ValueError(f"must be a power of two, got {m}")
        return m


def objective_class(name: str) -> type:
    """The objective class registered under `name`."""
    if name not in OBJECTIVES:
        raise KeyedValueError("method.name", f"expected one of {sorted(OBJECTIVES)}, got {name!r}")
    module, attr = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def parse_config(value: Any) -> MethodConfig:
    """Validate a `method:` section against the schema of the method it names."""
    if isinstance(value, MethodConfig):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise KeyedValueError("method.name", f"required: one of {sorted(OBJECTIVES)}")
    config_cls = objective_class(value["name"]).Config
    try:
        return config_cls.model_validate(value)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = "method." + ".".join(str(p) for p in err["loc"])
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        message = message[0].lower() + message[1:]
        if err["type"] != "extra_forbidden" and not isinstance(err.get("input"), (dict, list)):
            message += f", got {err.get('input')!r}"
        raise KeyedValueError(key, message) from None


def make_objective(spec) -> Any:
    """Instantiate the objective for a resolved spec (`from_spec` when it needs more of the spec, e.g. train.steps)."""
    cls = objective_class(spec.method.name)
    if hasattr(cls, "from_spec"):
        return cls.from_spec(spec)
    return cls(spec.method, num_classes=spec.data.num_classes)
