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
- Cluster mode (runsource.py): "the journal" above is the event stream (JetStream); `journal_missing`
  does not occur (every run is in the stream). A stream that does not answer while a client is
  served closes its WebSocket with 1013 (try again later: it resumes with its cursor, on this
  gateway or another of the cluster) and ends an SSE stream (it reconnects with Last-Event-ID).
- Client messages on a WebSocket: `{"type": "ping"}` is answered `{"type": "pong"}`; anything else is
  answered with an error frame `bad_message` and close 4400.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import msgspec
from aiohttp import WSMsgType, web

from shared.errors import ServiceUnavailable
from shared.ids import check_run_id
from shared.protocol import CLOSE_CODE, SSE_RETRY, CloseReason, ErrorCode, ErrorFrame, Hello, Pong
from shared.values import MAX_DEPTH, decode_json_object

from .cursor import MARGIN_S, CursorError, decode_cursor
from .hub import Hub
from .keys import CLIENTS, HUB, SETTINGS, STATS
from .live import ClientGone, StreamClient
from .params import int_param
from .transports import WS_CLOSE_MAX, WS_CLOSE_TIMEOUT, SseTransport, WsTransport

log = logging.getLogger(__name__)

UNKNOWN_RUN_WAIT = 3.0
MAX_CLIENT_MESSAGE = 4096  # a longer client message gets an error frame and 4400
# what aiohttp reads into memory at all: beyond it, aiohttp itself closes with 1009 (no error frame)
MAX_CLIENT_FRAME = 64 * 1024
MAX_SEQ = 2**53


def _holes_reason(hub: Hub, run_id: str, after: int) -> str | None:
    """Why a position cannot be served exactly because of holes already found in the run's journal."""
    holes = hub.known_gaps(run_id, after)
    if not holes:
        return None
    shown = ", ".join(f"{lo}..{hi}" for lo, hi in holes[:5]) + (" ..." if len(holes) > 5 else "")
    return (f"events {shown} of run {run_id} are missing from {hub.source.describe(run_id)}; "
            "a journal_gap error frame marks each hole and the stream goes on after it")


async def _journal_last_seq(hub: Hub, run_id: str) -> int:
    return await hub.source.last_seq(run_id)


# ---------------------------------------------------------------------------- one run


async def _serve_run(hub: Hub, client: StreamClient, run_id: str, after_seq: int) -> None:
    entry = None
    with anyio.move_on_after(UNKNOWN_RUN_WAIT):
        # noqa below: a run id not known yet may appear on disk (its journal written by another host's
        # scheduler, or before its first event reached us): looking again is the way to find it
        while (entry := await hub.ensure_run(run_id)) is None:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    if entry is None:
        where = hub.journal_dir if hub.source.local else "the event stream"
        await client.transport.send_frame(ErrorFrame(ErrorCode.UNKNOWN_RUN, f"no run {run_id} in {where}"))
        await client.transport.close(CloseReason.UNKNOWN_RUN)
        return
    missing = hub.journal_missing(run_id)
    if missing is not None:
        # the replay would find nothing and the live path nothing more for an ended run: say so, and close
        await client.transport.send_frame(ErrorFrame(ErrorCode.JOURNAL_MISSING, missing, run_id=run_id))
        await client.transport.close(CloseReason.JOURNAL_MISSING)
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
    await client.transport.send_frame(Hello(str(after_seq), reason is None, reason, run_id=run_id))
    await client.catch_up({run_id: after_seq})
    # the end of the run may wait in the queue (merged from the live buffer): then pump sends it and closes
    if client.close_request is None and not client.queue and (
        run_id in client.pos.done or (entry.ended and client.pos.sent[run_id] >= entry.frontier)
    ):
        await client.close(CloseReason.RUN_ENDED)
        return
    await client.pump()


# ---------------------------------------------------------------------------- all runs


