"""The stream protocol in one place (shared/protocol.py): the dashboard's protocol.js holds the same
codes and frame fields; the fast `events` frame encoders give byte for byte what the Struct encoding
gives; frames decode back to their Structs, and unknown fields are tolerated (schema evolution)."""

from __future__ import annotations

import json
import re

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from shared import protocol as p
from shared.events import EVENT_KINDS, Event
from tests.harness import REPO

PROTOCOL_JS = REPO / "gateway_svc" / "static" / "protocol.js"

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
events_st = st.builds(
    Event,
    run_id=st.from_regex(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}$", fullmatch=True),
    seq=st.integers(1, 2**53),
    timestamp=st.just("2026-11-23T03:15:00.123456-06:00"),
    stage=st.sampled_from(["pipeline", "translator", "crunch é"]),
    event=st.sampled_from(EVENT_KINDS),
    msg=st.text(max_size=40),  # quotes, backslashes, control characters, non-ASCII: all escaped alike
    data=st.none() | st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
)
# cursors are base64url or digits in practice; any text must still come out as valid JSON
cursors = st.one_of(st.from_regex(r"^[A-Za-z0-9_-]{0,60}$", fullmatch=True), st.text(max_size=20))


def js_table() -> dict[str, object]:
    text = PROTOCOL_JS.read_text(encoding="utf-8")
    m = re.search(r"protocol-table-begin.*?\n\s*export const PROTOCOL = Object\.freeze\((.*?)\);\s*\n// protocol-table-end",
                  text, re.DOTALL)
    assert m, f"{PROTOCOL_JS}: no `export const PROTOCOL = Object.freeze({{...}});` between the table markers"
    return json.loads(m.group(1))


def test_protocol_js_mirrors_shared_protocol() -> None:
    """Codes, reasons, frame fields and the retry classes: a change on one side only fails here."""
    assert js_table() == p.protocol_table()


def test_every_frame_type_and_field_is_in_the_table() -> None:
    table = p.protocol_table()
    assert set(table["frames"]) == p.FRAME_TYPES
    assert table["frames"]["error"] == ["type", "code", "message", "run_id", "missing"]
    assert set(p.CLOSE_CODE) == set(p.CloseReason), "every close reason has its code"
    assert set(p.CLOSE_CODE.values()) <= set(p.CloseCode)
    # a close a client retries after is never one it gives up after
    assert not (p.RETRYABLE_CLOSES & p.FATAL_CLOSES)


def test_the_js_table_check_sees_a_difference() -> None:
    """The check is not vacuous: the table parsed from protocol.js carries every code."""
    table = js_table()
    assert table["close"]["SLOW_CONSUMER"] == 4008
    assert table["error"]["JOURNAL_GAP"] == "journal_gap"
    table["close"]["SLOW_CONSUMER"] = 4009
    assert table != p.protocol_table()


@settings(max_examples=150, deadline=None, database=None)
@given(groups=st.lists(st.lists(events_st, min_size=1, max_size=4), min_size=1, max_size=4), cursor=cursors)
def test_events_frame_is_exactly_the_struct_encoding(groups: list[list[Event]], cursor: str) -> None:
    events = [ev for g in groups for ev in g]
    expected = p.encode_frame(p.EventsFrame(events, cursor))
    parts = [b",".join(p.encode_event(ev) for ev in g) for g in groups]  # batches joined, as when coalescing
    assert p.events_frame(parts, cursor) == expected
    assert p.array_frame(msgspec.json.encode(events), cursor) == expected
    back = p.decode_frame(expected)
    assert isinstance(back, p.EventsFrame) and back.events == events and back.cursor == cursor


def test_frames_encode_as_the_contract_says_and_decode_back() -> None:
    hello = p.Hello("12", True, run_id="r1")
    assert p.encode_frame(hello) == b'{"type":"hello","cursor":"12","recovered":true,"run_id":"r1"}'
    unrecovered = p.Hello("c", False, "cursor too old")
    assert p.encode_frame(unrecovered) == b'{"type":"hello","cursor":"c","recovered":false,"reason":"cursor too old"}'
    gap = p.gap_notice("r1", 3, 5, "events 3..5 are missing")
    assert p.encode_frame(gap) == (b'{"type":"error","code":"journal_gap","message":"events 3..5 are missing",'
                                   b'"run_id":"r1","missing":[3,5]}')
    assert not gap.fatal and p.ErrorFrame(p.ErrorCode.UNKNOWN_RUN, "no run").fatal
    assert p.encode_frame(p.Pong()) == b'{"type":"pong"}'
    for frame in (hello, unrecovered, gap, p.Pong()):
        assert p.decode_frame(p.encode_frame(frame)) == frame


def test_decoding_tolerates_unknown_fields_and_codes_but_not_unknown_types() -> None:
    frame = p.decode_frame(b'{"type":"error","code":"from_the_future","message":"m","extra":{"a":1}}')
    assert isinstance(frame, p.ErrorFrame) and frame.code == "from_the_future" and frame.fatal
    hello = p.decode_frame(b'{"type":"hello","cursor":"1","recovered":true,"new_field":[1]}')
    assert hello == p.Hello("1", True)
    with pytest.raises(msgspec.ValidationError):
        p.decode_frame(b'{"type":"surprise"}')
    with pytest.raises(msgspec.ValidationError):
        p.decode_frame(b'{"type":"events","events":[{"run_id":"r"}],"cursor":"1"}')


def test_sse_messages() -> None:
    assert p.sse_message(b'{"type":"pong"}') == b'data: {"type":"pong"}\n\n'
    assert p.sse_message(b"{}", id="c1") == b"id: c1\ndata: {}\n\n"
    assert p.sse_message(b"{}", event="error") == b"event: error\ndata: {}\n\n"
    assert p.sse_close_frame(p.CloseCode.NORMAL, p.CloseReason.RUN_ENDED) is None
    assert p.sse_close_frame(p.CloseCode.GOING_AWAY, p.CloseReason.SHUTTING_DOWN) is None
    slow = p.sse_close_frame(p.CloseCode.SLOW_CONSUMER, p.CloseReason.SLOW_CONSUMER)
    assert slow is not None and slow.code == p.ErrorCode.SLOW_CONSUMER
    assert slow.message == "slow consumer: reconnect with Last-Event-ID to resume"
    other = p.sse_close_frame(p.CloseCode.BAD_MESSAGE, p.CloseReason.BAD_MESSAGE)
    assert other is not None and other.code == p.ErrorCode.CLOSED
