"""How events and tables look in a terminal: one line per event, colours only when a terminal is attached."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import msgspec

from shared.events import Event

_COLOURS = {
    "queued": "36", "start": "34", "success": "32", "failure": "31;1", "cancelled": "33",
    "skipped": "33", "log": "0", "metric": "35",
}
_json = msgspec.json.Encoder()


def use_colour(stream: TextIO) -> bool:
    return stream.isatty()


def event_line(ev: Event, *, colour: bool, show_run: bool = False) -> str:
    clock = ev.timestamp[11:23] if len(ev.timestamp) >= 23 else ev.timestamp
    kind = f"{ev.event:<9}"
    if colour:
        kind = f"\x1b[{_COLOURS.get(ev.event, '0')}m{kind}\x1b[0m"
    item = (ev.data or {}).get("item")
    stage = f"{ev.stage}[{item}]" if item is not None else ev.stage
    run = f"{ev.run_id[-14:]} " if show_run else ""
    msg = ev.msg.replace("\n", " ")
    return f"{clock} {run}{stage:<16} {kind} {msg}"


def json_line(obj: Any) -> str:
    return _json.encode(obj).decode()


def print_table(rows: list[dict[str, Any]], columns: list[str], out: TextIO = sys.stdout) -> None:
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)
