"""One streaming client (WebSocket or SSE): replay from the journal joined to the live path without gap
or duplicate, then live delivery through a bounded queue.

Joining: the client registers with the hub first (from then on every delivery reaches it), replays
the journal while live batches wait in a buffer, then merges the buffer by seq. If the buffer would
exceed the client's limits during a long replay it is dropped and the client catches up from the
journal again (the journal holds everything the hub delivered), until nothing separates it from the
hub's frontier; only then does it go live. In live mode a full queue or a send that takes longer than
`gateway.send_timeout` closes the client with 4008 `slow consumer`; the hub never waits for a client.
Live sends are timed (and idle clients kept alive) by the hub's watchdog, not by a timer per send.
While a live client's pump is parked (nothing queued, nothing being sent) the hub writes batches
straight to its connection if the connection takes them at once (see `_write_now`); anything queued
goes first, so order holds whichever way a frame leaves.

Holes: seqs the journal cannot supply (a corrupt line skipped by the reader, or a journal that ends
before what the hub delivered) are never skipped silently. A replay that meets one sends the
`journal_gap` error frame where the hole is and goes on after it (its cursor moves past the hole,
so a client that resumes does not meet it again); live clients get the hub's `Notice` in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec

from shared.events import Event
from shared.journal import JournalReader, journal_path

from .cursor import MARGIN_S, encode_cursor
from .hub import Notice, array_frame, events_frame

if TYPE_CHECKING:
    from .hub import Batch, Hub

log = logging.getLogger(__name__)

REPLAY, LIVE, CLOSING = "replay", "live", "closing"
FRAME_BYTES = 1 << 20  # frames are cut near this size (aiohttp clients refuse frames over 4 MiB)
REPLAY_CHUNK = 1 << 20
KEEPALIVE = 15.0

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_SLOW = 4008


class ClientGone(Exception):
    """The peer went away while we were sending."""


class Transport(Protocol):
    kind: str

    async def send_events(self, frame: bytes, cursor: str) -> None: ...

    async def send_json(self, obj: dict[str, Any], cursor: str | None = None) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...

    async def keepalive(self) -> None: ...

    async def send_notice(self, frame: bytes) -> None: ...

    def write_now(self, frame: bytes) -> bool:
        """Write an `events` frame without waiting, if the connection takes it at once (nothing of
        ours is still buffered); False: send it the awaited way."""
        ...


class Piece:
    """Events prepared for one client (the merge of its buffer after a replay)."""

    __slots__ = ("data", "n", "nbytes", "cursor", "terminal")

    def __init__(self, data: bytes, n: int, cursor: str, terminal: bool) -> None:
        self.data = data
        self.n = n
        self.nbytes = len(data)
        self.cursor = cursor
        self.terminal = terminal


class StreamClient:
    def __init__(self, hub: Hub, transport: Transport, only_run: str | None = None) -> None:
        cfg = hub.cfg
        self.hub = hub
        self.transport = transport
        self.only_run = only_run
        self.max_events = cfg.client_queue_events
        self.max_bytes = cfg.client_queue_bytes
        self.send_timeout = cfg.send_timeout
        self.mode = REPLAY
        self.buffer: deque[Batch] = deque()  # live batches that arrived during a replay
        self.queue: deque[Batch | Piece | Notice] = deque()  # live mode: waiting to be sent
        self.q_events = 0
        self.q_bytes = 0
        self.overflow = False
        self.wake = asyncio.Event()
        self.close_request: tuple[int, str] | None = None
        self.last_send = time.monotonic()
        self.send_started = 0.0  # monotonic start of the live send in progress (0: none)
        self.keepalive_due = False
        self.parked = False  # the pump waits with nothing queued: the hub may write a batch's frame directly
        self._pump_scope: anyio.CancelScope | None = None
        # replay bookkeeping (all-runs clients: per run; per-run clients: one entry)
        self.sent: dict[str, int] = {}
        self.done: set[str] = set()
        self.t = int(time.time())
        self.registered_at = 0  # the hub's discovery count at registration: later runs are new to us

    # ------------------------------------------------------------------ called by the hub (never blocks)

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
        elif self.mode is REPLAY and not self.overflow:
            if self.q_events + n > self.max_events or self.q_bytes + nbytes > self.max_bytes:
                # the journal has all of it: drop the buffer and catch up from there
                self.overflow = True
                self.hub.stats.replay_overflows += 1
                self.buffer.clear()
                self.q_events = self.q_bytes = 0
                return
            self.buffer.append(batch)
            self.q_events += n
            self.q_bytes += nbytes

    def _wake(self) -> None:
        """Work for the pump: from now until it has run, frames must wait behind what it has to do."""
        self.parked = False
        self.wake.set()

    def _write_now(self, batch: Batch, n: int) -> bool:
        """The hub's fast path for a caught-up client whose pump is idle: the batch's frame (built once
        for all such clients) goes straight to the connection, without waking the pump; when the
        connection cannot take it at once, the batch is queued as usual."""
        if self.only_run is None:
            if not self.transport.write_now(batch.frame()):
                return False
        else:
            if not self.transport.write_now(batch.run_frame(self.only_run)):
                return False
            if self.only_run in batch.terminal_runs:
                self.request_close(CLOSE_NORMAL, "run ended")
        self.last_send = time.monotonic()
        stats = self.hub.stats
        stats.frames_out += 1
        stats.frames_direct += 1
        stats.events_out += n
        return True

    def notice(self, notice: Notice) -> None:
        """A frame from the hub between batches (a journal hole on the live path). Only live clients
        take it: a replaying client meets the hole in the journal itself, at the right place."""
        if self.mode is LIVE and (self.only_run is None or notice.run_id == self.only_run):
            self.queue.append(notice)
            self._wake()

    def request_close(self, code: int, reason: str) -> None:
        if self.close_request is None:
            self.close_request = (code, reason)
        self.mode = CLOSING
        self.queue.clear()
        self.buffer.clear()
        self._wake()

    def check(self, now: float) -> None:
        """The hub's watchdog: cancel a live send that is taking too long; wake an idle client for a
        keepalive."""
        if self.send_started:
            # a close under way is bounded by the transport itself (the peer must keep reading)
            if now - self.send_started > self.send_timeout and self._pump_scope is not None and self.mode is not CLOSING:
                self._pump_scope.cancel()
        elif self.mode is LIVE and not self.queue and now - self.last_send >= KEEPALIVE:
            self.keepalive_due = True
            self._wake()

    def _slow(self, why: str) -> None:
        if self.close_request is None:
            self.hub.stats.slow_consumer_closes += 1
            log.info("%s client closed as slow consumer: %s", self.transport.kind, why)
        self.request_close(CLOSE_SLOW, "slow consumer")

    # ------------------------------------------------------------------ registration

    def register_fresh(self) -> str:
        """All runs from now on. Returns the hello cursor (the hub's own, since we start in step)."""
        hub = self.hub
        self.t = int(time.time())
        self.registered_at = hub.index.discoveries
        self.sent = {rid: e.frontier for rid, e in hub.index.active.items()}
        self.done = set(hub.recent_done(self.t))
        hub.register(self)
        self.mode = LIVE
        return hub.live_cursor()

    def register_resume(self, positions: dict[str, int], done: list[str]) -> dict[str, int]:
        """Resume: runs in `positions` from their seq; every run the hub follows now from its frontier
        unless named. Returns the replay plan."""
        hub = self.hub
        self.t = int(time.time())
        self.registered_at = hub.index.discoveries
        self.sent = {rid: e.frontier for rid, e in hub.index.active.items()}
        self.sent.update(positions)
        self.done = set(done)
        hub.register(self)
        return dict(positions)

    def register_run(self, run_id: str, after_seq: int) -> None:
        self.t = int(time.time())
        self.registered_at = self.hub.index.discoveries
        self.sent = {run_id: after_seq}
        self.hub.register(self)

    def cursor(self) -> str:
        """This client's position now (during replay; live clients carry the hub's cursors)."""
        if self.only_run is not None:
            return str(self.sent.get(self.only_run, 0))
        threshold = (self.t - MARGIN_S) * 1_000_000
        runs = self.hub.index.runs
        positions = {rid: seq for rid, seq in self.sent.items() if rid not in self.done}
        done = []
        for rid in self.done:
            entry = runs.get(rid)
            created = entry.created_us if entry is not None else None
            if created is None or created > threshold:
                done.append(rid)
        return encode_cursor(self.hub.tag, self.t, positions, done)

    # ------------------------------------------------------------------ replay and join

    async def catch_up(self, plan: dict[str, int]) -> None:
        """Replay `plan` ({run_id: after seq}) from the journal, then join the live path.

        A replay never goes past the hub's frontier (later events reach us through the buffer), so at
        the join every run we follow stands exactly where the hub stands, and live batches need no
        per-client filtering.
        """
        hub = self.hub
        while True:
            for run_id, after in sorted(plan.items(), key=lambda kv: self._created(kv[0])):
                await self._replay_run(run_id, after)
                if self.close_request:
                    return
            hub.flush()  # every event the hub delivered so far is in our buffer now (or overflowed it)
            if self.overflow:
                self.overflow = False
                plan = self._behind()
                continue
            pending, anomaly = self._merge_buffer()
            if anomaly:
                if pending is not None:
                    await self._send(events_frame([pending.data], pending.cursor), pending.n, pending.cursor)
                plan = self._behind()
                continue
            ahead = [rid for rid, seq in self.sent.items() if seq > hub.frontier(rid)]
            if ahead:
                # we hold more than the hub has delivered (a cursor from a gateway that was further on):
                # keep buffering until the hub gets there
                if pending is not None:
                    await self._send(events_frame([pending.data], pending.cursor), pending.n, pending.cursor)
                await anyio.sleep(0.05)
                plan = {}
                continue
            # nothing separates us from the hub now: go live (no await between the merge and this)
            self.mode = LIVE
            self.q_events = self.q_bytes = 0
            if pending is not None:
                self.queue.append(pending)
                self.q_events, self.q_bytes = pending.n, pending.nbytes
                self._wake()
            return

    def _created(self, run_id: str) -> int:
        entry = self.hub.index.get(run_id)
        return entry.created_us or 0 if entry is not None else 0

    def _behind(self) -> dict[str, int]:
        """Runs where the hub has delivered more than we sent (and runs new since we registered)."""
        hub = self.hub
        plan: dict[str, int] = {}
        if self.only_run is not None:
            run_id = self.only_run
            if hub.frontier(run_id) > self.sent[run_id]:
                plan[run_id] = self.sent[run_id]
            return plan
        for run_id, seq in self.sent.items():
            if run_id not in self.done and hub.frontier(run_id) > seq:
                plan[run_id] = seq
        for run_id in hub.index.discovered_after(self.registered_at):
            if run_id not in self.sent and hub.frontier(run_id) > 0:
                plan[run_id] = 0
                self.sent[run_id] = 0
        return plan

    def _merge_buffer(self) -> tuple[Piece | None, bool]:
        """The buffered live events we have not sent, in order, up to the first that does not join
        (then the flag is True and the rest is for the journal to supply)."""
        parts: list[bytes] = []
        terminal = False
        anomaly = False
        last_cursor = ""
        for batch in self.buffer:
            if anomaly:
                break
            last_cursor = batch.cursor
            for ev, part in batch.items(self.only_run):
                seq = self.sent.get(ev.run_id)
                if seq is None:
                    # a run learnt of after we registered: the hub delivers it from seq 1
                    seq = self.sent[ev.run_id] = 0
                if ev.seq <= seq:
                    continue
                if ev.seq != seq + 1:
                    log.debug("merge found seq %d after %d in run %s: catching up from the journal", ev.seq, seq, ev.run_id)
                    anomaly = True
                    break

                self.sent[ev.run_id] = ev.seq
                parts.append(part)
                if ev.is_terminal:
                    self.done.add(ev.run_id)
                    terminal = terminal or ev.run_id == self.only_run
        self.buffer.clear()
        if not parts:
            return None, anomaly
        if self.only_run is not None:
            cursor = str(self.sent[self.only_run])
        elif anomaly:
            cursor = self.cursor()  # the hub's cursor of that batch would claim events we did not send
        else:
            cursor = last_cursor
        return Piece(b",".join(parts), len(parts), cursor, terminal), anomaly

    async def _replay_run(self, run_id: str, after: int) -> None:
        reader = JournalReader(journal_path(self.hub.journal_dir, run_id), run_id)
        offset = await anyio.to_thread.run_sync(reader.offset_after, after)
        while not self.close_request:
            seq = self.sent.get(run_id, after)
            limit = self.hub.frontier(run_id)  # read before the chunk: it only grows meanwhile
            if seq >= limit:
                return
            pieces, nxt, truncated = await anyio.to_thread.run_sync(_read_encoded, reader, offset, seq, limit)
            if not pieces:
                if nxt == offset:
                    # the journal ends, yet the hub delivered up to `limit` (every delivery is journaled
                    # first, so those lines are unreadable or elsewhere): a hole, said out loud
                    await self._journal_gap(run_id, seq + 1, limit)
                    return
                offset = nxt
                continue
            offset = nxt
            ended = False
            for piece in pieces:
                if isinstance(piece, Hole):
                    await self._journal_gap(run_id, piece.lo, piece.hi)
                    continue
                events, data = piece
                self.sent[run_id] = events[-1].seq
                ended = events[-1].is_terminal
                if ended:
                    self.done.add(run_id)
                cursor = self.cursor()
                await self._send(array_frame(data, cursor), len(events), cursor)
                self.hub.stats.replay_events += len(events)
            if ended or truncated:
                return  # what lies beyond the hub's frontier comes live (or from a fresh replay)

    async def _journal_gap(self, run_id: str, lo: int, hi: int) -> None:
        """Tell the client seqs lo..hi cannot be served, and move its position past them (a resume
        from its cursor must not meet the same hole again, or it would loop)."""
        self.hub.note_gap(run_id, lo, hi)
        self.sent[run_id] = max(self.sent.get(run_id, 0), hi)
        await self._timed(self.transport.send_notice(self.hub.gap_frame(run_id, lo, hi)))
        self.hub.stats.frames_out += 1

    # ------------------------------------------------------------------ sending

    async def _timed(self, send: Awaitable[None]) -> None:
        """One send bounded by send_timeout: past it the client is closed 4008 (the others never wait);
        a connection that broke meanwhile ends the client too."""
        try:
            with anyio.fail_after(self.send_timeout):
                await send
        except TimeoutError:
            # the frame is whole in the connection's buffer; the close frame goes after it
            self._slow(f"a send took longer than {self.send_timeout:g}s")
            await self.close(CLOSE_SLOW, "slow consumer")
            raise ClientGone("slow consumer") from None
        except (ConnectionError, RuntimeError) as e:
            raise ClientGone(str(e)) from e

    async def _send(self, frame: bytes, n: int, cursor: str) -> None:
        await self._timed(self.transport.send_events(frame, cursor))
        stats = self.hub.stats
        stats.frames_out += 1
        stats.events_out += n

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
            await self.close(CLOSE_SLOW, "slow consumer")
            raise ClientGone("slow consumer")

    async def _pump(self) -> None:
        while True:
            if self.close_request is not None:
                await self.close(*self.close_request)
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
                frame, n, size, cursor, terminal = self._coalesce()
            self.q_events -= n
            self.q_bytes -= size
            await self._live_send(frame, n, cursor)
            if terminal:
                await self.close(CLOSE_NORMAL, "run ended")
                return

    def _coalesce(self) -> tuple[bytes, int, int, str, bool]:
        """One frame of what is queued (up to about FRAME_BYTES)."""
        parts: list[bytes] = []
        n = size = 0
        cursor = ""
        terminal = False
        while self.queue and size < FRAME_BYTES and not isinstance(self.queue[0], Notice):
            item = self.queue.popleft()
            if isinstance(item, Notice):
                raise AssertionError("unreachable: notices end a frame")
            if isinstance(item, Piece):
                parts.append(item.data)
                n += item.n
                size += item.nbytes
                cursor = item.cursor
                terminal = terminal or item.terminal
            elif self.only_run is None:
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
        """One frame (None: a keepalive), timed by the hub's watchdog through `send_started`."""
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
            stats = self.hub.stats
            stats.frames_out += 1
            stats.events_out += n

    async def close(self, code: int, reason: str) -> None:
        # recorded first: the peer's reader sees its receive loop end when the close starts, and must
        # take that for our close under way, not for a peer gone (which cancels the close: 1006)
        if self.close_request is None:
            self.close_request = (code, reason)
        self.mode = CLOSING
        await self.transport.close(code, reason)


class Hole:
    """Seqs lo..hi that a journal chunk lacks."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi


Pieces = list["tuple[list[Event], bytes] | Hole"]


def _read_encoded(reader: JournalReader, offset: int, after: int, limit: int) -> tuple[Pieces, int, bool]:
    """Events after `after` up to seq `limit` from a journal chunk, decoded (to check them) and encoded
    back as JSON arrays, in a worker thread: runs of consecutive seqs as (events, array), and each hole
    between them as (first, last) missing seq; the offset to read on; whether the limit cut the chunk
    (then the offset is not to be used: events past the limit lie before it)."""
    events, nxt = reader.read_chunk(offset, after, REPLAY_CHUNK)
    truncated = False
    if events and events[-1].seq > limit:
        events = [e for e in events if e.seq <= limit]
        truncated = True
    if not truncated and events and events[-1].seq - after == len(events):
        return [(events, msgspec.json.encode(events))], nxt, truncated  # the usual case: no hole
    pieces: Pieces = []
    run: list[Event] = []
    prev = after
    for ev in events:
        if ev.seq <= prev:
            continue  # out of order (a damaged journal): never send a seq twice
        if ev.seq != prev + 1:
            if run:
                pieces.append((run, msgspec.json.encode(run)))
                run = []
            pieces.append(Hole(prev + 1, ev.seq - 1))
        run.append(ev)
        prev = ev.seq
    if run:
        pieces.append((run, msgspec.json.encode(run)))
    if truncated and prev < limit:
        pieces.append(Hole(prev + 1, limit))  # the journal's next line is past the limit: these are not in it
    return pieces, nxt, truncated
