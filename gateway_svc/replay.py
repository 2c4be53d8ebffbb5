"""Replay: a client's catch-up from a position in the run source (runsource.py: the journal, or the
event stream in cluster mode; "the journal" below means either), joined to the live path without gap or
duplicate.

Joining: the client registers with the hub first (from then on every delivery reaches it), replays
the journal while live batches wait in a buffer, then merges the buffer by seq (`merge`, pure). If
the buffer would exceed the client's limits during a long replay it is dropped and the client
catches up from the journal again (the journal holds everything the hub delivered), until nothing
separates it from the hub's frontier; only then does it go live.

Holes: seqs the journal cannot supply (a corrupt line skipped by the reader, or a journal that ends
before what the hub delivered) are never skipped silently. A replay that meets one sends the
`journal_gap` frame where the hole is and goes on after it (its cursor moves past the hole, so a
client that resumes does not meet it again).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import anyio
import anyio.lowlevel

from shared.protocol import array_frame, events_frame

from .batch import Batch
from .cursor import MARGIN_S, encode_cursor
from .hubview import HubView
from .metrics import GatewayStats
from .runsource import Hole, PieceReader

log = logging.getLogger(__name__)

AHEAD_POLL = 0.05  # seconds between looks at the hub when a cursor is ahead of it


class Position:
    """What a client has been sent, per run: the source of its cursor while it replays."""

    __slots__ = ("only_run", "sent", "done", "t", "registered_at")

    def __init__(self, only_run: str | None = None) -> None:
        self.only_run = only_run
        self.sent: dict[str, int] = {}  # run_id -> last seq sent
        self.done: set[str] = set()  # runs sent to their end
        self.t = int(time.time())  # the cursor's watermark
        self.registered_at = 0  # the hub's discovery count at registration: later runs are new to us

    def start(self, hub: HubView, sent: dict[str, int], done: set[str]) -> None:
        self.t = int(time.time())
        self.registered_at = hub.discoveries
        self.sent = sent
        self.done = done

    def cursor(self, tag: bytes, created_us: Callable[[str], int | None]) -> str:
        """The client's cursor now: its run's last seq (one run), or the all-runs cursor."""
        if self.only_run is not None:
            return str(self.sent.get(self.only_run, 0))
        threshold = (self.t - MARGIN_S) * 1_000_000
        positions = {rid: seq for rid, seq in self.sent.items() if rid not in self.done}
        done = []
        for rid in self.done:
            created = created_us(rid)
            if created is None or created > threshold:
                done.append(rid)
        return encode_cursor(tag, self.t, positions, done)

    def behind(self, hub: HubView) -> dict[str, int]:
        """The replay plan {run_id: after seq} of runs where the hub has delivered more than we sent
        (and of runs new since we registered)."""
        plan: dict[str, int] = {}
        if self.only_run is not None:
            run_id = self.only_run
            if hub.frontier(run_id) > self.sent[run_id]:
                plan[run_id] = self.sent[run_id]
            return plan
        for run_id, seq in self.sent.items():
            if run_id not in self.done and hub.frontier(run_id) > seq:
                plan[run_id] = seq
        for run_id in hub.discovered_after(self.registered_at):
            if run_id not in self.sent and hub.frontier(run_id) > 0:
                plan[run_id] = 0
                self.sent[run_id] = 0
        return plan


class Piece:
    """Events prepared for one client (the merge of its buffer after a replay)."""

    __slots__ = ("data", "n", "nbytes", "cursor", "terminal")

    def __init__(self, data: bytes, n: int, cursor: str, terminal: bool) -> None:
        self.data = data
        self.n = n
        self.nbytes = len(data)
        self.cursor = cursor
        self.terminal = terminal


def merge(buffer: Iterable[Batch], pos: Position, cursor: Callable[[], str]) -> tuple[Piece | None, bool]:
    """The buffered live events not yet sent, in order, up to the first that does not join `pos`
    (then the flag is True: the rest is for the journal to supply). `pos` moves past what is merged.
    The piece's cursor is the last batch's (all runs) unless the merge stopped short: then
    `cursor()`, since that batch's cursor would claim events the client was not sent."""
    only_run = pos.only_run
    sent, done = pos.sent, pos.done
    parts: list[bytes] = []
    terminal = False
    anomaly = False
    last_cursor = ""
    for batch in buffer:
        if anomaly:
            break
        last_cursor = batch.cursor
        for ev, part in batch.items(only_run):
            seq = sent.get(ev.run_id)
            if seq is None:
                seq = sent[ev.run_id] = 0  # a run learnt of after we registered: delivered from seq 1
            if ev.seq <= seq:
                continue
            if ev.seq != seq + 1:
                log.debug("merge found seq %d after %d in run %s: catching up from the journal", ev.seq, seq, ev.run_id)
                anomaly = True
                break
            sent[ev.run_id] = ev.seq
            parts.append(part)
            if ev.is_terminal:
                done.add(ev.run_id)
                terminal = terminal or ev.run_id == only_run
    if not parts:
        return None, anomaly
    if only_run is not None:
        text = str(sent[only_run])
    elif anomaly:
        text = cursor()
    else:
        text = last_cursor
    return Piece(b",".join(parts), len(parts), text, terminal), anomaly


