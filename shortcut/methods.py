"""Registry of training methods: a method name in a spec -> its objective class and config schema.

Methods are plugins: each installed package lists its objectives under the entry-point group
`shortcut.methods` (this project's in pyproject.toml), `name = "module:ObjectiveClass"`. The core
never names the packages that hold them; a method is imported when a spec first names it.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shortcut.errors import KeyedValueError, first_error

ENTRY_POINT_GROUP = "shortcut.methods"


@functools.lru_cache(maxsize=1)
def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def method_names() -> list[str]:
    """Every registered method, in table order (each objective's `table_order`, then name)."""
    return sorted(_entry_points(), key=lambda n: (objective_class(n).table_order, n))


def display_name(name: str) -> str:
    """A method's name in tables: its objective's `display_name`, else the spec name title-cased
    (also for methods recorded in results but not installed here)."""
    if name in _entry_points():
        shown = objective_class(name).display_name
        if shown:
            return shown
    return name.replace("_", " ").title()


def table_order(name: str) -> float:
    """A method's row order in tables (methods not installed here come last)."""
    return objective_class(name).table_order if name in _entry_points() else float("inf")


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


@functools.cache
def objective_class(name: str) -> type:
    """The objective class registered under `name`."""
    points = _entry_points()
    if name not in points:
        if not points:
            raise KeyedValueError("method.name", f"no methods are registered (entry-point group {ENTRY_POINT_GROUP}): "
                                  "install the project, e.g. `pip install -e .`")
        raise KeyedValueError("method.name", f"expected one of {sorted(points)}, got {name!r}")
    return points[name].load()


def parse_config(value: Any) -> MethodConfig:
    """Validate a `method:` section against the schema of the method it names."""
    if isinstance(value, MethodConfig):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise KeyedValueError("method.name", f"required: one of {sorted(_entry_points())}")
    config_cls = objective_class(value["name"]).Config
    try:
        return config_cls.model_validate(value)
    except pydantic.ValidationError as e:
        raise KeyedValueError(*first_error(e, prefix="method.")) from None


def make_objective(spec) -> Any:
    """Instantiate the objective for a resolved spec (its `from_spec`)."""
    return objective_class(spec.method.name).from_spec(spec)
