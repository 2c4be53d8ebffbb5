"""The per-run sequencer: each run's events handed on in seq order from its frontier, without gap or
duplicate, whatever the ZeroMQ path loses. A seq gap and a lost tail (a heartbeat's seq above the
frontier) are filled from the journal, once per run for every client; seqs the journal cannot supply
are a hole, said out loud (a `journal_gap` notice between the events before and after it).

It knows no clients: what it delivers goes to its `Delivery` (the fan-out), in order. One deliverer
at a time (`lock`): fills await the journal in a worker thread.

Invariant: for each run the sequencer delivers a gapless seq sequence starting after the run's
frontier at the moment it learnt of the run (its last seq on disk for runs found at start; 0 for
runs learnt of later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from shared.config import GatewayConfig
from shared.errors import JournalError, ServiceUnavailable
from shared.events import Event
from shared.ids import is_valid_run_id
from shared.journal import journal_path
from shared.protocol import encode_frame, gap_notice
from shared.wire import Heartbeat

from .batch import Notice
from .metrics import GatewayStats
from .runindex import RunEntry, RunIndex
from .runsource import JournalSource, RunSource

log = logging.getLogger(__name__)

_WARN_EVERY = 10.0
MAX_GAPS_KEPT = 1000  # per run: holes remembered for later hellos


class Delivery(Protocol):
    """Where delivered events go (the fan-out)."""

    def add(self, ev: Event) -> None:
        """One event, the next of its run."""

    def notice(self, notice: Notice) -> None:
        """A frame that goes after everything added so far (a hole's notice)."""

    def settle(self) -> None:
        """A step of delivery is complete: offer what was added (now, or at the fan-out's next tick)."""


@dataclass
class SeenHeartbeat:
    at: float  # monotonic
    hb: Heartbeat


class Sequencer:
    def __init__(self, journal_dir: Path, cfg: GatewayConfig, stats: GatewayStats, index: RunIndex,
                 out: Delivery, source: RunSource | None = None) -> None:
        self.journal_dir = journal_dir
        self.source: RunSource = source if source is not None else JournalSource(journal_dir)
        self.cfg = cfg
        self.stats = stats
        self.index = index
        self.out = out
        self.publishers: dict[str, SeenHeartbeat] = {}  # publisher id -> its last heartbeat
        # uncontended, taking it does not yield to the event loop (the subscriber yields on its own)
        self.lock = anyio.Lock(fast_acquire=True)
        self.ended_count = 0  # runs ended since start (cursors' cache key)
        self.run_end_listeners: list[Callable[[str], None]] = []  # called with each run id that ends
        self._warned: dict[str, float] = {}

    # ------------------------------------------------------------------ input (call under `lock`)

    async def accept(self, ev: Event) -> None:
        """An event from a publisher (its run id checked)."""
        entry = self.index.get(ev.run_id)
        if entry is None:
            entry = self.discover(ev.run_id)
        if ev.seq <= entry.frontier:
            self.stats.duplicates_dropped += 1
            return
        if ev.seq > entry.frontier + 1:
            if not await self.fill(entry, ev.seq - 1, f"seq gap before {ev.seq}"):
                return  # the source is away: the event waits in it (a later fill delivers it, in order)
            if ev.seq <= entry.frontier:
                return  # the journal had it too
            if ev.seq > entry.frontier + 1:
                missing = ev.seq - entry.frontier - 1
                self.stats.gap_events_unfilled += missing
                hint = ("is the gateway reading the runner's journal directory? see /healthz" if self.source.local
                        else "past the stream's retention?")
                self.warn(
                    ev.run_id,
                    f"run {ev.run_id}: events {entry.frontier + 1}..{ev.seq - 1} are not in "
                    f"{self.source.describe(ev.run_id)} ({hint}); delivering the live events without them",
                )
                self._hole(entry, entry.frontier + 1, ev.seq - 1)
        self._deliver(entry, ev)

    async def heartbeat(self, hb: Heartbeat) -> None:
        """A publisher's heartbeat: a run's seq above its frontier is a lost tail, filled now."""
        self.publishers[hb.runner_id] = SeenHeartbeat(time.monotonic(), hb)
        for run_id, last in hb.runs.items():
            if not is_valid_run_id(run_id):
                continue
            entry = self.index.get(run_id)
            if entry is None:
                entry = self.discover(run_id)
            if last > entry.frontier and not entry.ended:
                before = entry.frontier
                await self.fill(entry, last, f"lost tail: heartbeat of {hb.runner_id} says seq {last}")
                if entry.frontier < last:
                    hint = (f"journal directory mismatch? {hb.runner_id} writes to {hb.journal_dir}" if self.source.local
                            else "the stream lags its writer?")
                    self.warn(run_id, f"run {run_id}: {hb.runner_id} reports seq {last} but "
                                      f"{self.source.describe(run_id)} ends at {entry.frontier} ({hint})")
                elif before < entry.frontier:
                    self.stats.lost_tails_filled += 1

    def discover(self, run_id: str) -> RunEntry:
        self.stats.runs_discovered += 1
        log.debug("run %s: first seen; delivering it from its first event", run_id)
        return self.index.new_entry(run_id)

    async def fill(self, entry: RunEntry, upto: int | None, why: str) -> bool:
        """Deliver the run's events in the source after its frontier, through `upto` (None: to the end).
        False when the source cannot be read now (the event stream unavailable): nothing was skipped,
        the caller tries again later. A chunk the source cannot decode is logged; what it held is a hole."""
        filled = 0
        ok = True
        try:
            async with aclosing(self.source.events_after(entry.run_id, entry.frontier)) as chunks:
                async for events in chunks:
                    for ev in events:
                        if ev.seq <= entry.frontier:
                            continue
                        if ev.seq != entry.frontier + 1:
                            self.stats.gap_events_unfilled += ev.seq - entry.frontier - 1
                            self.warn(entry.run_id, f"run {entry.run_id}: {self.source.describe(entry.run_id)} lacks seq "
                                                    f"{entry.frontier + 1}..{ev.seq - 1} (corrupt lines?)")
                            self._hole(entry, entry.frontier + 1, ev.seq - 1)
                        self._deliver(entry, ev)
                        filled += 1
                    if entry.ended or (upto is not None and entry.frontier >= upto):
                        break
        except ServiceUnavailable as e:
            ok = False
            self.warn(f"source/{entry.run_id}", f"run {entry.run_id}: cannot read {self.source.describe(entry.run_id)} "
                                                f"({why}): {e}; trying again with the run's next message or sweep")
        except JournalError as e:
            self.warn(f"source/{entry.run_id}", f"run {entry.run_id}: {e} ({why})")
        if filled:
            self.stats.gaps_filled += 1
            self.stats.gap_events_filled += filled
            log.info("run %s: %d event(s) filled from %s (%s)", entry.run_id, filled,
                     "the journal" if self.source.local else "the event stream", why)
        return ok

    def _deliver(self, entry: RunEntry, ev: Event) -> None:
        self.index.apply(entry, ev)
        if ev.is_terminal:
            self.ended_count += 1
            for listener in self.run_end_listeners:
                listener(ev.run_id)
        self.out.add(ev)

    def _hole(self, entry: RunEntry, lo: int, hi: int) -> None:
        """Seqs lo..hi are about to be skipped on the live path (the journal cannot supply them): the
        run's live clients are told in order, between the events before and after the hole. Clients still
        replaying learn it from the journal themselves (their merge stops at the jump and replays)."""
        self.note_gap(entry.run_id, lo, hi)
        self.out.notice(Notice(entry.run_id, self.gap_frame(entry.run_id, lo, hi)))

    # ------------------------------------------------------------------ the source's safety net

    async def sweep(self) -> None:
        """The source's sweep (runs and tails no live message announced)."""
        await self.source.sweep(self)

    def settle(self) -> None:
        self.out.settle()

    def claimed_runs(self) -> set[str]:
        """Runs that a publisher with a fresh heartbeat lists (owned now, or ended in the last
        ENDED_RUNS_KEPT_S seconds: their tails are covered by the heartbeat's seq). A publisher that
        said it was stopping claims nothing: the sweep takes over its runs' tails at once."""
        now = time.monotonic()
        out: set[str] = set()
        for seen in self.publishers.values():
            if seen.hb.stopping:
                continue
            if now - seen.at <= max(self.cfg.runner_stale_after, 3 * seen.hb.interval):
                out.update(seen.hb.runs)
        return out

    async def ensure_run(self, run_id: str) -> RunEntry | None:
        """The run's entry; a journal not seen yet is taken in (and delivered) now."""
        entry = self.index.get(run_id)
        if entry is not None:
            return entry
        if not await self.source.exists(run_id):
            return None
        async with self.lock:
            entry = self.index.get(run_id)
            if entry is None:
                entry = self.discover(run_id)
                await self.fill(entry, None, "requested by a client")
                self.out.settle()
        return entry

    def journal_missing(self, run_id: str) -> str | None:
        """None if the run's journal exists in our directory; else why not, naming the file and the
        publishers that write elsewhere. (Runs are learnt of from PUB events and heartbeats too, so a
        run's journal can be in another directory: seed 000's mismatch.) In cluster mode every run is
        in the event stream: None."""
        if not self.source.local:
            return None
        path = journal_path(self.journal_dir, run_id)
        if path.exists():
            return None
        claims = [f"{seen.hb.service} {pid} (writes journals to {seen.hb.journal_dir})"
                  for pid, seen in self.publishers.items() if run_id in seen.hb.runs]
        elsewhere = [f"{seen.hb.service} {pid} writes journals to {seen.hb.journal_dir}"
                     for pid, seen in self.publishers.items()
                     if Path(seen.hb.journal_dir).resolve() != self.journal_dir.resolve()]
        source = f"reported by {', '.join(claims)}" if claims else "learnt of from a publisher's messages"
        mismatch = f"JOURNAL DIRECTORY MISMATCH: {'; '.join(elsewhere)}; " if elsewhere else "journal directory mismatch? "
        msg = (f"run {run_id} was {source}, but its journal {path} does not exist in the gateway's journal "
               f"directory {self.journal_dir}: {mismatch}point every service at one config/RUNWIRE_HOME (see /healthz)")
        self.warn(f"journal-missing/{run_id}", msg)
        return msg

    # ------------------------------------------------------------------ holes

    def note_gap(self, run_id: str, lo: int, hi: int) -> None:
        """Remember a hole in a run's journal (so later hellos can say recovered=false); count it once."""
        entry = self.index.get(run_id)
        if entry is None:
            self.stats.journal_gaps += 1
            return
        if (lo, hi) not in entry.gaps:
            if len(entry.gaps) < MAX_GAPS_KEPT:
                entry.gaps.append((lo, hi))
            self.stats.journal_gaps += 1

    def known_gaps(self, run_id: str, after: int) -> list[tuple[int, int]]:
        """Holes already found in the run's journal that lie after seq `after`."""
        entry = self.index.get(run_id)
        return [g for g in entry.gaps if g[1] > after] if entry is not None else []

    def gap_frame(self, run_id: str, lo: int, hi: int) -> bytes:
        """The `journal_gap` frame (the one error frame after which the stream goes on)."""
        if not self.source.local:
            message = (f"events {lo}..{hi} of run {run_id} are missing from {self.source.describe(run_id)} "
                       "(past its retention, `cluster.stream_max_age`?)")
            return encode_frame(gap_notice(run_id, lo, hi, message))
        path = journal_path(self.journal_dir, run_id)
        why = ("corrupt line skipped; see the gateway log" if path.exists()
               else "the file does not exist: journal directory mismatch? see /healthz")
        message = f"events {lo}..{hi} of run {run_id} are missing from the journal {path} ({why})"
        return encode_frame(gap_notice(run_id, lo, hi, message))

    # ------------------------------------------------------------------ reporting

    def warn(self, key: str, msg: str) -> None:
        """Log a warning at most once per _WARN_EVERY seconds per key (a flood says it once)."""
        now = time.monotonic()
        if now - self._warned.get(key, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[key] = now
            if len(self._warned) > 10_000:
                self._warned.clear()
            log.warning("%s", msg)