class Sender(Protocol):
    """The client side of a replay: its sends (timed) and whether it is closing."""

    @property
    def closing(self) -> bool: ...

    async def send_events(self, frame: bytes, n: int, cursor: str) -> None: ...

    async def send_notice(self, frame: bytes) -> None: ...


class Replay:
    """One client's catch-up: the live batches that arrive meanwhile, and the replay loop."""

    # one per connection, idle ones included: no per-instance dict
    __slots__ = ("buffer", "hub", "max_bytes", "max_events", "n", "nbytes", "overflow", "pos", "stats")

    def __init__(self, hub: HubView, pos: Position, stats: GatewayStats, max_events: int, max_bytes: int) -> None:
        self.hub = hub
        self.pos = pos
        self.stats = stats
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.buffer: deque[Batch] = deque()
        self.n = 0
        self.nbytes = 0
        self.overflow = False

    def cursor(self) -> str:
        return self.pos.cursor(self.hub.tag, self.hub.created_us)

    def hold(self, batch: Batch, n: int, nbytes: int) -> None:
        """A live batch (n events, nbytes of them for us) that arrived during the replay."""
        if self.overflow:
            return
        if self.n + n > self.max_events or self.nbytes + nbytes > self.max_bytes:
            # the journal has all of it: drop the buffer and catch up from there
            self.overflow = True
            self.stats.replay_overflows += 1
            self.clear()
            return
        self.buffer.append(batch)
        self.n += n
        self.nbytes += nbytes

    def clear(self) -> None:
        self.buffer.clear()
        self.n = self.nbytes = 0

    async def run(self, plan: dict[str, int], out: Sender) -> Piece | None:
        """Replay `plan` ({run_id: after seq}) from the journal, then merge the buffer: returns what the
        merge left to send (None: nothing), with no await between the merge and the return, so the
        caller goes live exactly where the hub stands. Returns early (None) if the client closes.

        A replay never goes past the hub's frontier (later events reach us through the buffer), so at
        the join every run we follow stands exactly where the hub stands, and live batches need no
        per-client filtering."""
        hub = self.hub
        while True:
            for run_id, after in sorted(plan.items(), key=lambda kv: hub.created_us(kv[0]) or 0):
                await self._replay_run(run_id, after, out)
                if out.closing:
                    return None
            hub.flush()  # every event the hub delivered so far is in our buffer now (or overflowed it)
            if self.overflow:
                self.overflow = False
                plan = self.pos.behind(hub)
                continue
            pending, anomaly = merge(self.buffer, self.pos, self.cursor)
            self.clear()
            if anomaly:
                if pending is not None:
                    await out.send_events(events_frame([pending.data], pending.cursor), pending.n, pending.cursor)
                plan = self.pos.behind(hub)
                continue
            if any(seq > hub.frontier(rid) for rid, seq in self.pos.sent.items()):
                # we hold more than the hub has delivered (a cursor from a gateway that was further on):
                # keep buffering until the hub gets there
                if pending is not None:
                    await out.send_events(events_frame([pending.data], pending.cursor), pending.n, pending.cursor)
                await anyio.sleep(AHEAD_POLL)
                plan = {}
                continue
            return pending

    async def _replay_run(self, run_id: str, after: int, out: Sender) -> None:
        reader = self.hub.source.reader(run_id, after)
        try:
            await self._replay_from(reader, run_id, after, out)
        finally:
            await reader.aclose()

    async def _replay_from(self, reader: PieceReader, run_id: str, after: int, out: Sender) -> None:
        sent = self.pos.sent
        while not out.closing:
            seq = sent.get(run_id, after)
            limit = self.hub.frontier(run_id)  # read before the chunk: it only grows meanwhile
            if seq >= limit:
                return
            pieces, stop = await reader.step(seq, limit)
            ended = False
            for i, piece in enumerate(pieces):
                if i:
                    await anyio.lowlevel.checkpoint()  # a step may be several frames: live deliveries go between
                if isinstance(piece, Hole):
                    await self._journal_gap(run_id, piece.lo, piece.hi, out)
                    continue
                sent[run_id] = piece.last_seq
                ended = piece.terminal
                if ended:
                    self.pos.done.add(run_id)
                cursor = self.cursor()
                await out.send_events(array_frame(piece.array, cursor), piece.n, cursor)
                self.stats.replay_events += piece.n
            if ended or stop:
                return  # what lies beyond the hub's frontier comes live (or from a fresh replay)

    async def _journal_gap(self, run_id: str, lo: int, hi: int, out: Sender) -> None:
        """Tell the client seqs lo..hi cannot be served, and move its position past them (a resume
        from its cursor must not meet the same hole again, or it would loop)."""
        self.hub.note_gap(run_id, lo, hi)
        self.pos.sent[run_id] = max(self.pos.sent.get(run_id, 0), hi)
        await out.send_notice(self.hub.gap_frame(run_id, lo, hi))
