"""The streaming routes: `/ws/events/{run_id}`, `/ws/events` and `GET /api/events` (SSE).

- `/ws/events/{run_id}?after_seq=N`: hello (cursor = N as text), the run's events after N from the
  journal, then live; closed with 1000 after the terminal event. A run whose journal does not exist
  is waited for up to UNKNOWN_RUN_WAIT seconds (a client may connect a moment before the run is
  queued); then an error frame `unknown_run` and close 4004. A run the hub knows (from PUB events or
  heartbeats) whose journal is not in the gateway's directory (a journal directory mismatch) cannot
  be replayed: error frame `journal_missing` naming the file and the mismatch, close 4004. An
  `after_seq` beyond the run's last
  journaled seq cannot be served exactly: hello says recovered=false and the stream continues after
  the last journaled seq.
- `/ws/events[?cursor=C]` and SSE `GET /api/events` (cursor from `Last-Event-ID`, `?last_event_id=` or
  `?cursor=`): all runs; see cursor.py for what a cursor means. An unusable cursor gives hello
  recovered=false with the reason, then events from now on. A run named by the cursor whose journal
  is gone is reported the same way (the other runs are still served from their positions).
- `journal_gap` is the one error frame that does not end the stream: `{"type": "error", "code":
  "journal_gap", "message": "events N..M of run R are missing from the journal <path> (...)",
  "run_id": R, "missing": [N, M]}` comes where seqs N..M would have been (a corrupt journal line the
  reader skipped, or a journal that lacks what the live path delivered), and the events after the
  hole follow; the cursors after it are past the hole, so resuming does not meet it again (closing
  instead would make a client resume into the same hole forever). On SSE it is an `event: error`
  message with the same data. When the gateway already knows of a hole after the requested position
  (found by an earlier read), the hello says recovered=false with the reason too. Every other error
  frame is followed by a close.
- Client messages on a WebSocket: `{"type": "ping"}` is answered `{"type": "pong"}`; anything else is
  answered with an error frame `bad_message` and close 4400.
"""

from __future__ import annotations

import fcntl
import logging
import struct
import termios
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from aiohttp import WSMsgType, web

from shared.ids import check_run_id
from shared.journal import JournalReader, journal_path
from shared.values import MAX_DEPTH, decode_json_object

from .clients import CLOSE_GOING_AWAY, ClientGone, StreamClient
from .cursor import MARGIN_S, CursorError, decode_cursor
from .hub import Hub
from .keys import CLIENTS, HUB, STATS
from .params import int_param

log = logging.getLogger(__name__)

UNKNOWN_RUN_WAIT = 3.0
MAX_CLIENT_MESSAGE = 4096  # a longer client message gets an error frame and 4400
# what aiohttp reads into memory at all: beyond it, aiohttp itself closes with 1009 (no error frame)
MAX_CLIENT_FRAME = 64 * 1024
MAX_SEQ = 2**53
CLOSE_UNKNOWN_RUN = 4004
CLOSE_BAD_MESSAGE = 4400
WS_CLOSE_TIMEOUT = 5.0  # no byte taken for this long: the peer is not reading
WS_CLOSE_MAX = 60.0  # a close frame waits at most this long behind what a slow reader still has to read

_json = msgspec.json.Encoder()


