"""Building a TrainConfig: presets, files, ``key=value`` overrides, and one ConfigError for all problems.

A config is built from a preset (``emotions/presets/NAME.yaml``), then an optional user file (YAML
or JSON), then ``section.key=value`` overrides, in that order. Every unknown key and every bad value
is reported at once, by its dotted name, before any cluster time is spent.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import annotated_types
import yaml
from pydantic import TypeAdapter, ValidationError

from emotions.config.schema import ConfigError, Problems, TrainConfig, section_defaults

PRESETS_DIR = resources.files("emotions") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in PRESETS_DIR.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A shipped preset by name (never a path: a file of your own goes through ``--config``)."""
    if name not in preset_names():
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {preset_names()}, or pass a file of your own with --config"
        )
    return yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text()) or {}


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["stage1.epochs=3", "model.encoder=bert-base-uncased"]`` -> nested dict (values as YAML)."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (for example stage1.epochs=3)")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(
    preset: str | None = "default", file: str | Path | None = None, overrides: list[str] = ()
) -> TrainConfig:
    raw: dict[str, Any] = load_preset(preset) if preset else {}
    if file:
        raw = merge(raw, load_file(file))
    raw = merge(raw, parse_overrides(list(overrides)))
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig; all problems are collected into one ConfigError. A section
    given in part keeps the defaults of the keys it leaves out (stage2's own defaults for stage2)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {raw!r}")
    return validate(TrainConfig, merge(section_defaults(), raw), what="configuration")


def validate(cls: type, raw: Any, *, what: str, prefix: str = "") -> Any:
    """``cls`` built from ``raw`` (a mapping), or one ConfigError listing every problem by its
    dotted key (``prefix`` before each: ``tune`` for the tune section)."""
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as error:
        lines = [f"{key}: {message}" if key else message for key, message in describe_errors(error, cls, prefix)]
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(lines), lines) from None


# ----------------------------------------------------------------------------- error messages


def describe_errors(error: ValidationError, root: type, prefix: str = "") -> list[tuple[str, str]]:
    """pydantic's errors for a ``root`` dataclass -> ``[(dotted key, what is wrong and what is
    allowed), ...]``, the messages this project has always given (``stage1.epoch: unknown key``,
    ``model.pooling: 'max' is not one of ['mean', 'cls']``)."""
    out = []
    for item in error.errors():
        key = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        context = item.get("ctx") or {}
        if isinstance(context.get("error"), Problems):
            out += [(".".join(p for p in (key, sub) if p), message) for sub, message in context["error"].problems]
        else:
            out.append((key or "config", _describe(item, _field_at(root, item["loc"]))))
    return out


def _describe(item: dict, found: tuple[type, Any] | None) -> str:
    kind, value, context = item["type"], item.get("input"), item.get("ctx") or {}
    parent, info = found or (None, None)
    if kind == "unexpected_keyword_argument":
        known = sorted(parent.__pydantic_fields__) if parent else []
        return f"unknown key; known keys here: {known}"
    if kind in ("missing", "missing_argument"):
        return "is required; give a value"
    if kind == "value_error":
        return str(context["error"])
    if kind == "literal_error":
        choices = _choices(info.annotation) if info else None
        return f"{value!r} is not one of {choices or context.get('expected')}"
    if kind == "finite_number":
        return f"{value} must be a finite number"  # str(): YAML's "nan" as written, unquoted
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        hint = f" ({info.description})" if info and info.description else ""
        return f"{value} must be {_bounds(info, context)}{hint}"
    if kind == "string_too_short" or value is None:
        return "may not be empty"
    if kind.startswith(("int_", "float_", "bool_", "string_", "tuple_", "dict_", "dataclass_")):
        name = kind.split("_")[0]
        expected = {"string": "str", "dict": "a mapping", "dataclass": "a mapping"}.get(name, name)
        return f"expected {expected}, got {value!r}"
    return f"{item['msg']} (got {value!r})"


def _field_at(root: type, loc: tuple) -> tuple[type, Any] | None:
    """(the dataclass that holds the key at ``loc``, that key's FieldInfo or None)."""
    cls = root
    for depth, part in enumerate(loc):
        fields = getattr(cls, "__pydantic_fields__", None)
        if fields is None:
            return None
        info = fields.get(part)
        if depth == len(loc) - 1 or info is None:
            return cls, info
        cls = info.annotation
    return None


def _choices(annotation: Any) -> list | None:
    """The values of the Literal in ``annotation`` (inside Annotated or Optional too)."""
    if getattr(annotation, "__origin__", None) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):
        if (choices := _choices(arg)) is not None:
            return choices
    return None


def _bounds(info: Any, context: dict) -> str:
    """``in [0, 1)``, ``>= 1``, ``> 0``: a key's whole range, from its Field(ge=..., lt=...)."""
    limits = {}
    for item in info.metadata if info else []:
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                limits[name] = getattr(item, name)
    limits = limits or context
    low = ("[", limits["ge"]) if "ge" in limits else ("(", limits["gt"]) if "gt" in limits else None
    high = (limits["le"], "]") if "le" in limits else (limits["lt"], ")") if "lt" in limits else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    return f"{'<=' if high[1] == ']' else '<'} {high[0]}"
