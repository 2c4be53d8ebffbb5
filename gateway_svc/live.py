"""One streaming client (WebSocket or SSE): its replay (replay.py) joined to live delivery through a
bounded queue, sent by the client's own pump, coalesced into frames.

In live mode a full queue or a send that takes longer than `gateway.send_timeout` closes the client
with 4008 `slow consumer`; the hub never waits for a client. Live sends are timed (and idle clients
kept alive) by the fan-out's watchdog, not by a timer per send. While a live client's pump is parked
(nothing queued, nothing being sent) the fan-out's offer writes the batch's frame straight to the
connection if the connection takes it at once (`_write_now`); anything queued goes first, so order
holds whichever way a frame leaves.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import Protocol

import anyio

from shared.config import GatewayConfig
from shared.protocol import CloseReason, Frame, events_frame

from .batch import Batch, Notice
from .hubview import HubView
from .metrics import GatewayStats
from .replay import Piece, Position, Replay

log = logging.getLogger(__name__)

FRAME_BYTES = 1 << 20  # frames are cut near this size (aiohttp clients refuse frames over 4 MiB)
KEEPALIVE = 15.0


class ClientMode(enum.Enum):
    REPLAY = "replay"  # catching up from the journal; live batches wait in the replay's buffer
    LIVE = "live"  # the hub's batches go to the queue (or straight to the connection)
    CLOSING = "closing"  # a close was asked for or is under way; nothing more is queued


REPLAY, LIVE, CLOSING = ClientMode.REPLAY, ClientMode.LIVE, ClientMode.CLOSING


class ClientGone(Exception):
    """The peer went away while we were sending."""


class Transport(Protocol):
    kind: str

    async def send_events(self, frame: bytes, cursor: str) -> None:
        """An `events` frame (already encoded), whose cursor is `cursor`."""

    async def send_frame(self, frame: Frame, cursor: str | None = None) -> None:
        """Any other frame (hello, pong, a fatal error)."""

    async def send_notice(self, frame: bytes) -> None:
        """An encoded error frame after which the stream goes on (journal_gap)."""

    async def close(self, reason: CloseReason) -> None: ...

    async def keepalive(self) -> None: ...

    def write_now(self, frame: bytes) -> bool:
        """Write an `events` frame without waiting, if the connection takes it at once (nothing of
        ours is still buffered); False: send it the awaited way."""


class StreamClient:
    # one per connection, thousands of them idle: no per-instance dict
    __slots__ = ("_pump_scope", "close_request", "hub", "keepalive_due", "last_send", "max_bytes", "max_events",
                 "mode", "only_run", "parked", "pos", "q_bytes", "q_events", "queue", "replay", "send_started",
                 "send_timeout", "stats", "transport", "wake")

    def __init__(self, hub: HubView, cfg: GatewayConfig, stats: GatewayStats, transport: Transport,
                 only_run: str | None = None) -> None:
        self.hub = hub
        self.stats = stats
        self.transport = transport
        self.only_run = only_run
        self.max_events = cfg.client_queue_events
        self.max_bytes = cfg.client_queue_bytes
        self.send_timeout = cfg.send_timeout
        self.mode = REPLAY
        self.pos = Position(only_run)
        self.replay: Replay | None = None  # made for a resume (a fresh all-runs client never replays)
        self.queue: deque[Batch | Piece | Notice] = deque()  # live mode: waiting to be sent
        self.q_events = 0
        self.q_bytes = 0
        self.wake = asyncio.Event()
        self.close_request: CloseReason | None = None
        self.last_send = time.monotonic()
        self.send_started = 0.0  # monotonic start of the live send in progress (0: none)
        self.keepalive_due = False
        self.parked = False  # the pump waits with nothing queued: an offer may write a batch's frame directly
        self._pump_scope: anyio.CancelScope | None = None

    # ------------------------------------------------------------------ the fan-out's side (never blocks)

    def offer(self, batch: Batch) -> None:
        if self.only_run is None:
            n, nbytes = len(batch.events), batch.nbytes
        else:
            n, nbytes = batch.run_size(self.only_run)
            if n == 0:
                return
        if self.mode is LIVE:
            if self.parked and self._write_now(batch, n):
                return
            # a client is behind when it still holds queued events and the next batch would pass its
            # limits (one burst bigger than the limits, met with an empty queue, is not being behind)
            if self.queue and (self.q_events + n > self.max_events or self.q_bytes + nbytes > self.max_bytes):
                self._slow(f"queue full ({self.q_events} events, {self.q_bytes} bytes waiting)")
                return
            self.queue.append(batch)
            self.q_events += n
            self.q_bytes += nbytes
            self._wake()
        elif self.mode is REPLAY and self.replay is not None:
            self.replay.hold(batch, n, nbytes)

    def _wake(self) -> None:
        """Work for the pump: from now until it has run, frames must wait behind what it has to do."""
        self.parked = False
        self.wake.set()

    def _write_now(self, batch: Batch, n: int) -> bool:
        """The fast path for a caught-up client whose pump is idle: the batch's frame (built once for
        all such clients) goes straight to the connection, without waking the pump; when the
        connection cannot take it at once, the batch is queued as usual."""
        if self.only_run is None:
            if not self.transport.write_now(batch.frame()):
                return False
        else:
            if not self.transport.write_now(batch.run_frame(self.only_run)):
                return False
            if self.only_run in batch.terminal_runs:
                self.request_close(CloseReason.RUN_ENDED)
        self.last_send = time.monotonic()
        stats = self.stats
        stats.frames_out += 1
        stats.frames_direct += 1
        stats.events_out += n
        return True

    def notice(self, notice: Notice) -> None:
        """A frame between batches (a journal hole on the live path). Only live clients take it: a
        replaying client meets the hole in the journal itself, at the right place."""
        if self.mode is LIVE and (self.only_run is None or notice.run_id == self.only_run):
            self.queue.append(notice)
            self._wake()

    def request_close(self, reason: CloseReason) -> None:
        if self.close_request is None:
            self.close_request = reason
        self.mode = CLOSING
        self.queue.clear()
        if self.replay is not None:
            self.replay.clear()
        self._wake()

    def check(self, now: float) -> None:
        """The watchdog: cancel a live send that is taking too long; wake an idle client for a keepalive."""
        if self.send_started:
            # a close under way is bounded by the transport itself (the peer must keep reading)
            if now - self.send_started > self.send_timeout and self._pump_scope is not None and self.mode is not CLOSING:
                self._pump_scope.cancel()
        elif self.mode is LIVE and not self.queue and now - self.last_send >= KEEPALIVE:
            self.keepalive_due = True
            self._wake()

    def _slow(self, why: str) -> None:
        if self.close_request is None:
            self.stats.slow_consumer_closes += 1
            log.info("%s client closed as slow consumer: %s", self.transport.kind, why)
        self.request_close(CloseReason.SLOW_CONSUMER)

    # ------------------------------------------------------------------ registration and catch-up

    def register_fresh(self) -> str:
        """All runs from now on. Returns the hello cursor (the hub's own, since we start in step)."""
        hub = self.hub
        self.pos.start(hub, hub.positions(), set())
        self.pos.done = set(hub.recent_done(self.pos.t))
        hub.register(self)
        self.mode = LIVE
        return hub.live_cursor()

    def register_resume(self, positions: dict[str, int], done: list[str]) -> dict[str, int]:
        """Resume: runs in `positions` from their seq; every run the hub follows now from its frontier
        unless named. Returns the replay plan."""
        hub = self.hub
        sent = hub.positions()
        sent.update(positions)
        self.pos.start(hub, sent, set(done))
        self._replaying()
        hub.register(self)
        return dict(positions)

    def register_run(self, run_id: str, after_seq: int) -> None:
        self.pos.start(self.hub, {run_id: after_seq}, set())
        self._replaying()
        self.hub.register(self)

    def _replaying(self) -> None:
        self.replay = Replay(self.hub, self.pos, self.stats, self.max_events, self.max_bytes)

    def cursor(self) -> str:
        """This client's position now (during replay; live clients carry the hub's cursors)."""
        return self.pos.cursor(self.hub.tag, self.hub.created_us)

    async def catch_up(self, plan: dict[str, int]) -> None:
        """Replay `plan` ({run_id: after seq}) from the journal, then go live where the hub stands."""
        assert self.replay is not None, "catch_up after register_resume or register_run"
        pending = await self.replay.run(plan, self)
        if self.mode is not REPLAY:
            return  # closing
        # nothing separates us from the hub now: go live (no await since the replay's merge)
        self.mode = LIVE
        self.q_events = self.q_bytes = 0
        if pending is not None:
            self.queue.append(pending)
            self.q_events, self.q_bytes = pending.n, pending.nbytes
            self._wake()

    @property
    def closing(self) -> bool:
        return self.close_request is not None

    # ------------------------------------------------------------------ sending (the replay's Sender)

    async def _timed(self, send: Awaitable[None]) -> None:
        """One send bounded by send_timeout: past it the client is closed 4008 (the others never wait);
        a connection that broke meanwhile ends the client too."""
        try:
            with anyio.fail_after(self.send_timeout):
                await send
        except TimeoutError:
            # the frame is whole in the connection's buffer; the close frame goes after it
            self._slow(f"a send took longer than {self.send_timeout:g}s")
            await self.close(CloseReason.SLOW_CONSUMER)
            raise ClientGone("slow consumer") from None
        except (ConnectionError, RuntimeError) as e:
            raise ClientGone(str(e)) from e

    async def send_events(self, frame: bytes, n: int, cursor: str) -> None:
        await self._timed(self.transport.send_events(frame, cursor))
        self.stats.frames_out += 1
        self.stats.events_out += n

    async def send_notice(self, frame: bytes) -> None:
        await self._timed(self.transport.send_notice(frame))
        self.stats.frames_out += 1

    # ------------------------------------------------------------------ live: the pump

    async def pump(self) -> None:
        """Live mode: send what the hub queues, coalesced into frames; close when asked to. A send the
        watchdog finds running longer than send_timeout is cancelled: 4008 slow consumer."""
        with anyio.CancelScope() as scope:
            self._pump_scope = scope
            try:
                await self._pump()
            finally:
                self._pump_scope = None
        if scope.cancelled_caught:
            self._slow(f"a send took longer than {self.send_timeout:g}s")
            await self.close(CloseReason.SLOW_CONSUMER)
            raise ClientGone("slow consumer")

    async def _pump(self) -> None:
        while True:
            if self.close_request is not None:
                await self.close(self.close_request)
                return
            if not self.queue:
                if self.keepalive_due:
                    self.keepalive_due = False
                    await self._live_send(None, 0, "")
                    continue
                self.wake.clear()
                self.parked = True
                try:
                    await self.wake.wait()
                finally:
                    self.parked = False
                continue
            item = self.queue[0]
            if isinstance(item, Notice):
                self.queue.popleft()
                await self._live_send(item.frame, 0, "", notice=True)
                continue
            if len(self.queue) == 1 and not isinstance(item, Piece):
                # the usual case: one batch since the last frame, whose frame other clients share
                self.queue.popleft()
                terminal = False
                if self.only_run is None:
                    n, size = len(item.events), item.nbytes
                    frame, cursor = item.frame(), item.cursor
                else:
                    n, size = item.run_size(self.only_run)
                    frame, cursor = item.run_frame(self.only_run), str(item.run_last_seq(self.only_run))
                    terminal = self.only_run in item.terminal_runs
            else:
                frame, n, size, cursor, terminal = self.coalesce()
            self.q_events -= n
            self.q_bytes -= size
            await self._live_send(frame, n, cursor)
            if terminal:
                await self.close(CloseReason.RUN_ENDED)
                return

    def coalesce(self) -> tuple[bytes, int, int, str, bool]:
        """One frame of what is queued, up to the first notice or about FRAME_BYTES: (frame, events,
        bytes, cursor, whether it holds the run's terminal event)."""
        parts: list[bytes] = []
        n = size = 0
        cursor = ""
        terminal = False
        queue = self.queue
        while queue and size < FRAME_BYTES and not isinstance(queue[0], Notice):
            item = queue.popleft()
            if isinstance(item, Piece):
                parts.append(item.data)
                n += item.n
                size += item.nbytes
                cursor = item.cursor
                terminal = terminal or item.terminal
            elif isinstance(item, Batch):
                if self.only_run is None:
                    parts.append(item.joined())
                    n += len(item.events)
                    size += item.nbytes
                    cursor = item.cursor
                else:
                    k, b = item.run_size(self.only_run)
                    parts.append(item.run_joined(self.only_run))
                    n += k
                    size += b
                    cursor = str(item.run_last_seq(self.only_run))
                    terminal = terminal or self.only_run in item.terminal_runs
        return events_frame(parts, cursor), n, size, cursor, terminal

    async def _live_send(self, frame: bytes | None, n: int, cursor: str, notice: bool = False) -> None:
        """One frame (None: a keepalive), timed by the watchdog through `send_started`."""
        self.send_started = self.last_send = time.monotonic()
        try:
            if frame is None:
                await self.transport.keepalive()
            elif notice:
                await self.transport.send_notice(frame)
            else:
                await self.transport.send_events(frame, cursor)
        except (ConnectionError, RuntimeError) as e:
            raise ClientGone(str(e)) from e
        finally:
            self.send_started = 0.0
        if frame is not None:
            self.stats.frames_out += 1
            self.stats.events_out += n

    async def close(self, reason: CloseReason) -> None:
        # recorded first: the peer's reader sees its receive loop end when the close starts, and must
        # take that for our close under way, not for a peer gone (which cancels the close: 1006)
        if self.close_request is None:
            self.close_request = reason
        self.mode = CLOSING
        await self.transport.close(reason)