def text_frame(payload: bytes) -> bytes:
    """A whole unmasked, uncompressed WebSocket text frame (RFC 6455 5.2), as a server sends it: what
    aiohttp's writer puts on the wire for send_frame(payload, TEXT), for the hub's direct writes."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class WsTransport:
    def __init__(self, ws: web.WebSocketResponse, kind: str, request: web.Request) -> None:
        self.ws = ws
        self.kind = kind
        self.tcp = request.transport  # the upgraded connection (uncompressed: see _websocket())
        # the task reading the peer's messages (_read_client): stopped before a close, since aiohttp
        # drops the connection right after the close frame when a receive is pending, cutting off what
        # the peer has yet to read (the close frame included: it would see 1006)
        self.reader: anyio.CancelScope | None = None
        self.reader_done = anyio.Event()

    def write_now(self, frame: bytes) -> bool:
        tcp = self.tcp
        if tcp is None or tcp.is_closing() or self.ws.closed or tcp.get_write_buffer_size():
            return False
        tcp.write(text_frame(frame))
        return True

    async def send_events(self, frame: bytes, cursor: str) -> None:
        await self.ws.send_frame(frame, WSMsgType.TEXT)

    async def send_json(self, obj: dict[str, Any], cursor: str | None = None) -> None:
        await self.ws.send_frame(_json.encode(obj), WSMsgType.TEXT)

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame behind what is already buffered for the peer. A peer that reads slowly
        gets it (4008 included) as long as it keeps taking bytes, up to WS_CLOSE_MAX; one that reads
        nothing for WS_CLOSE_TIMEOUT cannot take it and is dropped (it sees 1006)."""
        if self.reader is not None:
            self.reader.cancel()
            await self.reader_done.wait()
        with anyio.move_on_after(WS_CLOSE_MAX):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drop_when_stalled, tg.cancel_scope)
                await self.ws.close(code=code, message=reason.encode())
                tg.cancel_scope.cancel()

    async def _drop_when_stalled(self, scope: anyio.CancelScope) -> None:
        left, since = self._unsent(), anyio.current_time()
        while anyio.current_time() - since < WS_CLOSE_TIMEOUT:
            await anyio.sleep(0.25)
            now_left = self._unsent()
            # the peer took bytes, or has all of them (the close frame too) in its own buffer: it is
            # reading or about to; wait on, up to WS_CLOSE_MAX, for its close reply
            if now_left < left or now_left == 0:
                since = anyio.current_time()
            left = now_left
        scope.cancel()

    def _unsent(self) -> int:
        """Bytes not yet taken by the peer: asyncio's buffer plus the kernel's send queue."""
        tcp = self.tcp
        if tcp is None or tcp.is_closing():
            return 0
        queued = tcp.get_write_buffer_size()
        sock = tcp.get_extra_info("socket")
        if sock is not None:
            try:
                queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass  # no send-queue size here (not Linux, socket gone): asyncio's buffer alone says it
        return queued

    async def keepalive(self) -> None:
        return  # aiohttp's heartbeat pings the peer

    async def send_notice(self, frame: bytes) -> None:
        await self.ws.send_frame(frame, WSMsgType.TEXT)


class SseTransport:
    kind = "sse"

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp

    async def send_events(self, frame: bytes, cursor: str) -> None:
        await self.resp.write(b"id: " + cursor.encode() + b"\ndata: " + frame + b"\n\n")

    async def send_json(self, obj: dict[str, Any], cursor: str | None = None) -> None:
        head = b"id: " + cursor.encode() + b"\n" if cursor else b""
        await self.resp.write(head + b"data: " + _json.encode(obj) + b"\n\n")

    async def close(self, code: int, reason: str) -> None:
        if code >= 4000:
            code_name = "slow_consumer" if code == 4008 else "closed"
            frame = {"type": "error", "code": code_name, "message": f"{reason}: reconnect with Last-Event-ID to resume"}
            try:
                await self.resp.write(b"event: error\ndata: " + _json.encode(frame) + b"\n\n")
            except ConnectionError:
                return
        try:
            await self.resp.write_eof()
        except ConnectionError:
            return

    async def keepalive(self) -> None:
        await self.resp.write(b": keepalive\n\n")

    def write_now(self, frame: bytes) -> bool:
        return False  # the response is chunk-encoded by aiohttp: its writer frames every write

    async def send_notice(self, frame: bytes) -> None:
        await self.resp.write(b"event: error\ndata: " + frame + b"\n\n")


def _holes_reason(hub: Hub, run_id: str, after: int) -> str | None:
    """Why a position cannot be served exactly because of holes already found in the run's journal."""
    holes = hub.known_gaps(run_id, after)
    if not holes:
        return None
    shown = ", ".join(f"{lo}..{hi}" for lo, hi in holes[:5]) + (" ..." if len(holes) > 5 else "")
    return (f"events {shown} of run {run_id} are missing from the journal {journal_path(hub.journal_dir, run_id)}; "
            "a journal_gap error frame marks each hole and the stream goes on after it")


def _hello(cursor: str, recovered: bool, reason: str | None, **extra: Any) -> dict[str, Any]:
    hello: dict[str, Any] = {"type": "hello", "cursor": cursor, "recovered": recovered}
    if not recovered:
        hello["reason"] = reason
    hello.update(extra)
    return hello


