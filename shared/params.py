"""Pipeline parameters: how one is declared (`ParamSpec`, part of the config's schema), checked against
its declaration at launch, parsed from a command line's `-p key=value`, and resolved with defaults."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import msgspec

from .errors import BadParams
from .values import ParamValue

ParamType = Literal["str", "int", "float", "bool", "list"]


class ParamSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A pipeline's declared parameter (`[pipelines.<name>.params.<param>]` in the config)."""

    type: ParamType = "str"
    default: ParamValue | None = None
    description: str = ""
    choices: list[str | int | float | bool] | None = None
    pattern: str | None = None  # for str and list items
    min_items: int = 1  # for lists: an empty fan-out is refused unless this is 0


class HasParams(Protocol):
    """A pipeline, as far as its parameters go (config.PipelineConfig)."""

    @property
    def params(self) -> Mapping[str, ParamSpec]: ...


def check_param_value(name: str, spec: ParamSpec, value: Any) -> Any:
    """Return the value if it fits the declared type, choices and pattern; else raise BadParams."""
    ok: bool
    if spec.type == "str":
        ok = isinstance(value, str)
    elif spec.type == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.type == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif spec.type == "bool":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise BadParams(f"parameter {name!r}: expected {spec.type}, got {type(value).__name__} {value!r:.60}")
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, str) and "\x00" in v:  # no command line can carry it: the stage would fail later
            raise BadParams(f"parameter {name!r}: {v!r:.60} contains a NUL character")
    if spec.type == "list":
        if len(value) < spec.min_items:
            raise BadParams(f"parameter {name!r}: expected at least {spec.min_items} item(s), got {len(value)}")
        seen: set[Any] = set()
        for v in value:
            if v in seen:  # a fan-out item twice would run twice, in parallel, on the same files
                raise BadParams(f"parameter {name!r}: {v!r} appears more than once")
            seen.add(v)
    if spec.choices is not None:
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if v not in spec.choices]
        if bad:
            raise BadParams(f"parameter {name!r}: {bad[0]!r} is not one of {spec.choices}")
    if spec.pattern is not None:
        items = value if isinstance(value, list) else [value]
        for v in items:
            if not re.fullmatch(spec.pattern, str(v)):
                raise BadParams(f"parameter {name!r}: {v!r} does not match {spec.pattern}")
    return value


def parse_param_text(spec: ParamSpec, text: str) -> Any:
    """A `-p key=value` string from the command line, turned into the declared type."""
    try:
        if spec.type == "int":
            return int(text)
        if spec.type == "float":
            return float(text)
        if spec.type == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if spec.type == "list":
            return [v.strip() for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadParams(f"expected {spec.type}, got {text!r}") from None
    return text


def resolve_params(pipeline: HasParams, given: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in, every value checked; unknown or missing parameters refused."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(pipeline.params))
    if unknown:
        known = ", ".join(sorted(pipeline.params)) or "none"
        raise BadParams(f"unknown parameter {unknown[0]!r} (declared: {known})")
    out: dict[str, Any] = {}
    for name, spec in pipeline.params.items():
        if name in given:
            out[name] = check_param_value(name, spec, given[name])
        elif spec.default is not None:
            out[name] = spec.default
        else:
            raise BadParams(f"parameter {name!r} is required ({spec.type})")
    return out
