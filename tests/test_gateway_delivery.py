"""The gateway's delivery pieces in-process, fast, no ZeroMQ: the merge of replay and live (pure, and
through a client whose replay meets live deliveries), the direct write to a caught-up client (a real
aiohttp WebSocket on loopback), batch coalescing, and cursor round-trips. The hub here is the real
Hub, not running: events enter through its sequencer, as the subscriber hands them over."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import anyio
import msgspec
import pytest
from aiohttp import web

from gateway_svc.batch import Batch, Notice, batch_of
from gateway_svc.cursor import MARGIN_S, decode_cursor
from gateway_svc.hub import Hub
from gateway_svc.live import FRAME_BYTES, LIVE, ClientMode, StreamClient
from gateway_svc.metrics import GatewayStats
from gateway_svc.replay import Position, merge
from gateway_svc.runindex import RunIndex
from gateway_svc.transports import WsTransport
from shared.config import Settings
from shared.events import Event, now_timestamp
from shared.journal import JournalWriter, begin_run
from shared.protocol import CloseReason, EventsFrame, Frame, Hello, decode_frame, encode_frame
from tests.test_gateway_helpers import make_settings

UTC = ZoneInfo("UTC")
TS = "2026-11-23T03:15:00.123456+00:00"


def ev(run_id: str, seq: int, event: str = "log", stage: str = "s", ts: str = TS) -> Event:
    if event in ("success", "failure", "cancelled", "queued"):
        stage = "pipeline"
    return Event(run_id, seq, ts, stage, event, f"{run_id} {seq}")  # type: ignore[arg-type]


def events_of(frames: list[bytes]) -> list[tuple[str, int]]:
    out = []
    for data in frames:
        frame = decode_frame(data)
        if isinstance(frame, EventsFrame):
            out.extend((e.run_id, e.seq) for e in frame.events)
    return out


class Recorder:
    """A transport that keeps what is sent (the client's logic under test, not a connection's);
    `on_send` runs at each events frame, as the peer reading it."""

    kind = "test"

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: CloseReason | None = None
        self.on_send: Any = None

    async def send_events(self, frame: bytes, cursor: str) -> None:
        self.frames.append(frame)
        if self.on_send is not None:
            await self.on_send()

    async def send_frame(self, frame: Frame, cursor: str | None = None) -> None:
        self.frames.append(encode_frame(frame))

    async def send_notice(self, frame: bytes) -> None:
        self.frames.append(frame)

    async def close(self, reason: CloseReason) -> None:
        self.closed = reason

    async def keepalive(self) -> None:
        return

    def write_now(self, frame: bytes) -> bool:
        return False


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)[0]


@pytest.fixture
def hub(settings: Settings) -> Hub:
    hub = Hub(settings, GatewayStats(), RunIndex(settings.journal_dir))
    hub.prepare()
    return hub


def client(hub: Hub, settings: Settings, only_run: str | None = None) -> tuple[StreamClient, Recorder]:
    rec = Recorder()
    return StreamClient(hub, settings.config.gateway, hub.stats, rec, only_run), rec


async def deliver(hub: Hub, *events: Event) -> None:
    """As the subscriber does: the sequencer takes them under its lock, then the fan-out offers them."""
    async with hub.sequencer.lock:
        for e in events:
            await hub.sequencer.accept(e)
        hub.fanout.settle()


# ---------------------------------------------------------------------------- the merge (pure)


def test_merge_joins_the_buffer_to_what_the_replay_sent() -> None:
    pos = Position()
    pos.sent = {"a": 2}
    one, two = batch_of([ev("a", 1), ev("a", 2), ev("a", 3)]), batch_of([ev("b", 1), ev("a", 4), ev("b", 2, "success")])
    one.cursor, two.cursor = "c1", "c2"
    piece, anomaly = merge([one, two], pos, lambda: pytest.fail("the batch's cursor is exact here"))
    assert not anomaly and piece is not None
    got = msgspec.json.decode(b"[" + piece.data + b"]", type=list[Event])
    assert [(e.run_id, e.seq) for e in got] == [("a", 3), ("b", 1), ("a", 4), ("b", 2)]  # 1, 2 were replayed
    assert piece.n == 4 and piece.cursor == "c2" and not piece.terminal  # all-runs: no one run ends it
    assert pos.sent == {"a": 4, "b": 2} and pos.done == {"b"}


def test_merge_stops_at_a_jump_and_says_so() -> None:
    pos = Position()
    pos.sent = {"a": 1}
    batch = batch_of([ev("a", 2), ev("a", 4), ev("a", 5)])
    batch.cursor = "would claim 4 and 5"
    piece, anomaly = merge([batch], pos, lambda: "client's own")
    assert anomaly and piece is not None and piece.n == 1
    assert piece.cursor == "client's own" and pos.sent == {"a": 2}  # the journal supplies the rest


def test_merge_for_one_run_takes_its_events_and_its_end() -> None:
    pos = Position("a")
    pos.sent = {"a": 1}
    batch = batch_of([ev("b", 1), ev("a", 2), ev("b", 2), ev("a", 3, "success")])
    piece, anomaly = merge([batch], pos, lambda: "unused")
    assert not anomaly and piece is not None
    assert piece.n == 2 and piece.cursor == "3" and piece.terminal and pos.done == {"a"}
    assert merge([], pos, lambda: "unused") == (None, False)


# ---------------------------------------------------------------------------- replay meets live


async def test_a_replay_that_meets_live_deliveries_sends_each_event_once_in_order(hub: Hub, settings: Settings) -> None:
    run_id = "run-merge"
    begin_run(settings.journal_dir, run_id, UTC, "sleepy", {}, {"trigger": "manual"})
    writer = JournalWriter.open(settings.journal_dir, run_id, UTC)
    try:
        journaled = [ev(run_id, 1, "queued")]
        for _ in range(30):
            journaled.append(writer.append("s", "log", "before"))
        await deliver(hub, *journaled)  # the hub has 1..31; the client wants all of it from 0
        c, rec = client(hub, settings, only_run=run_id)
        c.register_run(run_id, 0)

        async def live_meanwhile() -> None:
            # while the client sends its replay, the run goes on: journal first, then delivered live
            if len(rec.frames) in (1, 2):
                await deliver(hub, *[writer.append("s", "log", "during") for _ in range(5)])

        rec.on_send = live_meanwhile
        await c.catch_up({run_id: 0})
        assert c.mode is LIVE
        if c.queue:  # what the merge left goes out as one frame
            frame, *_ = c.coalesce()
            rec.frames.append(frame)
        assert events_of(rec.frames) == [(run_id, s) for s in range(1, 42)]
        # and the live path goes on from there
        await deliver(hub, writer.append("s", "log", "after"))
        assert len(c.queue) == 1 and isinstance(c.queue[0], Batch) and c.queue[0].events[0].seq == 42
    finally:
        writer.close()


# ---------------------------------------------------------------------------- coalescing


def live_client(hub: Hub, settings: Settings, only_run: str | None = None) -> StreamClient:
    c, _ = client(hub, settings, only_run)
    c.mode = ClientMode.LIVE
    return c


def test_queued_batches_coalesce_into_the_frame_their_events_make(hub: Hub, settings: Settings) -> None:
    c = live_client(hub, settings)
    batches = [batch_of([ev("a", 1), ev("b", 1)]), batch_of([ev("a", 2)]), batch_of([ev("b", 2), ev("a", 3, "success")])]
    for i, b in enumerate(batches):
        b.cursor = f"cursor-{i}"
        c.offer(b)
    assert len(c.queue) == 3 and c.q_events == 5
    frame, n, size, cursor, terminal = c.coalesce()
    expected = EventsFrame([e for b in batches for e in b.events], "cursor-2")
    assert frame == encode_frame(expected) and n == 5 and cursor == "cursor-2" and not terminal
    assert size == sum(b.nbytes for b in batches) and not c.queue


def test_one_runs_share_of_queued_batches_coalesces_with_its_cursor_and_end(hub: Hub, settings: Settings) -> None:
    c = live_client(hub, settings, only_run="a")
    batches = [batch_of([ev("a", 1), ev("b", 1)]), batch_of([ev("b", 2)]), batch_of([ev("a", 2, "success")])]
    for b in batches:
        c.offer(b)
    assert len(c.queue) == 2  # the batch without run a is not its business
    frame, n, _, cursor, terminal = c.coalesce()
    assert frame == encode_frame(EventsFrame([ev("a", 1), ev("a", 2, "success")], "2"))
    assert n == 2 and cursor == "2" and terminal


def test_coalescing_stops_at_a_notice_and_near_frame_bytes(hub: Hub, settings: Settings) -> None:
    c = live_client(hub, settings)
    c.offer(batch_of([ev("a", 1)]))
    c.notice(Notice("a", b'{"type":"error","code":"journal_gap"}'))
    c.offer(batch_of([ev("a", 3)]))
    assert events_of([c.coalesce()[0]]) == [("a", 1)] and isinstance(c.queue[0], Notice)
    c.queue.clear()
    c.max_bytes = c.max_events = 10**9
    big = "x" * 100_000
    for seq in range(1, 31):
        e = Event("a", seq, TS, "s", "log", big)
        c.offer(batch_of([e]))
    frame, n, size, _, _ = c.coalesce()
    assert FRAME_BYTES <= size < FRAME_BYTES + 200_000 and 0 < n < 30 and len(c.queue) == 30 - n
    assert events_of([frame]) == [("a", s) for s in range(1, n + 1)]


# ---------------------------------------------------------------------------- cursors


async def test_cursors_round_trip(hub: Hub, settings: Settings) -> None:
    now = now_timestamp(UTC)
    await deliver(hub, ev("a", 1, "queued", ts=now), ev("a", 2), ev("b", 1, "queued", ts=now), ev("b", 2, "success"),
                  ev("old", 1, "queued", ts="2020-01-01T00:00:00+00:00"), ev("old", 2, "success"))
    live = decode_cursor(hub.live_cursor(), hub.tag)
    assert live.p == {"a": 2} and live.d == ["b"]  # b ended, created within the margin: named; old implied
    pos = Position()
    pos.t = 2_000_000_000
    pos.sent = {"a": 7, "old": 3, "new": 5, "unknown": 1}
    pos.done = {"old", "new", "unknown"}
    created = {"old": (pos.t - MARGIN_S - 1) * 1_000_000, "new": (pos.t - 1) * 1_000_000}
    cur = decode_cursor(pos.cursor(hub.tag, created.get), hub.tag)
    # an ended run created before the watermark's margin is implied by the watermark; others are named
    assert cur.t == pos.t and cur.p == {"a": 7} and sorted(cur.d) == ["new", "unknown"]
    one = Position("a")
    one.sent = {"a": 12}
    assert one.cursor(hub.tag, created.get) == "12"


async def test_a_client_cursor_during_replay_resumes_where_it_stands(hub: Hub, settings: Settings) -> None:
    await deliver(hub, ev("a", 1, "queued"), ev("a", 2), ev("a", 3))
    c, _ = client(hub, settings)
    c.register_resume({"a": 1}, [])
    cur = decode_cursor(c.cursor(), hub.tag)
    assert cur.p == {"a": 1}
    await deliver(hub, ev("c", 1, "queued"))
    assert c.pos.behind(hub) == {"a": 1, "c": 0}  # c was learnt of after the client registered


# ---------------------------------------------------------------------------- the direct write


@pytest.fixture
async def ws_pair(hub: Hub, settings: Settings) -> AsyncIterator[tuple[StreamClient, aiohttp.ClientWebSocketResponse]]:
    """A real WebSocket on loopback: the server side a live all-runs client of `hub`, pumping."""
    ready: list[StreamClient] = []
    done = anyio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        c = StreamClient(hub, settings.config.gateway, hub.stats, WsTransport(ws, "ws_all", request))
        cursor = c.register_fresh()
        await c.transport.send_frame(Hello(cursor, True), cursor)
        ready.append(c)
        with anyio.move_on_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(c.pump)
                await done.wait()
                tg.cancel_scope.cancel()
        hub.unregister(c)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            assert isinstance(decode_frame((await ws.receive()).data), Hello)
            with anyio.fail_after(10):
                while not (ready and ready[0].parked):
                    await anyio.sleep(0.01)
            yield ready[0], ws
            done.set()
    finally:
        await runner.cleanup()


async def test_a_parked_live_client_gets_each_batch_written_directly(hub: Hub, ws_pair: Any) -> None:
    c, ws = ws_pair
    for seq in range(1, 6):
        await deliver(hub, ev("a", seq))
        assert c.parked and not c.queue  # written at the offer, the pump not woken
    assert hub.stats.frames_direct == 5
    got: list[bytes] = []
    with anyio.fail_after(10):
        while len(got) < 5:
            got.append((await ws.receive()).data.encode())
    assert events_of(got) == [("a", s) for s in range(1, 6)]
    frame = decode_frame(got[-1])
    assert isinstance(frame, EventsFrame) and decode_cursor(frame.cursor, hub.tag).p == {"a": 5}


async def test_a_direct_write_waits_behind_what_is_queued(hub: Hub, ws_pair: Any) -> None:
    c, ws = ws_pair
    await deliver(hub, ev("a", 1))
    c.notice(Notice("a", encode_frame(EventsFrame([], "notice"))))  # queued: the pump must send it first
    await deliver(hub, ev("a", 2))
    assert hub.stats.frames_direct == 1 and not c.parked  # the second batch went to the queue
    kinds = []
    with anyio.fail_after(10):
        while len(kinds) < 3:
            frame = decode_frame((await ws.receive()).data)
            assert isinstance(frame, EventsFrame)
            kinds.append(frame.cursor if not frame.events else frame.events[0].seq)
    assert kinds == [1, "notice", 2]
