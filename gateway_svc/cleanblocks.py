"""Journal blocks this gateway has read and found clean, remembered so that a replay can send their
lines as they are.

A replay's cost is mostly decoding each journal line with every check (~0.6 us an event) and
encoding it back (~0.3 us), in one interpreter with the gateway's live path. A block of complete
lines is *clean* when its lines are exactly what that decode and encode would send: every line an
event of the run, the seqs running on by one, no run end but maybe on the last line, and the
re-encoded events byte for byte the lines. A replay that decodes a block anyway learns this for
nothing (one comparison); it remembers the block's place, seqs and SHA-256. A later replay that
finds the same bytes there (same digest) sends them without decoding, the same frames to the byte;
any other bytes are decoded as before, and a remembered block whose bytes changed is said out loud
and the run's memory dropped (journals are append-only: a change is an edit or a damaged disk).

Bounded: at most MAX_BLOCKS blocks, runs dropped least recently used first."""

from __future__ import annotations

import bisect
import hashlib
import logging
import operator
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import msgspec

from shared.events import PIPELINE_STAGE, Event

from .batch import Batch

log = logging.getLogger(__name__)

MAX_BLOCKS = 100_000  # ~200 bytes each here; of 128 KiB blocks, ~12 GiB of journals

_seq_of = operator.attrgetter("seq")


class CleanBlock(NamedTuple):
    offset: int
    length: int
    first_seq: int
    n: int  # lines, one event each, seqs first_seq .. first_seq + n - 1
    terminal: bool  # the last line is the run's end
    digest: bytes
    learned: bool = False  # from what the hub delivered (Learner), not from reading the journal


GIL_KEPT = 2047  # hashlib lets go of the GIL for an update of 2048 bytes or more


def digest(block: bytes) -> bytes:
    """SHA-256 of a block, hashed in pieces small enough that hashlib keeps the GIL: a worker thread
    that lets go of it waits to get it back from the busy event loop, which cost more than the hash.
    Measured (bench e2e --only replay, runs interleaved, medians of 4): a 1M-event replay of known
    blocks ~1.45M/s letting go, ~1.83M/s keeping it; the first replay after a restart ~355k/s, ~433k/s."""
    h = hashlib.sha256()
    hash_update(h, block)
    return h.digest()


def hash_update(h: Any, data: bytes) -> None:
    """h.update(data), keeping the GIL (see digest; on the event loop's thread, letting go of it would
    make the loop wait for a replay's worker thread)."""
    if len(data) <= GIL_KEPT:
        h.update(data)
        return
    view = memoryview(data)
    for i in range(0, len(view), GIL_KEPT):
        h.update(view[i:i + GIL_KEPT])


def as_array(lines: bytes) -> bytes:
    """Complete JSON lines (each ending with a newline) as one JSON array of them."""
    return b"[" + lines[:-1].replace(b"\n", b",") + b"]"


_PIPELINE = b'"stage":"' + PIPELINE_STAGE.encode() + b'"'  # inside a JSON string its quotes are escaped


def check(block: bytes, offset: int, events: Sequence[Event], encoded: bytes | None = None) -> CleanBlock | None:
    """The block of complete lines read at `offset` as a clean block, given its decoded events (every
    one, none filtered: see JournalReader.decode), or None if it is not clean. `encoded`: the events
    as msgspec encodes them, if the caller has it."""
    n = len(events)
    if n == 0:
        return None
    first = events[0].seq
    if events[-1].seq != first + n - 1 or list(map(_seq_of, events)) != list(range(first, first + n)):
        return None
    if (encoded if encoded is not None else msgspec.json.encode(events)) != as_array(block):
        return None  # a line skipped (corrupt, foreign), blank, or not as msgspec writes it (spacing, unknown fields)
    last_line = block.rfind(b"\n", 0, len(block) - 1) + 1
    if block.find(_PIPELINE, 0, last_line) >= 0 and any(ev.is_terminal for ev in events[:-1]):
        return None  # the run's end before the last line (the search skips the usual block at C speed)
    return CleanBlock(offset, len(block), first, n, events[-1].is_terminal, digest(block))


