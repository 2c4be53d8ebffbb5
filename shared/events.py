"""The event: one schema for the journal line, the WebSocket frame and the ZeroMQ payload."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import Annotated, Any, Literal

import msgspec

from .values import Object

EventKind = Literal["queued", "start", "success", "failure", "skipped", "cancelled", "log", "metric"]
EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]
TERMINAL_KINDS = frozenset({"success", "failure", "cancelled"})
PIPELINE_STAGE = "pipeline"

STAGE_NAME_PATTERN = r"^[^/\x00-\x1f]{1,128}$"
_STAGE_RE = re.compile(STAGE_NAME_PATTERN)


def is_valid_stage_name(name: object) -> bool:
    return isinstance(name, str) and _STAGE_RE.fullmatch(name) is not None


class Event(msgspec.Struct, omit_defaults=True, gc=False):
    """One event of a run. Field order is the order of the JSON object in the journal.

    gc=False: events never take part in reference cycles, and untracked structs make decoding a long
    journal ~25% faster (the cyclic GC no longer walks a million fresh objects)."""

    # run_id and stage are checked where they enter (ids.check_run_id, the journal writer, the config),
    # not per decode: a pattern per field makes reading a journal ~3x slower. A reader compares each
    # line's run_id with its file's, which was checked.
    run_id: str
    seq: Annotated[int, msgspec.Meta(ge=1)]
    timestamp: str
    stage: str
    event: EventKind
    msg: str = ""
    data: Object | None = None  # type: ignore[valid-type]  # nested at most values.MAX_DEPTH levels

    @property
    def is_terminal(self) -> bool:
        """The run's one terminal event: stage `pipeline` with success, failure or cancelled."""
        return self.stage == PIPELINE_STAGE and self.event in TERMINAL_KINDS


# what a writer is asked to journal: (stage, event, msg, data); the journal adds run_id, seq and timestamp
EventDraft = tuple[str, str, str, dict[str, Any] | None]


def is_terminal(stage: str, event: str) -> bool:
    return stage == PIPELINE_STAGE and event in TERMINAL_KINDS


# (zone, unix second, "YYYY-MM-DDTHH:MM:SS", "+HH:MM") of the last second formatted. One tuple, replaced
# whole: a reader in any thread sees a consistent entry, and a race only formats a second twice.
_ts_cache: tuple[tzinfo | None, int, str, str] = (None, -1, "", "")


def now_timestamp(tz: tzinfo, _time_ns: Callable[[], int] = time.time_ns) -> str:
    """RFC 3339 with the zone's UTC offset and microseconds, e.g. 2026-11-23T03:15:00.123456-06:00.

    The date, time-of-second and offset are formatted once per second (a hot path: every event).
    """
    global _ts_cache
    second, micros = divmod(_time_ns() // 1000, 1_000_000)
    cached_tz, cached_second, head, offset = _ts_cache
    if second != cached_second or tz is not cached_tz:
        iso = datetime.fromtimestamp(second, tz).isoformat(timespec="seconds")
        head, offset = iso[:19] + ".", iso[19:]
        _ts_cache = (tz, second, head, offset)
    return head + str(micros).zfill(6) + offset


def parse_timestamp(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


# Encoders and decoders are built once (msgspec perf tips); each is safe to share within a thread.
json_encoder = msgspec.json.Encoder()
json_decoder = msgspec.json.Decoder(Event)
msgpack_encoder = msgspec.msgpack.Encoder()
msgpack_decoder = msgspec.msgpack.Decoder(Event)


def event_to_json_line(ev: Event, _encode: Callable[[Any], bytes] = json_encoder.encode) -> bytes:
    """The journal form of an event: compact JSON and a trailing newline."""
    return _encode(ev) + b"\n"
