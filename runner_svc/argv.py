"""Placeholders in a command stage's argv: `{home}`, `{run_id}`, `{stage}`, `{item}` and `{<param>}`,
filled per argv element (never through a shell). List parameters are joined with ",". `{{name}}`
stands for a literal `{name}`. An unknown placeholder fails the stage with a message naming it."""

from __future__ import annotations

import re
from typing import Any

from shared.errors import BadCommand

_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fill_argv(argv: list[str], values: dict[str, Any]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        def sub(m: re.Match[str], i: int = i, arg: str = arg) -> str:  # called at once, in this iteration
            if m.group(1) is not None:
                return "{" + m.group(1) + "}"
            name = m.group(2)
            if name not in values:
                known = ", ".join("{" + k + "}" for k in sorted(values))
                raise BadCommand(f"unknown placeholder {{{name}}} in command argument {i} ({arg!r}); known: {known}")
            return _text(values[name])

        out.append(_PLACEHOLDER.sub(sub, arg))
    return out
