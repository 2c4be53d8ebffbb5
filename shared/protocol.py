"""The gateway's stream protocol (WebSocket and SSE), in one place: the frames as Structs, the error
and close codes, the one fast encoder of the `events` frame, and SSE's framing.

The dashboard's `gateway_svc/static/protocol.js` mirrors `protocol_table()`; tests/test_protocol.py
fails when the two disagree, so a new frame field or close reason is a change here and there.
Frames tolerate unknown fields when decoded (a newer gateway may add some); an error frame's `code`
is kept as text for the same reason (compare it with ErrorCode members, which are strings).
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from .events import Event


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway sends."""

    NORMAL = 1000  # the run's terminal event was sent: nothing more will come
    GOING_AWAY = 1001  # the gateway is shutting down: resume with the cursor
    UNKNOWN_RUN = 4004  # no such run, or its journal is not in the gateway's directory (error frame first)
    TRY_AGAIN_LATER = 1013  # cluster mode: the event stream does not answer; resume with the cursor
    SLOW_CONSUMER = 4008  # the client did not keep up: resume with the cursor, nothing is lost
    BAD_MESSAGE = 4400  # the client sent something other than {"type": "ping"} (error frame first)


class CloseReason(enum.StrEnum):
    """The reason text of each close the gateway makes; CLOSE_CODE gives its code."""

    RUN_ENDED = "run ended"
    SHUTTING_DOWN = "gateway shutting down"
    UNKNOWN_RUN = "unknown run"
    JOURNAL_MISSING = "journal missing"
    SLOW_CONSUMER = "slow consumer"
    BAD_MESSAGE = "bad message"
    EVENT_STREAM_UNAVAILABLE = "event stream unavailable"


CLOSE_CODE: dict[CloseReason, CloseCode] = {
    CloseReason.RUN_ENDED: CloseCode.NORMAL,
    CloseReason.SHUTTING_DOWN: CloseCode.GOING_AWAY,
    CloseReason.UNKNOWN_RUN: CloseCode.UNKNOWN_RUN,
    CloseReason.JOURNAL_MISSING: CloseCode.UNKNOWN_RUN,
    CloseReason.SLOW_CONSUMER: CloseCode.SLOW_CONSUMER,
    CloseReason.BAD_MESSAGE: CloseCode.BAD_MESSAGE,
    CloseReason.EVENT_STREAM_UNAVAILABLE: CloseCode.TRY_AGAIN_LATER,
}


class ErrorCode(enum.StrEnum):
    """The `code` of an error frame."""

    UNKNOWN_RUN = "unknown_run"  # then close 4004
    JOURNAL_MISSING = "journal_missing"  # then close 4004
    JOURNAL_GAP = "journal_gap"  # events N..M are missing from the journal; the stream goes on
    BAD_MESSAGE = "bad_message"  # then close 4400
    SLOW_CONSUMER = "slow_consumer"  # SSE only: the stream ends (WebSocket says it with close 4008)
    CLOSED = "closed"  # SSE only: the gateway ended the stream for another reason


# Closes a client resumes after (with its cursor): ours above, and what the network or a proxy gives
# (1006 dropped, 1011 server error, 1012 restart).
RETRYABLE_CLOSES = frozenset({CloseCode.GOING_AWAY, CloseCode.TRY_AGAIN_LATER, CloseCode.SLOW_CONSUMER, 1006, 1011, 1012})
# Closes after which reconnecting cannot help (the error frame before them says why).
FATAL_CLOSES = frozenset({CloseCode.UNKNOWN_RUN, CloseCode.BAD_MESSAGE})
# Error frames after which the stream goes on; every other error frame is followed by a close.
NON_FATAL_ERRORS = frozenset({ErrorCode.JOURNAL_GAP})


# ---------------------------------------------------------------------------- frames


class Hello(msgspec.Struct, tag="hello", tag_field="type", omit_defaults=True):
    """The first frame: the position the stream starts from, and whether it is the one asked for."""

    cursor: str
    recovered: bool
    reason: str | None = None  # set when recovered is false
    run_id: str | None = None  # the one-run stream's run


class EventsFrame(msgspec.Struct, tag="events", tag_field="type"):
    """One or more events, in order, and the cursor to resume after them."""

    events: list[Event]
    cursor: str


