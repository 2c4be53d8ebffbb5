"""The run source of cluster mode (runsource.py): the JetStream event stream, for a gateway whose
host has no journals. Loaded only with `[cluster]`.

- Replays and fills read a run's chunks from the one holding the seq they start after
  (runwire_cluster.reader.chunks_after: a bisection, then gets, then an ordered consumer), up to
  the run's last chunk as it was when the read began; a reader that needs more (the hub delivered
  further meanwhile) starts another read from where it stands, and only a read begun at a position
  that yields nothing up to the hub's frontier is a hole.
- The sweep (every few seconds) asks the stream's last sequence, and only when it moved lists the
  run subjects with their chunk counts (one request): runs no live message announced are taken in,
  and runs no fresh heartbeat claims are filled when their count changed.
- `load_index`: the run index at start, from each run's first chunk (its `queued`: pipeline,
  params, creation time) and last chunk (its status), a few dozen requests in flight at a time;
  runs not ended are folded in full.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

import anyio

from runwire_cluster.events import EventStream, run_subject
from runwire_cluster.reader import chunks_after, first_and_last, last_stream_seq, run_counts
from shared.errors import ServiceUnavailable
from shared.events import Event
from shared.runstate import RunState, fold

from .runindex import RunEntry, RunIndex, fold_open_run, timestamp_us
from .runsource import Hole, PieceReader, Pieces, SweepTarget, to_pieces

log = logging.getLogger(__name__)

STEP_EVENTS = 5000  # events per replay step (one frame or a few)
LOAD_PARALLEL = 32  # direct gets in flight while the index loads
SWEEP_WARN_EVERY = 10.0


class StreamPieces:
    """A replay's reading of one run from the stream."""

    __slots__ = ("fresh", "gen", "pending", "run_id", "stream")

    def __init__(self, stream: EventStream, run_id: str) -> None:
        self.stream = stream
        self.run_id = run_id
        self.gen: AsyncGenerator[list[Event], None] | None = None
        self.fresh = False  # the current read has yielded nothing yet
        self.pending: list[Event] = []  # events read past the last step's limit

    async def _next_chunk(self, after: int) -> list[Event] | None:
        for _ in range(2):
            if self.gen is None:
                self.gen = chunks_after(self.stream, self.run_id, after)
                self.fresh = True
            try:
                chunk = await self.gen.__anext__()
            except StopAsyncIteration:
                fresh, self.gen = self.fresh, None
                if fresh:
                    return None  # a read begun at `after` finds nothing more
                continue  # the read reached where the run stood when it began: read on from here
            self.fresh = False
            return chunk
        return None

    async def step(self, after: int, limit: int) -> tuple[Pieces, bool]:
        events: list[Event] = []
        truncated = False
        cur = after
        while len(events) < STEP_EVENTS and not truncated:
            chunk: list[Event] | None = self.pending
            self.pending = []
            if not chunk:
                chunk = await self._next_chunk(cur)
                if chunk is None:
                    break
            for i, ev in enumerate(chunk):
                if ev.seq <= cur:
                    continue
                if ev.seq > limit:
                    self.pending = chunk[i:]
                    truncated = True
                    break
                events.append(ev)
                cur = ev.seq
        if not events:
            return [Hole(after + 1, limit)], True
        return to_pieces(events, after, limit, truncated), truncated

    async def aclose(self) -> None:
        if self.gen is not None:
            gen, self.gen = self.gen, None
            await gen.aclose()


class StreamSource:
    local = False

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self._last_stream_seq = -1
        self._last_warning = float("-inf")

    def describe(self, run_id: str) -> str:
        return f"the event stream {self.stream.name} (subject {run_subject(run_id)})"

    async def exists(self, run_id: str) -> bool:
        return (await self.stream.last_chunk(run_id))[0] != 0

    async def last_seq(self, run_id: str) -> int:
        return (await self.stream.last_chunk(run_id))[1]

    async def events_after(self, run_id: str, after: int) -> AsyncGenerator[list[Event], None]:
        async with aclosing(chunks_after(self.stream, run_id, after)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def page(self, run_id: str, after: int, limit: int) -> list[Event]:
        out: list[Event] = []
        async with aclosing(chunks_after(self.stream, run_id, after)) as chunks:
            async for chunk in chunks:
                out.extend(chunk)
                if len(out) >= limit:
                    break
        return out[:limit]

    async def fold(self, run_id: str) -> RunState | None:
        events = await self.stream.read(run_id)
        return fold(run_id, events) if events else None

    def reader(self, run_id: str, after: int) -> PieceReader:
        return StreamPieces(self.stream, run_id)

    async def sweep(self, target: SweepTarget) -> None:
        try:
            last = await last_stream_seq(self.stream)
            if last == self._last_stream_seq:
                return
            counts = await run_counts(self.stream)
        except ServiceUnavailable as e:
            now = time.monotonic()
            if now - self._last_warning >= SWEEP_WARN_EVERY:
                self._last_warning = now
                log.warning("event stream sweep: %s; runs no live message announces wait for it", e)
            return
        self._last_stream_seq = last
        index = target.index
        for run_id in [rid for rid in counts if rid not in index.runs]:
            async with target.lock:
                if run_id not in index.runs:
                    entry = target.discover(run_id)
                    entry.size_seen = counts[run_id]
                    await target.fill(entry, None, "found in the event stream")
                    target.settle()
        claimed = target.claimed_runs()
        for entry in list(index.active.values()):
            count = counts.get(entry.run_id)
            if entry.run_id in claimed or count is None or count == entry.size_seen:
                continue
            entry.size_seen = count
            async with target.lock:
                await target.fill(entry, None, "event stream sweep (no publisher claims the run)")
                target.settle()


async def _scan(stream: EventStream, run_id: str, count: int, discovery: int) -> RunEntry | None:
    """An entry for a run found in the stream at start (frontier: its last seq there now); like
    runindex.scan_run for a journal."""
    head, tail = await first_and_last(stream, run_id)
    if not head or not tail:
        return None
    entry = RunEntry(run_id, discovery)
    entry.created_us = timestamp_us(head[0].timestamp)
    entry.size_seen = count
    last = tail[-1]
    if not last.is_terminal:
        return fold_open_run(entry, await stream.read(run_id))  # gaps: events past the stream's retention
    state = RunState(run_id=run_id)
    for ev in head:
        if ev.seq < tail[0].seq:
            state.apply(ev)
    for ev in tail:
        state.apply(ev)
    entry.state = state
    entry.full = False
    entry.frontier = last.seq
    return entry


async def load_index(stream: EventStream, index: RunIndex) -> int:
    """Take every run of the stream into the index (at start). Returns the run count."""
    counts = await run_counts(stream)
    found: list[RunEntry] = []
    limiter = anyio.Semaphore(LOAD_PARALLEL)

    async def one(run_id: str, count: int) -> None:
        async with limiter:
            entry = await _scan(stream, run_id, count, 0)
        if entry is not None:
            found.append(entry)

    async with anyio.create_task_group() as tg:
        for run_id, count in counts.items():
            if run_id not in index.runs:
                tg.start_soon(one, run_id, count)
    for entry in sorted(found, key=lambda e: (e.created_us or 0, e.run_id)):
        if entry.run_id not in index.runs:
            entry.discovery = index.next_discovery()
            index.add(entry)
    return len(index.runs)