async def _serve_all(hub: Hub, client: StreamClient, cursor_text: str | None) -> None:
    if not cursor_text:
        cursor = client.register_fresh()
        await client.transport.send_frame(Hello(cursor, True), cursor)
        await client.pump()
        return
    try:
        cur = decode_cursor(cursor_text, hub.tag)
    except CursorError as e:
        hub.stats.unrecovered_resumes += 1
        cursor = client.register_fresh()
        await client.transport.send_frame(Hello(cursor, False, f"{e}; streaming from now on"), cursor)
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
    await client.transport.send_frame(Hello(cursor, not reasons, reason), cursor)
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
                await client.transport.send_frame(Pong())
                continue
            what = f"not a JSON object nested at most {MAX_DEPTH} levels" if obj is None else f"unknown message {str(obj)[:100]}"
        else:
            what = f"unexpected {msg.type.name} frame"
        await client.transport.send_frame(
            ErrorFrame(ErrorCode.BAD_MESSAGE, f"{what}: only {{\"type\": \"ping\"}} is understood")
        )
        client.request_close(CloseReason.BAD_MESSAGE)
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
            except ServiceUnavailable as e:
                # cluster mode: the event stream does not answer; the client resumes with its cursor
                reason = CloseReason.EVENT_STREAM_UNAVAILABLE
                log.warning("%s client: %s; closing it with %d (%s)", kind, e, CLOSE_CODE[reason], reason)
                client.request_close(reason)
                with anyio.move_on_after(WS_CLOSE_TIMEOUT):
                    await ws.close(code=CLOSE_CODE[reason], message=str(reason).encode())
            tg.cancel_scope.cancel()
    finally:
        hub.unregister(client)
        app[CLIENTS].discard(client)
        stats.connections_open[kind] -= 1


def _client(request: web.Request, transport: WsTransport | SseTransport, only_run: str | None = None) -> StreamClient:
    app = request.app
    return StreamClient(app[HUB], app[SETTINGS].config.gateway, app[STATS], transport, only_run)


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
    client = _client(request, WsTransport(ws, "ws_run", request), only_run=run_id)
    await _run_ws(request, ws, client, lambda: _serve_run(request.app[HUB], client, run_id, after_seq))
    return ws


async def ws_all_events(request: web.Request) -> web.WebSocketResponse:
    cursor_text = request.query.get("cursor")
    ws = _websocket()
    await ws.prepare(request)
    client = _client(request, WsTransport(ws, "ws_all", request))
    await _run_ws(request, ws, client, lambda: _serve_all(request.app[HUB], client, cursor_text))
    return ws


async def sse_events(request: web.Request) -> web.StreamResponse:
    cursor_text = (
        request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or request.query.get("cursor")
    )
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    await resp.write(SSE_RETRY)
    app = request.app
    hub, stats = app[HUB], app[STATS]
    client = _client(request, SseTransport(resp))
    app[CLIENTS].add(client)
    stats.connections_total["sse"] += 1
    stats.connections_open["sse"] += 1
    try:
        await _serve_all(hub, client, cursor_text)
    except (ClientGone, ConnectionError):
        pass  # the client left or was closed as slow; the connection counters say so
    except ServiceUnavailable as e:
        # cluster mode: the event stream does not answer; the client reconnects with Last-Event-ID
        log.warning("sse client: %s; ending the stream", e)
    finally:
        hub.unregister(client)
        app[CLIENTS].discard(client)
        stats.connections_open["sse"] -= 1
    return resp


async def close_streams(app: web.Application) -> None:
    """on_shutdown: every open stream is told 1001 going away and given a moment to close."""
    open_clients = app[CLIENTS]
    clients = list(open_clients)
    for client in clients:
        client.request_close(CloseReason.SHUTTING_DOWN)
    with anyio.move_on_after(WS_CLOSE_TIMEOUT):
        while app[CLIENTS]:  # noqa: ASYNC110 - each stream's own task removes it as its close completes
            await anyio.sleep(0.05)