class ErrorFrame(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    """An error; a close follows unless the code is in NON_FATAL_ERRORS (the gap notice)."""

    code: str
    message: str
    run_id: str | None = None
    missing: tuple[int, int] | None = None  # journal_gap: the first and last missing seq

    @property
    def fatal(self) -> bool:
        return self.code not in NON_FATAL_ERRORS


class Pong(msgspec.Struct, tag="pong", tag_field="type"):
    """The answer to a client's {"type": "ping"}."""


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    """The one message a client may send."""


Frame = Hello | EventsFrame | ErrorFrame | Pong
FRAME_TYPES = frozenset({"hello", "events", "error", "pong"})  # the `type` of each (checked by the tests)


def gap_notice(run_id: str, lo: int, hi: int, message: str) -> ErrorFrame:
    """The `journal_gap` frame: seqs lo..hi of the run are not in its journal; the events after follow."""
    return ErrorFrame(ErrorCode.JOURNAL_GAP, message, run_id=run_id, missing=(lo, hi))


_encoder = msgspec.json.Encoder()
_frame_decoder = msgspec.json.Decoder(Frame)
_str_encode = _encoder.encode


def encode_frame(frame: Frame | Ping) -> bytes:
    return _encoder.encode(frame)


def decode_frame(data: bytes | str) -> Frame:
    """A server frame; raises msgspec.DecodeError (ValidationError for an unknown type) otherwise."""
    return _frame_decoder.decode(data)


def encode_event(ev: Event) -> bytes:
    """One event as the `events` frame carries it (and the journal writes it)."""
    return _encoder.encode(ev)


def events_frame(parts: list[bytes], cursor: str) -> bytes:
    """The `events` frame of comma-separated groups of JSON-encoded events: byte for byte what
    encode_frame(EventsFrame(events, cursor)) gives, without decoding or copying the events more than
    once (joined in one go: `a + b + c` would copy each part again)."""
    return b"".join((b'{"type":"events","events":[', b",".join(parts), b'],"cursor":', _str_encode(cursor), b"}"))


def array_frame(array: bytes, cursor: str) -> bytes:
    """The `events` frame of a JSON array of events (as msgspec encodes a list of Events)."""
    return b"".join((b'{"type":"events","events":', array, b',"cursor":', _str_encode(cursor), b"}"))


# ---------------------------------------------------------------------------- SSE framing

SSE_RETRY = b"retry: 1000\n\n"  # the browser's EventSource reconnects after 1 s
SSE_KEEPALIVE = b": keepalive\n\n"


def sse_message(data: bytes, *, id: str | None = None, event: str | None = None) -> bytes:
    """One Server-Sent Events message; `data` is one line of JSON (a frame), `id` the cursor."""
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if id is not None:
        head += b"id: " + id.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def sse_close_frame(code: int, reason: str) -> ErrorFrame | None:
    """What an SSE stream says before it ends where a WebSocket would close with `code` (none for the
    ordinary ends: a browser's EventSource reconnects with Last-Event-ID by itself)."""
    if code < 4000:
        return None
    err = ErrorCode.SLOW_CONSUMER if code == CloseCode.SLOW_CONSUMER else ErrorCode.CLOSED
    return ErrorFrame(err, f"{reason}: reconnect with Last-Event-ID to resume")


# ---------------------------------------------------------------------------- the JavaScript mirror


def protocol_table() -> dict[str, Any]:
    """What gateway_svc/static/protocol.js holds, as JSON: codes, reasons, frame fields, and which
    closes and errors a client retries after."""
    frames = {}
    for cls in (Hello, EventsFrame, ErrorFrame, Pong):
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        frames[str(info.tag)] = ["type", *(f.encode_name for f in info.fields)]
    return {
        "close": {c.name: int(c) for c in CloseCode},
        "closeReason": {r.name: str(r) for r in CloseReason},
        "closeCodeOf": {r.name: CLOSE_CODE[r].name for r in CloseReason},
        "error": {e.name: str(e) for e in ErrorCode},
        "frames": frames,
        "retryableCloses": sorted(int(c) for c in RETRYABLE_CLOSES),
        "fatalCloses": sorted(int(c) for c in FATAL_CLOSES),
        "nonFatalErrors": sorted(str(e) for e in NON_FATAL_ERRORS),
    }
