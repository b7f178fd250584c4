"""The config machinery every section uses: ConfigError, the range and choice checks of the
sections' `validate`, typed construction of a dataclass from a dict (unknown key -> error naming
it, every value checked against its field's type), and the dotted-override / dict helpers."""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_range(key: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False,
                what: str = "") -> None:
    """Raise ConfigError naming `key` unless `value` is a finite number in the interval given
    by low/high (open ends where low_open/high_open); None passes when `optional`. NaN and inf
    never pass (every numeric field of the config is a finite quantity)."""
    if value is None and optional:
        return
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    want = what or (f"in {lo}, {hi}" if low is not None and high is not None else
                    f"{'>' if low_open else '>='} {low:g}" if low is not None else
                    f"{'<' if high_open else '<='} {high:g}" if high is not None else "a number")
    null = " or null" if optional else ""
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number {want}{null}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{key}={value!r} must be {want}{null}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{key}={value!r} must be {want}{null}")


def check_choices(section: Any, prefix: str) -> None:
    """The one check of every enumerated field: a field annotated `Literal[...]` (or `Optional` of
    one) must hold one of the literal values; nested sections are checked under their own prefix.
    Registry-valued fields (attention, norm, ...) are checked against their registries instead."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}.{f.name}")
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            if value is None and type(None) in typing.get_args(tp):
                continue
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(f"{prefix}.{f.name}={value!r} is not one of {sorted(typing.get_args(tp), key=str)}")


# ---------------------------------------------------------------- typed construction
def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to annotation `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not one of {sorted(options, key=str)}")
        return options[options.index(value)]          # 1.0 -> the literal 1
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)       # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build_dataclass(cls, values: dict, prefix: str = "", base=None):
    """Build `cls` from a dict, on top of `base` (an instance) or the defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    obj = dataclasses.replace(base) if base is not None else cls()
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys under {prefix or 'the top level'}: {sorted(names)}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            v = build_dataclass(hints[k], v, key, base=getattr(obj, k))
        setattr(obj, k, _check_type(v, hints[k], key))
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        k, v = item.split("=", 1)
        _set_dotted(tree, k.strip(), yaml.safe_load(v) if v.strip() else None)
    return tree


def merge_dicts(base: dict, top: dict) -> dict:
    """`base` with `top` laid over it, nested dicts merged key by key (top wins)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def add_config_arguments(parser) -> None:
    """The `[CONFIG] [key=value ...]` arguments of the commands that take a job config."""
    parser.add_argument("config", nargs="?", help="YAML config file (sections model/parallel/data/optim/train/log)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, values parsed as YAML")


def config_arguments(args) -> tuple[Optional[str], list[str]]:
    """(YAML path or None, overrides) from parsed `add_config_arguments` arguments: a first
    argument that holds `=` and is no file is an override."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not os.path.exists(path):
        path, overrides = None, [path] + overrides
    return path, overrides


def flatten_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in tree.items():
        out.update(flatten_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
