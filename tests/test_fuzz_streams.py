"""Fuzzing the gateway's streams against the real trio: WebSocket positions (after_seq, cursors), client
frames (garbage, depth bombs, non-objects, oversized, binary), and SSE resume positions. A bad position
gets a 400 JSON answer or a hello with recovered false; a bad client frame gets an error frame and a
close in 4000-4999; nothing gets a 500 or an abrupt close; and every service keeps serving."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import pytest
from hypothesis import example, given, strategies as st

from gateway_svc.cursor import journal_dir_tag
from shared.ids import is_valid_run_id
from shared.journal import JournalReader, journal_path
from tests.fuzzing import (
    NUMBERISH,
    REQUEST_TIMEOUT,
    Trio,
    assert_json_error,
    assert_serving,
    fuzz,
    hostile_text,
    http_request,
    int_verdict,
    json_bomb,
    json_values,
    launch_and_finish,
    trio,  # noqa: F401  (the module's fixture)
    wait_run_ended,
)

MAX_CLIENT_MESSAGE = 4096  # README: a longer client message gets an error frame and 4400
AIOHTTP_LIMIT = 64 * 1024  # beyond it the gateway's aiohttp may close 1009 by itself


@pytest.fixture(scope="module")
def ended_run(trio: Trio) -> str:  # noqa: F811
    return launch_and_finish(trio)


@pytest.fixture(autouse=True)
def still_serving(trio: Trio) -> Iterator[None]:  # noqa: F811
    yield
    assert_serving(trio)


async def _ws_session(url: str, send: list[tuple[str, Any]] | None = None, frames_wanted: int = 1,
                      timeout: float = REQUEST_TIMEOUT) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Connect, read `frames_wanted` frames, send `send` (("text"|"bytes", data)), then read to the close.
    Returns (frames, close code or None when we left first, handshake error 'status body' or None)."""
    frames: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        try:
            async with asyncio.timeout(timeout):
                async with http.ws_connect(url, max_msg_size=64 * 1024 * 1024, autoping=True) as ws:
                    while len(frames) < frames_wanted:
                        msg = await ws.receive()
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            return frames, ws.close_code, None
                        frames.append(json.loads(msg.data))
                    for kind, data in send or []:
                        if kind == "text":
                            await ws.send_str(data)
                        else:
                            await ws.send_bytes(data)
                    if send is None:
                        return frames, None, None
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            frames.append(json.loads(msg.data))
                    return frames, ws.close_code, None
        except aiohttp.WSServerHandshakeError as e:
            return frames, None, f"{e.status} {e.headers.get('Content-Type') if e.headers else None}"


