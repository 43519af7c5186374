"""Loading specs from experiments/: YAML files with inheritance, `--set` overrides, and the teacher resolved.

A spec file may inherit from one or more bases (`base: bases/digits.yaml` or a list); bases are
merged first, the file's own keys win, then `--set key=value` overrides. A spec that names a `teacher`
gets the teacher's Spec loaded here too (with its `teacher_overrides`, its --smoke version for a --smoke
spec), so what this module returns is resolved and nothing downstream reads a file. Every error is a
`SpecError` naming the file (or override) that set the offending key.

This is the project's one YAML reader: table files (orchestration/execution/graph.py) are read with
`read_yaml` too.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from shortcut.spec import Spec, SpecError, make_spec, smoke_version, source_of

EXPERIMENTS_DIR = Path(os.environ.get("SHORTCUT_EXPERIMENTS", Path(__file__).resolve().parents[1] / "experiments"))
MAX_TEACHER_CHAIN = 16  # a longer chain of teachers is taken for a cycle


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 insists on `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


# What YAML text can raise besides YAMLError: a date that does not exist (`2024-02-30`, ValueError), a
# file that is not UTF-8 (UnicodeDecodeError, a ValueError), nesting deeper than Python's recursion limit.
_YAML_VALUE_ERRORS = (ValueError, RecursionError)


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (`4` -> int, `1e-4` -> float, `[1, 4]` -> list)."""
    return yaml.load(text, Loader=_Loader)


def is_table_file(path: Path) -> bool:
    """A table spec lists `experiments:` (orchestration/execution/graph.py) instead of describing one run."""
    try:
        raw = yaml.load(Path(path).read_text(), Loader=_Loader)
    except (OSError, yaml.YAMLError, *_YAML_VALUE_ERRORS):
        return False
    return _is_table(raw)


def _is_table(raw) -> bool:
    return isinstance(raw, dict) and "experiments" in raw


def list_specs(root: Path = EXPERIMENTS_DIR) -> list[str]:
    """Names of the experiment specs (bases and table specs excluded)."""
    return sorted(p.stem for p in root.glob("*.yaml") if not is_table_file(p))


def list_tables(root: Path = EXPERIMENTS_DIR) -> list[str]:
    """Names of the table specs (experiments/table1_*.yaml)."""
    return sorted(p.stem for p in root.glob("*.yaml") if is_table_file(p))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
        return False


def spec_path(name: str, root: Path = EXPERIMENTS_DIR) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and _exists(path):
        return path
    candidate = root / f"{name}.yaml"
    if _exists(candidate):
        return candidate
    known = ", ".join(list_specs(root) + list_tables(root)) or "(none)"
    raise SpecError(name, "", f"no such spec in {root}; known specs: {known}")


def read_yaml(path: Path) -> dict:
    """A YAML mapping file, read with the project's one loader; SpecError (one line) when it cannot be."""
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(path), "", f"invalid YAML: {where}{getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise SpecError(str(path), "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), "", f"not a YAML text file (byte {e.start} is not UTF-8)") from None
    except RecursionError:
        raise SpecError(str(path), "", "invalid YAML: nested too deeply") from None
    except ValueError as e:  # e.g. a date that does not exist
        raise SpecError(str(path), "", f"invalid YAML value: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(str(path), "", f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(into: dict, new: dict, source: str, origin: dict, prefix: str = "") -> None:
    """Deep-merge `new` into `into`, recording which source set each leaf key."""
    for key, value in new.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, origin, f"{path}.")
        else:
            into[key] = copy.deepcopy(value)
            origin[path] = source


def _resolve_file(path: Path, origin: dict, chain: tuple[Path, ...] = (), *, top: bool = False) -> dict:
    if top and _is_table(raw := read_yaml(path)):
        raise SpecError(_display(path), "experiments", "this is a table spec (a list of experiments), not one "
                                                       "experiment; run it with `run_experiment NAME`")
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in chain + (path,))
        raise SpecError(str(path), "base", f"inheritance cycle: {cycle}")
    raw = raw if top else read_yaml(path)
    bases = raw.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise SpecError(str(path), "base", "expected a file name or a list of file names")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base) if base.endswith((".yaml", ".yml")) else spec_path(base)
        if not base_path.exists():
            raise SpecError(str(path), "base", f"base file {base_path} does not exist")
        _merge(merged, _resolve_file(base_path, origin, chain + (path,)), _display(base_path), origin)
    _merge(merged, raw, _display(path), origin)
    return merged


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _apply_override(tree: dict, override: str, origin: dict) -> None:
    source = f"--set {_shorten(override)}"
    if "=" not in override:
        raise SpecError(source, "", "expected KEY=VALUE, e.g. --set model.depth=4")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(source, key, "empty key component")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(source, key, f"{part} is not a section")
        node = child
    try:
        node[parts[-1]] = parse_value(text)
    except (yaml.YAMLError, *_YAML_VALUE_ERRORS) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise SpecError(source, key, f"cannot parse value {_shorten(text)!r}: {reason}") from None
    origin[key.strip()] = source


def load_spec(name: str, overrides: list[str] | tuple[str, ...] = (), root: Path = EXPERIMENTS_DIR, *,
              smoke: bool = False, for_teachers: tuple[str, ...] = (), _chain: tuple[str, ...] = ()) -> Spec:
    """Load, merge, override and validate a spec by name (experiments/NAME.yaml) or path, its teacher resolved;
    with `smoke`, its --smoke version (smoke_version). `for_teachers`: overrides that also reach every teacher
    down the chain, after each one's own `teacher_overrides` (a table's `set` and seed)."""
    path = spec_path(name, root)
    origin: dict[str, str] = {}
    tree = _resolve_file(path, origin, top=True)
    for override in overrides:
        _apply_override(tree, override, origin)
    tree.setdefault("name", path.stem)
    spec = validate(tree, origin, default_source=_display(path), for_teachers=for_teachers, _chain=_chain)
    return smoke_version(spec) if smoke else spec


def validate(tree: dict, origin: dict[str, str], default_source: str, *, for_teachers: tuple[str, ...] = (),
             _chain: tuple[str, ...] = ()) -> Spec:
    """Validate a merged tree (a spec file's, or a run record's `spec`) into a Spec with its teacher's spec
    loaded from the experiment files; errors name the file (or override) that set the offending key."""
    if for_teachers and tree.get("teacher") is not None:
        tree = dict(tree, teacher_overrides=[*(tree.get("teacher_overrides") or ()), *for_teachers])
    spec = make_spec(tree, default_source, origin)
    if spec.teacher is None:
        return spec
    try:
        spec_path(spec.teacher)
    except SpecError as e:
        raise SpecError(source_of("teacher", origin, default_source), "teacher", e.message) from None
    chain = (*_chain, spec.name)
    teacher = Path(spec.teacher).stem
    if teacher in chain or len(chain) > MAX_TEACHER_CHAIN:  # names may differ from file names: also a bound
        raise SpecError(chain[0], "teacher", "cycle of teachers: " + " -> ".join((*chain, teacher)))
    return spec.with_teacher(load_spec(spec.teacher, spec.teacher_overrides, smoke=spec.smoke,
                                       for_teachers=for_teachers, _chain=chain))


def to_yaml(spec: Spec) -> str:
    """The resolved spec as YAML (what `run_experiment NAME --print` shows)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
