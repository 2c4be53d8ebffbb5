"""Where the gateway reads a run's events besides the live path: the "run source". Single-host mode
reads the local journal directory (`JournalSource`, here: the code paths of before, unchanged);
cluster mode reads the JetStream event stream (`streamsource.StreamSource`, loaded only with
`[cluster]`). The sequencer fills gaps and lost tails from it, replays read from it, and the HTTP
routes page and fold runs from it; none of them knows which one it is.

A source answers, per run: does it exist, its last seq, its events after a seq (in chunks, in order;
a jump in seqs is a hole the source cannot fill), a replay reader that stops at a limit (`step`), and
its sweep: the safety net for runs and tails no live message announced.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Protocol

import anyio
import msgspec

from shared.events import Event
from shared.journal import JournalReader, journal_path, list_run_ids
from shared.journal.reader import newer_than
from shared.runstate import RunState

from .blockstore import BlockStore
from .cleanblocks import CleanBlock, CleanBlocks, as_array, check, digest
from .runindex import RunEntry, RunIndex, dir_mtime_ns, fold_journal

log = logging.getLogger(__name__)

# A replay reads, decodes and encodes its run in blocks of this size, in a worker thread that holds the
# GIL for each block's decode and encode (one C call each): ~1 ms here, against ~4 ms with 1 MiB
# blocks, during which every live delivery of this gateway waited. Measured beside replays of a 1M-event
# run (bench e2e, "live beside replays"): a live client's p50 / p99 at 1k/s 1.1 / 3.5 ms with 128 KiB,
# 4.0 / 14 ms with 1 MiB; the replay itself ~10% slower (64 KiB: ~25% slower, little better live).
REPLAY_CHUNK = 128 * 1024
KNOWN_READ = 512 * 1024  # remembered blocks read per call (cleanblocks): a GIL hold is a copy, not a decode


class Hole:
    """Seqs lo..hi that a source lacks."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi


class Chunk:
    """Consecutive events of one run, as a JSON array: what a replay sends in one frame. From the
    journal it is made in the worker thread, where the decoded events are also freed: the event loop
    never holds them."""

    __slots__ = ("array", "last_seq", "n", "terminal")

    def __init__(self, array: bytes, n: int, last_seq: int, terminal: bool) -> None:
        self.array = array
        self.n = n
        self.last_seq = last_seq
        self.terminal = terminal  # the last event is the run's end

    @classmethod
    def of(cls, events: list[Event]) -> Chunk:
        last = events[-1]
        return cls(msgspec.json.encode(events), len(events), last.seq, last.is_terminal)


Pieces = list["Chunk | Hole"]


def to_pieces(events: list[Event], after: int, limit: int, truncated: bool) -> Pieces:
    """Events after `after` (none past `limit`), encoded: runs of consecutive seqs as chunks, and each
    hole between them; with `truncated` (the source holds more past the limit), a hole up to the limit
    if the events stop short of it."""
    if not truncated and events and events[-1].seq - after == len(events) and events[0].seq == after + 1:
        return [Chunk.of(events)]  # the usual case: no hole
    pieces: Pieces = []
    run: list[Event] = []
    prev = after
    for ev in events:
        if ev.seq <= prev:
            continue  # out of order (a damaged journal): never send a seq twice
        if ev.seq != prev + 1:
            if run:
                pieces.append(Chunk.of(run))
                run = []
            pieces.append(Hole(prev + 1, ev.seq - 1))
        run.append(ev)
        prev = ev.seq
    if run:
        pieces.append(Chunk.of(run))
    if truncated and prev < limit:
        pieces.append(Hole(prev + 1, limit))  # the source's next event is past the limit: these are not in it
    return pieces


def clean_pieces(block: bytes, known: CleanBlock, after: int, limit: int,
                 whole: bytes | None = None) -> tuple[Pieces, bool]:
    """The pieces of a clean block's events after `after` up to seq `limit`, made of its lines as they
    are: the same bytes as to_pieces of its decoded events. The flag: the limit cut the block.
    `whole`: the block as one array, if the caller has it."""
    first, n = known.first_seq, known.n
    if first > limit:
        return [Hole(after + 1, limit)], True  # the source's next event is past the limit
    pieces: Pieces = []
    if first > after + 1:
        pieces.append(Hole(after + 1, first - 1))
    lo = max(0, after + 1 - first)  # lines with seqs up to `after` are left out
    hi = min(n, limit - first + 1)  # and those past `limit`
    if lo < hi:
        if lo == 0 and hi == n:
            array = whole if whole is not None else as_array(block)
        else:
            array = b"[" + b",".join(block.split(b"\n")[lo:hi]) + b"]"
        pieces.append(Chunk(array, hi - lo, first + hi - 1, known.terminal and hi == n))
    return pieces, hi < n