class BlockKeeper(Protocol):
    """Where remembered blocks are kept across restarts (blockstore.BlockStore)."""

    errors: int

    def load(self, run_id: str) -> list[CleanBlock]: ...

    def append(self, run_id: str, blocks: Iterable[CleanBlock]) -> None: ...

    def forget(self, run_id: str) -> None: ...


class _Run:
    __slots__ = ("blocks", "loaded", "offsets")

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.blocks: list[CleanBlock] = []
        self.loaded = False  # what the store kept of the run is in (or there is no store)


class CleanBlocks:
    """Per run, its clean blocks by offset. Shared by the replays' worker threads (a lock). With a
    `store` (a BlockKeeper), what is remembered is also kept on disk, and a run not in memory (after
    a restart, or dropped as least recently used) is loaded from it when a replay looks."""

    def __init__(self, max_blocks: int = MAX_BLOCKS, store: BlockKeeper | None = None, max_runs: int = 10_000) -> None:
        self.max_blocks = max_blocks
        self.max_runs = max_runs
        self.store = store
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()
        self.hits = 0  # blocks sent as they are
        self.changed = 0  # remembered blocks found changed
        self.loaded = 0  # blocks loaded from the store

    def __len__(self) -> int:
        return self._count

    def find(self, run_id: str, offset: int) -> CleanBlock | None:
        """The remembered block that holds `offset` (blocking: may load the run's from the store)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                self._runs.move_to_end(run_id)
        if run is None and self.store is None:
            return None
        if run is None or not run.loaded:
            run = self._load(run_id)
        with self._lock:
            i = bisect.bisect_right(run.offsets, offset) - 1
            if i < 0:
                return None
            b = run.blocks[i]
            return b if offset < b.offset + b.length else None

    def _load(self, run_id: str) -> _Run:
        kept = self.store.load(run_id) if self.store is not None else []
        with self._lock:
            run = self._run(run_id)
            if not run.loaded:
                run.loaded = True
                for block in kept:
                    if self._insert(run, block):
                        self.loaded += 1
            return run

    def add(self, run_id: str, block: CleanBlock) -> None:
        with self._lock:
            added = self._insert(self._run(run_id), block)
        if added and self.store is not None:
            self.store.append(run_id, [block])

    def _run(self, run_id: str) -> _Run:
        """The run's entry, made the most recently used (under the lock)."""
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = _Run()
            run.loaded = self.store is None
            while len(self._runs) > self.max_runs:
                self._drop_oldest()
        self._runs.move_to_end(run_id)
        return run

    def _drop_oldest(self) -> None:
        _, dropped = self._runs.popitem(last=False)  # the least recently used run (kept in the store)
        self._count -= len(dropped.blocks)

    def _insert(self, run: _Run, block: CleanBlock) -> bool:
        """Under the lock; False if not added (the memory is full of this run, or overlapped)."""
        while self._count >= self.max_blocks and len(self._runs) > 1:
            self._drop_oldest()  # never `run`: _run() made it the most recently used
        if self._count >= self.max_blocks:
            return False  # one run fills the memory: the rest of it is decoded each time
        offsets, blocks = run.offsets, run.blocks
        i = bisect.bisect_right(offsets, block.offset)
        if i > 0 and blocks[i - 1].offset + blocks[i - 1].length > block.offset:
            return False  # overlaps the one before (remembered by another replay): keep that one
        if i < len(blocks) and block.offset + block.length > blocks[i].offset:
            return False
        offsets.insert(i, block.offset)
        blocks.insert(i, block)
        self._count += 1
        return True

    def hit(self) -> None:
        with self._lock:
            self.hits += 1

    def forget(self, run_id: str) -> None:
        """Forget the run's blocks, in memory and in the store (its journal was removed)."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is not None:
                self._count -= len(run.blocks)
        if self.store is not None:
            self.store.forget(run_id)

    def changed_under(self, run_id: str, where: str, block: CleanBlock, found: int) -> None:
        """The bytes at a remembered block (`found` of them there) are not those it was made of: say
        so, forget the run's."""
        self.forget(run_id)
        with self._lock:
            self.changed += 1
        span = f"bytes {block.offset}-{block.offset + block.length} (seqs {block.first_seq}-{block.first_seq + block.n - 1})"
        if found == 0:
            log.info("%s is gone (or no longer holds %s): its remembered blocks are forgotten", where, span)
        elif block.learned:
            # not an alarm: a line the live path never saw (a torn line of a killed writer) moves every
            # place after it
            log.info("%s does not hold at %s the lines this gateway delivered: they are read and checked", where, span)
        else:
            log.warning("%s changed at %s since this gateway read them: they are decoded and checked again", where, span)