async def _journal_last_seq(hub: Hub, run_id: str) -> int:
    reader = JournalReader(journal_path(hub.journal_dir, run_id), run_id)
    last = await anyio.to_thread.run_sync(reader.last_event)
    return last.seq if last is not None else 0


# ---------------------------------------------------------------------------- one run


async def _serve_run(client: StreamClient, run_id: str, after_seq: int) -> None:
    hub = client.hub
    entry = None
    with anyio.move_on_after(UNKNOWN_RUN_WAIT):
        while (entry := await hub.ensure_run(run_id)) is None:
            await anyio.sleep(0.1)
    if entry is None:
        await client.transport.send_json(
            {"type": "error", "code": "unknown_run", "message": f"no run {run_id} in {hub.journal_dir}"}
        )
        await client.transport.close(CLOSE_UNKNOWN_RUN, "unknown run")
        return
    missing = hub.journal_missing(run_id)
    if missing is not None:
        # the replay would find nothing and the live path nothing more for an ended run: say so, and close
        await client.transport.send_json({"type": "error", "code": "journal_missing", "message": missing, "run_id": run_id})
        await client.transport.close(CLOSE_UNKNOWN_RUN, "journal missing")
        return
    reason = None
    if after_seq > entry.frontier:
        last = await _journal_last_seq(hub, run_id)
        if after_seq > last:
            reason = f"after_seq {after_seq} is beyond the run's last journaled seq {last}; continuing after {last}"
            hub.stats.unrecovered_resumes += 1
            after_seq = last
    if reason is None:
        reason = _holes_reason(hub, run_id, after_seq)
        if reason is not None:
            hub.stats.unrecovered_resumes += 1
    client.register_run(run_id, after_seq)
    await client.transport.send_json(_hello(str(after_seq), reason is None, reason, run_id=run_id))
    await client.catch_up({run_id: after_seq})
    # the end of the run may wait in the queue (merged from the live buffer): then pump sends it and closes
    if client.close_request is None and not client.queue and (
        run_id in client.done or (entry.ended and client.sent[run_id] >= entry.frontier)
    ):
        await client.close(1000, "run ended")
        return
    await client.pump()


# ---------------------------------------------------------------------------- all runs


async def _serve_all(client: StreamClient, cursor_text: str | None) -> None:
    hub = client.hub
    if not cursor_text:
        cursor = client.register_fresh()
        await client.transport.send_json(_hello(cursor, True, None), cursor)
        await client.pump()
        return
    try:
        cur = decode_cursor(cursor_text, hub.tag)
    except CursorError as e:
        hub.stats.unrecovered_resumes += 1
        cursor = client.register_fresh()
        await client.transport.send_json(_hello(cursor, False, f"{e}; streaming from now on"), cursor)
        await client.pump()
        return
    reasons: list[str] = []
    positions: dict[str, int] = {}
    for run_id, seq in cur.p.items():
        entry = await hub.ensure_run(run_id)
        if entry is None:
            reasons.append(f"the journal of run {run_id} is gone")
            continue
        missing = hub.journal_missing(run_id)
        if missing is not None:
            reasons.append(missing)
            continue
        if seq > entry.frontier:
            last = await _journal_last_seq(hub, run_id)
            if seq > last:
                reasons.append(f"run {run_id}: cursor at seq {seq} but its journal ends at {last}")
                seq = last
        positions[run_id] = seq
    done = set(cur.d)
    threshold = (cur.t - MARGIN_S) * 1_000_000
    for run_id in hub.index.created_after(threshold):
        if run_id not in positions and run_id not in cur.p and run_id not in done:
            positions[run_id] = 0  # created after the cursor's watermark: the client has none of it
    for run_id, seq in positions.items():
        holes = _holes_reason(hub, run_id, seq)
        if holes is not None:
            reasons.append(holes)
    plan = client.register_resume(positions, sorted(done))
    if reasons:
        hub.stats.unrecovered_resumes += 1
    cursor = client.cursor()
    reason = "; ".join(reasons)[:2000] if reasons else None
    await client.transport.send_json(_hello(cursor, not reasons, reason), cursor)
    await client.catch_up(plan)
    await client.pump()


# ---------------------------------------------------------------------------- handlers


async def _read_client(ws: web.WebSocketResponse, client: StreamClient, scope: anyio.CancelScope) -> None:
    transport = client.transport
    assert isinstance(transport, WsTransport)
    try:
        with anyio.CancelScope() as transport.reader:
            await _read_messages(ws, client)
    finally:
        transport.reader_done.set()
    if client.close_request is None:
        scope.cancel()  # the peer went away: stop serving it