def read_known(reader: JournalReader, clean: CleanBlocks, known: CleanBlock, after: int,
               limit: int) -> tuple[Pieces, int, bool] | None:
    """read_encoded from remembered blocks: this one and those right after it, up to KNOWN_READ bytes
    (one worker-thread call for several blocks: each call is a wake-up of the event loop), each
    checked against its digest. None if the first one's bytes changed (then decode them)."""
    assert reader.run_id is not None
    pieces: Pieces = []
    nbytes = 0
    while True:
        block = reader.read_at(known.offset, known.length)
        if digest(block) != known.digest:
            clean.changed_under(reader.run_id, f"the journal {reader.path}", known, len(block))
            return (pieces, known.offset, False) if pieces else None  # the next step decodes from here
        clean.hit()
        got, cut = clean_pieces(block, known, after, limit)
        pieces += got
        end = known.offset + known.length
        nbytes += known.length
        if cut or nbytes >= KNOWN_READ:
            return pieces, end, cut
        if got:
            last = got[-1]
            after = last.last_seq if isinstance(last, Chunk) else last.hi
        nxt = clean.find(reader.run_id, end)
        if nxt is None or nxt.offset != end:
            return pieces, end, False
        known = nxt


def read_encoded(reader: JournalReader, clean: CleanBlocks, offset: int, after: int,
                 limit: int) -> tuple[Pieces, int, bool]:
    """Events after `after` up to seq `limit` from a journal block, in a worker thread: the pieces, the
    offset to read on, and whether the limit cut the block (then the offset is not to be used: events
    past the limit lie before it). A block this gateway found clean before, with the same bytes, is
    sent as its lines are (cleanblocks); any other is decoded (to check it, skip and report what is
    wrong in it) and encoded back, and remembered if it was clean."""
    run_id = reader.run_id
    assert run_id is not None
    known = clean.find(run_id, offset)
    if known is not None:
        sent = read_known(reader, clean, known, after, limit)
        if sent is not None:
            return sent
    block, nxt = reader.read_block(offset, REPLAY_CHUNK)
    if not block:
        return [], nxt, False
    events = reader.decode(block, offset)
    encoded = msgspec.json.encode(events)
    known = check(block, offset, events, encoded)
    if known is not None:
        clean.add(run_id, known)
        pieces, cut = clean_pieces(block, known, after, limit, encoded)
        return pieces, nxt, cut
    events = newer_than(events, after)
    truncated = False
    if events and events[-1].seq > limit:
        events = [e for e in events if e.seq <= limit]
        truncated = True
    return to_pieces(events, after, limit, truncated), nxt, truncated


class PieceReader(Protocol):
    """One replay's reading of one run."""

    async def step(self, after: int, limit: int) -> tuple[Pieces, bool]:
        """The next events after `after` up to seq `limit` (after < limit), as pieces; never empty (a
        source that has nothing more up to the limit answers a hole). The flag: stop reading (the
        limit cut the events, or the hole reaches it)."""

    async def aclose(self) -> None: ...


class SweepTarget(Protocol):
    """What a source's sweep acts on (the sequencer)."""

    index: RunIndex
    lock: anyio.Lock

    def discover(self, run_id: str) -> RunEntry: ...

    async def fill(self, entry: RunEntry, upto: int | None, why: str) -> bool: ...

    def claimed_runs(self) -> set[str]: ...

    def settle(self) -> None: ...


class RunSource(Protocol):
    local: bool  # the runs' journals are in this host's journal directory

    def describe(self, run_id: str) -> str:
        """Where the run's events are, for messages: 'the journal <path>', 'the event stream ...'."""

    async def exists(self, run_id: str) -> bool: ...

    async def last_seq(self, run_id: str) -> int:
        """The run's last seq in the source (0: none)."""

    def events_after(self, run_id: str, after: int) -> AsyncGenerator[list[Event], None]:
        """The run's events after seq `after`, in chunks, in order (use with contextlib.aclosing)."""

    async def page(self, run_id: str, after: int, limit: int) -> list[Event]: ...

    async def fold(self, run_id: str) -> RunState | None:
        """The run's full state, or None if the source has no such run."""

    def reader(self, run_id: str, after: int) -> PieceReader: ...

    async def sweep(self, target: SweepTarget) -> None: ...


# ---------------------------------------------------------------------------- the local journal