class _Learning:
    __slots__ = ("first", "hash", "length", "n", "next", "offset")

    def __init__(self) -> None:
        self.offset = 0  # where the block being made starts in the journal
        self.first = 1
        self.next = 1  # the seq expected next
        self.n = 0
        self.length = 0
        self.hash = hashlib.sha256()


class Learner:
    """Clean blocks learned from what the hub delivers (Fanout.flush), so that even a run's first
    replay or resume sends lines as they are. Every event of a run reaches the hub once, in order, and
    is in the journal before (journal-before-publish), written by the runner or the scheduler as
    msgspec encodes it, the encoding the fan-out makes of every event anyway. So a run followed from
    seq 1 with no hole has, from byte 0, exactly the lines the hub encoded: each ~`block_bytes` of
    them become a block, hashed here (~0.15 us an event). A replay checks the file's bytes against the
    digest before it sends them: a wrong guess (a line the hub never saw, e.g. a torn one, moves
    every place after it) costs a read, then the lines are decoded as usual."""

    def __init__(self, clean: CleanBlocks, block_bytes: int, max_runs: int = 10_000) -> None:
        self.clean = clean
        self.block_bytes = block_bytes
        self.max_runs = max_runs
        self._runs: OrderedDict[str, _Learning] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def feed(self, batch: Batch) -> None:
        events, parts = batch.events, batch.parts
        for run_id, idx in batch.by_run.items():
            first = events[idx[0]].seq
            st = self._runs.get(run_id)
            if st is None:
                if first != 1:
                    continue  # a run followed from its middle: where its lines lie is not known
                st = self._runs[run_id] = _Learning()
                if len(self._runs) > self.max_runs:
                    self._runs.popitem(last=False)  # runs that never ended (their writers killed)
            else:
                self._runs.move_to_end(run_id)
            # the hub delivers a run's seqs rising, each once (the sequencer): consecutive if the ends say so
            if first != st.next or events[idx[-1]].seq - first != len(idx) - 1:
                del self._runs[run_id]  # a hole: the lines after it are not known to be where counted
                continue
            n, nbytes = batch.run_size(run_id)
            if run_id not in batch.terminal_runs and st.length + nbytes < self.block_bytes:
                hash_update(st.hash, batch.run_lines(run_id))
                st.n += n
                st.length += nbytes
                st.next += n
                continue
            for i in idx:  # the block ends in this part
                line = parts[i] + b"\n"
                hash_update(st.hash, line)
                st.n += 1
                st.length += len(line)
                st.next += 1
                ended = events[i].is_terminal
                if ended or st.length >= self.block_bytes:
                    self.clean.add(run_id, CleanBlock(st.offset, st.length, st.first, st.n, ended, st.hash.digest(), True))
                    st.offset += st.length
                    st.first = st.next
                    st.n = st.length = 0
                    st.hash = hashlib.sha256()
                if ended:
                    del self._runs[run_id]  # nothing follows a run's end
                    break
