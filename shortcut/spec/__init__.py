"""Declarative experiment specs: YAML files in experiments/, validated into a typed, frozen, resolved `Spec`.

schema.py: what a spec is (the sections, the hash, `smoke_version`, the self-contained tree a worker gets);
loading.py: how a spec is read (files with bases, `--set` overrides, the teacher resolved once).
"""

from shortcut.spec.loading import (EXPERIMENTS_DIR, is_table_file, list_specs, list_tables, load_spec, parse_value,
                                   read_yaml, spec_path, to_yaml, validate)
from shortcut.spec.schema import (HASHED_SECTIONS, DataSpec, EvalSetting, EvalSpec, LatentSpec, ModelSpec,
                                  OptimizerSpec, OutputSpec, ResourcesSpec, Spec, SpecError, SweepSpec, TrainSpec,
                                  flatten, make_spec, smoke_version, with_values)

__all__ = ["EXPERIMENTS_DIR", "HASHED_SECTIONS", "DataSpec", "EvalSetting", "EvalSpec", "LatentSpec", "ModelSpec",
           "OptimizerSpec", "OutputSpec", "ResourcesSpec", "Spec", "SpecError", "SweepSpec", "TrainSpec", "flatten",
           "is_table_file", "list_specs", "list_tables", "load_spec", "make_spec", "parse_value", "read_yaml",
           "smoke_version", "spec_path", "to_yaml", "validate", "with_values"]