class JournalPieces:
    __slots__ = ("clean", "offset", "reader")

    def __init__(self, reader: JournalReader, clean: CleanBlocks) -> None:
        self.reader = reader
        self.clean = clean
        self.offset: int | None = None

    async def step(self, after: int, limit: int) -> tuple[Pieces, bool]:
        reader = self.reader
        if self.offset is None:
            self.offset = await anyio.to_thread.run_sync(reader.offset_after, after)
        while True:
            pieces, nxt, truncated = await anyio.to_thread.run_sync(read_encoded, reader, self.clean, self.offset, after, limit)
            if not pieces:
                if nxt == self.offset:
                    # the journal ends, yet the hub delivered up to `limit` (every delivery is journaled
                    # first, so those lines are unreadable or elsewhere): a hole, said out loud
                    return [Hole(after + 1, limit)], True
                self.offset = nxt
                continue
            self.offset = nxt
            return pieces, truncated

    async def aclose(self) -> None:
        return None


class JournalSource:
    """The journal directory of this host (single-host mode)."""

    local = True

    def __init__(self, journal_dir: Path, blocks_dir: Path | None = None) -> None:
        self.journal_dir = journal_dir
        self._dir_mtime = -2
        # blocks found clean by replays or learned by the hub: sent as they are; kept in `blocks_dir`
        self.store = BlockStore(blocks_dir) if blocks_dir is not None else None
        self.clean = CleanBlocks(store=self.store)

    def prune(self, present: set[str]) -> None:
        """Forget the kept blocks of runs whose journals are gone (blocking; at start-up). `present`:
        the runs just indexed (a journal the index skipped loses its blocks: a decode, nothing more)."""
        store = self.store
        if store is not None and (removed := store.prune(present)):
            log.info("removed the kept clean blocks of %d run(s) whose journals are gone, from %s", removed, store.directory)

    def describe(self, run_id: str) -> str:
        return f"the journal {journal_path(self.journal_dir, run_id)}"

    def path(self, run_id: str) -> Path:
        return journal_path(self.journal_dir, run_id)

    async def exists(self, run_id: str) -> bool:
        return journal_path(self.journal_dir, run_id).exists()

    async def last_seq(self, run_id: str) -> int:
        reader = JournalReader(journal_path(self.journal_dir, run_id), run_id)
        last = await anyio.to_thread.run_sync(reader.last_event)
        return last.seq if last is not None else 0

    async def events_after(self, run_id: str, after: int) -> AsyncGenerator[list[Event], None]:
        reader = JournalReader(journal_path(self.journal_dir, run_id), run_id)
        offset = await anyio.to_thread.run_sync(reader.offset_after, after)
        while True:
            events, nxt = await anyio.to_thread.run_sync(reader.read_chunk, offset, after)
            if nxt == offset:
                return
            offset = nxt
            if events:
                after = max(after, events[-1].seq)
                yield events

    async def page(self, run_id: str, after: int, limit: int) -> list[Event]:
        reader = JournalReader(journal_path(self.journal_dir, run_id), run_id)
        return await anyio.to_thread.run_sync(reader.read, after, limit)

    async def fold(self, run_id: str) -> RunState | None:
        return await anyio.to_thread.run_sync(fold_journal, self.journal_dir, run_id)

    def reader(self, run_id: str, after: int) -> PieceReader:
        return JournalPieces(JournalReader(journal_path(self.journal_dir, run_id), run_id), self.clean)

    async def sweep(self, target: SweepTarget) -> None:
        """Safety net for what no message announced: journals created while their `queued` was lost,
        and tails of runs that no publisher's heartbeat claims (e.g. a terminal event that was dropped
        after its writer let go of the journal)."""
        index = target.index
        mtime = dir_mtime_ns(self.journal_dir)
        if mtime != self._dir_mtime:
            self._dir_mtime = mtime
            names = await anyio.to_thread.run_sync(list_run_ids, self.journal_dir)
            gone = index.forget_removed(set(names))
            for run_id in gone:
                self.clean.forget(run_id)
            if gone:
                log.info("%d ended run(s) whose journals were removed are no longer listed (e.g. %s)", len(gone), gone[0])
            for run_id in [rid for rid in names if rid not in index.runs]:
                async with target.lock:
                    if run_id not in index.runs:
                        await target.fill(target.discover(run_id), None, "found in the journal directory")
                        target.settle()
        claimed = target.claimed_runs()
        for entry in list(index.active.values()):
            if entry.run_id in claimed:
                continue
            try:
                size = journal_path(self.journal_dir, entry.run_id).stat().st_size
            except FileNotFoundError:
                continue  # a journal removed by hand: nothing more can come from it
            if size == entry.size_seen:
                continue
            entry.size_seen = size
            async with target.lock:
                await target.fill(entry, None, "journal sweep (no publisher claims the run)")
                target.settle()