async def _read_messages(ws: web.WebSocketResponse, client: StreamClient) -> None:
    async for msg in ws:
        if msg.type is WSMsgType.TEXT and len(msg.data) > MAX_CLIENT_MESSAGE:
            what = f"a message of {len(msg.data)} characters (at most {MAX_CLIENT_MESSAGE})"
        elif msg.type is WSMsgType.TEXT:
            try:
                obj = decode_json_object(msg.data)
            except msgspec.DecodeError:  # not JSON, not an object, or a depth bomb
                obj = None
            if isinstance(obj, dict) and obj.get("type") == "ping":
                await client.transport.send_json({"type": "pong"})
                continue
            what = f"not a JSON object nested at most {MAX_DEPTH} levels" if obj is None else f"unknown message {str(obj)[:100]}"
        else:
            what = f"unexpected {msg.type.name} frame"
        await client.transport.send_json(
            {"type": "error", "code": "bad_message", "message": f"{what}: only {{\"type\": \"ping\"}} is understood"}
        )
        client.request_close(CLOSE_BAD_MESSAGE, "bad message")
        return


async def _run_ws(request: web.Request, ws: web.WebSocketResponse, client: StreamClient, serve: Callable[[], Awaitable[None]]) -> None:
    app = request.app
    hub, stats = app[HUB], app[STATS]
    app[CLIENTS].add(client)
    kind = client.transport.kind
    stats.connections_total[kind] += 1
    stats.connections_open[kind] += 1
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_client, ws, client, tg.cancel_scope)
            try:
                await serve()
            except ClientGone:
                pass  # the client left or was closed (4008); the connection counters say so
            tg.cancel_scope.cancel()
    finally:
        hub.unregister(client)
        app[CLIENTS].discard(client)
        stats.connections_open[kind] -= 1


def _websocket() -> web.WebSocketResponse:
    return web.WebSocketResponse(
        # timeout: how long close() waits for the peer's close reply; WsTransport.close ends it sooner when
        # the peer stops reading
        compress=False, max_msg_size=MAX_CLIENT_FRAME, heartbeat=30.0, timeout=WS_CLOSE_MAX
    )


async def ws_run_events(request: web.Request) -> web.WebSocketResponse:
    run_id = check_run_id(request.match_info["run_id"])
    after_seq = int_param(request, "after_seq", default=0, lo=0, hi=MAX_SEQ, alias="cursor")
    ws = _websocket()
    await ws.prepare(request)
    client = StreamClient(request.app[HUB], WsTransport(ws, "ws_run", request), only_run=run_id)
    await _run_ws(request, ws, client, lambda: _serve_run(client, run_id, after_seq))
    return ws


async def ws_all_events(request: web.Request) -> web.WebSocketResponse:
    cursor_text = request.query.get("cursor")
    ws = _websocket()
    await ws.prepare(request)
    client = StreamClient(request.app[HUB], WsTransport(ws, "ws_all", request))
    await _run_ws(request, ws, client, lambda: _serve_all(client, cursor_text))
    return ws


async def sse_events(request: web.Request) -> web.StreamResponse:
    cursor_text = (
        request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or request.query.get("cursor")
    )
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    await resp.write(b"retry: 1000\n\n")
    app = request.app
    hub, stats = app[HUB], app[STATS]
    client = StreamClient(hub, SseTransport(resp))
    app[CLIENTS].add(client)
    stats.connections_total["sse"] += 1
    stats.connections_open["sse"] += 1
    try:
        await _serve_all(client, cursor_text)
    except (ClientGone, ConnectionError):
        pass  # the client left or was closed as slow; the connection counters say so
    finally:
        hub.unregister(client)
        app[CLIENTS].discard(client)
        stats.connections_open["sse"] -= 1
    return resp


async def close_streams(app: web.Application) -> None:
    """on_shutdown: every open stream is told 1001 going away and given a moment to close."""
    clients = list(app[CLIENTS])
    for client in clients:
        client.request_close(CLOSE_GOING_AWAY, "gateway shutting down")
    with anyio.move_on_after(WS_CLOSE_TIMEOUT):
        while app[CLIENTS]:
            await anyio.sleep(0.05)