def ws(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- positions


@fuzz(150)
@given(raw=st.one_of(NUMBERISH, hostile_text))
@example(raw="١١")
@example(raw="²")
@example(raw="--1")
@example(raw=str(2**64))
def test_ws_run_after_seq_is_ascii_digits_or_refused(trio: Trio, ended_run: str, raw: str) -> None:  # noqa: F811
    url = f"{trio.ws}/ws/events/{ended_run}?after_seq={quote(raw, safe='')}"
    frames, code, refused = ws(_ws_session(url, frames_wanted=1))
    verdict = int_verdict(raw, 0, 2**53)
    if verdict or (verdict is None and refused is None):
        assert refused is None and frames and frames[0]["type"] == "hello", (raw, frames, code, refused)
        last = len(JournalReader(journal_path(trio.journal_dir, ended_run), ended_run).read())
        assert frames[0]["recovered"] is (int(raw or 0) <= last), (raw, last, frames[0])
        return
    # refused before the upgrade: the API's 400 JSON error
    assert refused is not None and refused.startswith("400 application/json"), (raw, frames, code, refused)


def _cursor(trio: Trio, p: dict[str, Any], d: list[Any], v: int = 1, t: int = 0, tag: bytes | None = None) -> str:  # noqa: F811
    raw = msgspec.msgpack.encode({"v": v, "j": tag if tag is not None else journal_dir_tag(trio.journal_dir),
                                  "t": t, "p": p, "d": d})
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


forged_cursors = st.builds(
    lambda p, d, v, t: (p, d, v, t),
    st.dictionaries(st.one_of(hostile_text, st.just("{run}")), st.one_of(st.integers(-2**63, 2**64 - 1), st.just(2**53 + 1)), max_size=3),
    st.lists(st.one_of(hostile_text, st.just("{run}")), max_size=3),
    st.sampled_from([1, 1, 0, 2, -1]),
    st.integers(-2**63, 2**63 - 1),
)


@fuzz(150)
@given(cursor=st.one_of(hostile_text, st.binary(max_size=80).map(lambda b: base64.urlsafe_b64encode(b).decode()),
                        forged_cursors))
@example(cursor="x" * 300_000)
@example(cursor=({"{run}": 10**9}, [], 1, 2**40))
def test_ws_all_cursors_get_a_hello(trio: Trio, ended_run: str, cursor: Any) -> None:  # noqa: F811
    """Any cursor text: a hello (recovered false with a reason when it cannot be served), or a 4xx JSON
    answer for a URL too long to take; never a 500 or an abrupt close."""
    forged: Any = None
    servable = cursor == ""
    if isinstance(cursor, tuple):
        p, d, v, t = cursor
        p = {ended_run if k == "{run}" else k: seq for k, seq in p.items()}
        d = [ended_run if r == "{run}" else r for r in d]
        forged = (p, d, v, t)
        last = len(JournalReader(journal_path(trio.journal_dir, ended_run), ended_run).read())
        # a well-formed cursor of this directory at a position the journal has is served exactly
        servable = v == 1 and all(k == ended_run and 0 <= seq <= last for k, seq in p.items()) and all(map(is_valid_run_id, d))
        cursor = _cursor(trio, p, d, v, t)
    url = f"{trio.ws}/ws/events?cursor={quote(cursor, safe='')}"
    frames, code, refused = ws(_ws_session(url, frames_wanted=1))
    if refused is not None:
        assert refused.split()[0] in ("400", "414", "431") and "application/json" in refused, (cursor[:100], refused)
        return
    assert frames and frames[0]["type"] == "hello", (cursor[:100], frames, code)
    hello = frames[0]
    assert isinstance(hello["cursor"], str) and hello["cursor"]
    if hello["recovered"] is False:
        assert isinstance(hello.get("reason"), str) and hello["reason"], hello
    else:
        assert servable, f"cursor {cursor[:100]!r} ({forged}) was taken as recovered: {hello}"


# ---------------------------------------------------------------------------- client frames


client_frames = st.one_of(
    st.text(max_size=200).map(lambda s: ("text", s)),
    json_values.map(lambda v: ("text", json.dumps(v))),
    st.dictionaries(st.sampled_from(["type", "cursor", "x"]), st.one_of(st.sampled_from(["ping ", "PING", "pong", "hello"]), json_values),
                    min_size=1, max_size=2).filter(lambda d: d.get("type") != "ping").map(lambda d: ("text", json.dumps(d))),
    st.binary(max_size=200).map(lambda b: ("bytes", b)),
    st.integers(MAX_CLIENT_MESSAGE + 1, 3 * MAX_CLIENT_MESSAGE).map(lambda n: ("text", json.dumps({"type": "ping", "pad": "x" * n}))),
)


@fuzz(150)
@given(frame=client_frames)
@example(frame=("text", json_bomb(5000).decode()))
@example(frame=("text", json_bomb(5000, "dict").decode()))
@example(frame=("text", '{"type": "ping", "x": ' + json_bomb(3000).decode() + "}"))
@example(frame=("text", "[]"))
@example(frame=("text", '"ping"'))
@example(frame=("text", "x" * (MAX_CLIENT_MESSAGE + 1)))
@example(frame=("text", json.dumps({"type": "ping", "pad": "x" * 10_000})))
@example(frame=("bytes", b"\x00" * 10))
def test_ws_client_frames_not_understood_get_an_error_frame_and_4400(trio: Trio, frame: tuple[str, Any]) -> None:  # noqa: F811
    frames, code, refused = ws(_ws_session(f"{trio.ws}/ws/events", send=[frame], frames_wanted=1))
    assert refused is None, refused
    assert frames[0]["type"] == "hello", frames
    errors = [f for f in frames[1:] if f.get("type") == "error"]
    assert errors and errors[0]["code"] and errors[0]["message"], (frame[1][:100], frames, code)
    assert code is not None and 4000 <= code <= 4999, (frame[1][:100], code, frames)


@fuzz(5)
@given(size=st.integers(AIOHTTP_LIMIT + 1, 4 * AIOHTTP_LIMIT), kind=st.sampled_from(["text", "bytes"]))
@example(size=AIOHTTP_LIMIT + 1, kind="text")
def test_ws_frames_over_64k_close_with_4xxx_or_1009(trio: Trio, size: int, kind: str) -> None:  # noqa: F811
    data: Any = "x" * size if kind == "text" else b"x" * size
    frames, code, refused = ws(_ws_session(f"{trio.ws}/ws/events", send=[(kind, data)], frames_wanted=1))
    assert refused is None and frames[0]["type"] == "hello", (refused, frames)
    assert code == 1009 or (code is not None and 4000 <= code <= 4999 and any(f["type"] == "error" for f in frames)), (code, frames)


def test_ws_ping_gets_pong_between_hostile_frames(trio: Trio) -> None:  # noqa: F811
    pings = [("text", '{"type": "ping"}')] * 3
    frames, code, refused = ws(_ws_session(f"{trio.ws}/ws/events", send=[*pings, ("text", "nonsense")], frames_wanted=1))
    assert refused is None
    assert [f["type"] for f in frames[:4]] == ["hello", "pong", "pong", "pong"], frames
    assert frames[4]["type"] == "error" and code == 4400, (frames, code)


@pytest.fixture(scope="module")
def live_run(trio: Trio) -> Iterator[str]:  # noqa: F811
    """A run that goes on for the module's tests; cancelled (and checked to end so) afterwards."""
    status, _, body = http_request(trio.ports.http, "POST", "/api/runs", headers={"Content-Type": "application/json"},
                                   body=json.dumps({"pipeline": "sleepy", "params": {"seconds": 300}}).encode())
    assert status == 202, body
    run_id = json.loads(body)["run_id"]
    yield run_id
    status, _, body = http_request(trio.ports.http, "POST", f"/api/runs/{run_id}/cancel")
    assert status == 202, body
    wait_run_ended(trio, run_id, expect="cancelled")


@fuzz(60)
@given(frame=client_frames)
def test_ws_run_stream_answers_bad_client_frames_too(trio: Trio, live_run: str, frame: tuple[str, Any]) -> None:  # noqa: F811
    """On a run's stream (a run still going), the same error frame and 4400."""
    frames, code, refused = ws(_ws_session(f"{trio.ws}/ws/events/{live_run}", send=[frame], frames_wanted=1))
    assert refused is None, refused
    assert frames[0]["type"] == "hello", frames
    errors = [f for f in frames if f.get("type") == "error"]
    assert errors and errors[0]["code"] == "bad_message", (frame[1][:100], frames, code)
    assert code is not None and 4000 <= code <= 4999, (frame[1][:100], code, frames)


# ---------------------------------------------------------------------------- SSE


async def _sse_hello(url: str, headers: dict[str, str]) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as http, asyncio.timeout(REQUEST_TIMEOUT):
        async with http.get(url, headers=headers) as resp:
            ctype = resp.headers.get("Content-Type", "")
            if resp.status != 200:
                return resp.status, ctype, await resp.read()
            while True:
                line = await resp.content.readline()
                assert line, "SSE stream ended before the hello"
                if line.startswith(b"data: "):
                    return resp.status, ctype, json.loads(line[6:])


latin1_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=200)


@fuzz(150)
@given(where=st.sampled_from(["header", "query", "cursor"]), value=st.one_of(NUMBERISH, hostile_text, latin1_text))
@example(where="header", value="--1")
@example(where="query", value="١١")
@example(where="header", value="x" * 60_000)
def test_sse_resume_positions_get_a_hello_or_a_json_400(trio: Trio, where: str, value: str) -> None:  # noqa: F811
    headers: dict[str, str] = {}
    url = f"{trio.base}/api/events"
    if where == "header":
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            value = quote(value)
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            value = quote(value)  # aiohttp's client refuses control characters in a header
        headers["Last-Event-ID"] = value
    else:
        url += f"?{'last_event_id' if where == 'query' else 'cursor'}={quote(value, safe='')}"
    status, ctype, hello = asyncio.run(_sse_hello(url, headers))
    if status != 200:
        assert 400 <= status < 500 and ctype.startswith("application/json"), (value[:80], status, ctype, hello[:300])
        assert_json_error(status, {"content-type": ctype}, hello, value[:80])
        return
    assert ctype.startswith("text/event-stream"), ctype
    assert hello["type"] == "hello", hello
    if value.strip():
        assert hello["recovered"] is False and hello["reason"], (value[:80], hello)
