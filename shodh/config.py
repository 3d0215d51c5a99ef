"""Run configuration: typed dataclasses per stage, composed into one `RunConfig`.

Precedence is dataclass defaults < profile YAML < dotted CLI overrides (`sim.grid=64`).
Every value is type-checked and every stage validates itself once, with errors that name
the offending field (`sim.grid: must be a multiple of 16, got 40`). Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from shodh.data.loader import DataConfig
from shodh.errors import ConfigError, check
from shodh.eval.config import EvalConfig
from shodh.model.config import ModelConfig
from shodh.physics.simulate import SimConfig
from shodh.study.config import StudyConfig
from shodh.tokenizer.config import TokenizerConfig
from shodh.tracking import TrackingConfig
from shodh.train.config import TrainConfig

PROFILE_DIR = "profiles"
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclasses.dataclass
class RunConfig:
    """Everything one invocation needs; each section belongs to one pipeline stage."""

    profile: str = "custom"
    seed: int = 0
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)

    def validate(self) -> None:
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


def available_profiles() -> list[str]:
    folder = resources.files("shodh").joinpath(PROFILE_DIR)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _profile_text(profile: str) -> str:
    """A shipped profile by name, or a YAML file by path (anything containing '/' or '.yaml')."""
    if "/" in profile or profile.endswith((".yaml", ".yml")):
        path = Path(profile)
        if not path.is_file():
            raise ConfigError(f"--profile: file not found: {path}")
        return path.read_text()
    if profile not in available_profiles():
        raise ConfigError(
            f"--profile: unknown profile '{profile}' (available: {', '.join(available_profiles())})"
        )
    return resources.files("shodh").joinpath(PROFILE_DIR, f"{profile}.yaml").read_text()


def yaml_error(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{what}{where}" + (f" ({context})" if context else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.num_experts=8' -> (['model', 'num_experts'], 8); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override '{text}': expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad override '{text}': value is not valid YAML ({yaml_error(exc)})") from None
    return key.split("."), value


def load_config(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve a profile plus overrides into a validated RunConfig."""
    source = profile if "/" in profile else f"profile '{profile}'"
    try:
        data = yaml.safe_load(_profile_text(profile)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    data.setdefault("profile", Path(profile).stem if "/" in profile else profile)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: not a section (bad override '{text}')")
            node = child
        node[path[-1]] = value
    return from_dict(RunConfig, data)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain data, type-checking every field, then validate it."""
    obj = _coerce(cls, data, path)
    validate_tree(obj, path)
    return obj


def validate_tree(obj: Any, path: str = "") -> None:
    """Call `validate()` on every dataclass in the tree, prefixing field names with their path."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, _join(path, f.name))
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError as exc:
            raise ConfigError(f"{path}.{exc}" if path else str(exc)) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {value!r}")
        hints = get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        for key in value:
            if key not in names:
                raise ConfigError(
                    f"{_join(path, str(key))}: unknown key (known: {', '.join(sorted(names))})"
                )
        kwargs = {k: _coerce(hints[k], v, _join(path, k)) for k, v in value.items()}
        return tp(**kwargs)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{path}: must be one of {choices}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is tuple:
            if rest and rest != [Ellipsis] and len(items) != len(get_args(tp)):
                raise ConfigError(f"{path}: expected {len(get_args(tp))} items, got {len(items)}")
            return tuple(items)
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp)
        return {_coerce(key_tp, k, path): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it is a number to a user
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp in (int, bool, str):
        # bool is a subclass of int: `grid=true` must not become grid=1.
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config type {tp!r}")  # a bug in a dataclass, not user input

