"""The gateway's in-memory index of runs, built from the journal directory at start (first lines and
last line of each journal; a full fold for runs not ended) and kept current from the events the hub
delivers. Each entry also holds the hub's `frontier`: the last seq fanned out to clients. The index also
links each run to its re-runs, from the re-runs' `queued` events (`rerun_of`), so a run's detail lists them.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

import msgspec

from shared.events import Event
from shared.journal import JournalReader, journal_path, list_run_ids
from shared.runstate import RunState, fold

log = logging.getLogger(__name__)

_DETAIL_CACHE = 256  # folded states of ended runs kept for GET /api/runs/{id}


def timestamp_us(ts: str) -> int | None:
    """Microseconds since the epoch of an RFC 3339 timestamp, or None if it is not one."""
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp() * 1_000_000)


def fold_open_run(entry: RunEntry, events: Iterable[Event]) -> RunEntry:
    """An open run's entry from every event it has (a journal's, or the event stream's): its state, its
    frontier, and the seqs missing between them (corrupt journal lines, events past the stream's
    retention), known before any client says hello."""
    state = RunState(run_id=entry.run_id)
    for ev in events:
        if ev.seq > state.last_seq + 1:
            entry.gaps.append((state.last_seq + 1, ev.seq - 1))
        state.apply(ev)
    entry.state = state
    entry.frontier = state.last_seq
    return entry


class RunEntry:
    """One run as the gateway knows it: a summary state and the hub's delivery frontier."""

    __slots__ = ("run_id", "created_us", "frontier", "state", "full", "discovery", "size_seen", "gaps")

    def __init__(self, run_id: str, discovery: int) -> None:
        self.run_id = run_id
        self.created_us: int | None = None  # the `queued` event's timestamp: when the run came to exist
        self.frontier = 0  # last seq delivered to clients by the hub
        self.state = RunState(run_id=run_id)
        self.full = True  # state folded from every event (else: a summary from the first/last lines)
        self.discovery = discovery  # order in which this gateway learnt of the run
        self.size_seen = -1  # journal size at the last sweep (runs no publisher claims)
        self.gaps: list[tuple[int, int]] = []  # holes (first, last missing seq) found in its journal so far

    @property
    def ended(self) -> bool:
        return self.state.ended

    def apply(self, ev: Event) -> None:
        if self.created_us is None:
            self.created_us = timestamp_us(ev.timestamp)
        self.frontier = ev.seq
        self.state.apply(ev)


def scan_run(journal_dir: Path, run_id: str, discovery: int) -> RunEntry | None:
    """An entry for a run found on disk at start: frontier = its last seq in the journal now.

    Runs not ended are folded in full (their live state is updated event by event afterwards); ended
    runs get a summary from the first two lines and the last (a detail request folds them then).
    """
    path = journal_path(journal_dir, run_id)
    reader = JournalReader(path, run_id)
    head = reader.head()
    if not head:
        return None  # no complete line yet: the creator is mid-write; discovery finds it later
    last = reader.last_event()
    if last is None:
        return None
    entry = RunEntry(run_id, discovery)
    entry.created_us = timestamp_us(head[0].timestamp)
    if not last.is_terminal:
        return fold_open_run(entry, (ev for chunk in reader.iter_chunks() for ev in chunk))  # gaps: corrupt lines
    state = RunState(run_id=run_id)
    for ev in head:
        if ev.seq < last.seq:
            state.apply(ev)
    state.apply(last)
    entry.state = state
    entry.full = False
    entry.frontier = last.seq
    return entry


class RunIndex:
    """Every run in the journal directory, ordered by creation time (then run id)."""

    def __init__(self, journal_dir: Path) -> None:
        self.journal_dir = journal_dir
        self.runs: dict[str, RunEntry] = {}
        self.active: dict[str, RunEntry] = {}  # not ended
        self._order: list[tuple[int, str]] = []  # (created_us, run_id), sorted
        self._discoveries = 0
        self._details: OrderedDict[str, RunState] = OrderedDict()
        self.discovered_order: list[str] = []  # run ids by discovery number (index = number - 1)
        self.reruns: dict[str, list[str]] = {}  # run id -> the runs whose queued event names it as rerun_of

    # -- building

    def load(self) -> int:
        """Scan the directory (blocking: call in a worker thread at start). Returns the run count."""
        for run_id in list_run_ids(self.journal_dir):
            if run_id in self.runs:
                continue
            entry = scan_run(self.journal_dir, run_id, self._next_discovery())
            if entry is None:
                self._discoveries -= 1
                continue
            self._add(entry)
        return len(self.runs)

    def _next_discovery(self) -> int:
        self._discoveries += 1
        return self._discoveries

    def next_discovery(self) -> int:
        """The number of the next run learnt of (for an entry built elsewhere, then `add`ed)."""
        return self._next_discovery()

    def add(self, entry: RunEntry) -> None:
        """An entry scanned from another source (cluster mode's event stream), numbered by next_discovery."""
        self._add(entry)

    @property
    def discoveries(self) -> int:
        return self._discoveries

    def _add(self, entry: RunEntry) -> None:
        self.runs[entry.run_id] = entry
        self.discovered_order.append(entry.run_id)
        if not entry.ended:
            self.active[entry.run_id] = entry
        if entry.created_us is not None:
            bisect.insort(self._order, (entry.created_us, entry.run_id))
        self._link(entry)

    def _link(self, entry: RunEntry) -> None:
        original = entry.state.rerun_of
        if original is not None:
            later = self.reruns.setdefault(original, [])
            if entry.run_id not in later:
                bisect.insort(later, entry.run_id)

    def reruns_of(self, run_id: str) -> list[str]:
        return list(self.reruns.get(run_id, ()))

    def new_entry(self, run_id: str) -> RunEntry:
        """A run learnt of after start: frontier 0, so the hub delivers it from its first event."""
        entry = RunEntry(run_id, self._next_discovery())
        self._add(entry)
        return entry

    def get(self, run_id: str) -> RunEntry | None:
        return self.runs.get(run_id)

    def discovered_after(self, number: int) -> list[str]:
        return self.discovered_order[number:]

    # -- updating

    def apply(self, entry: RunEntry, ev: Event) -> None:
        had_created = entry.created_us is not None
        entry.apply(ev)
        if not had_created and entry.created_us is not None:
            bisect.insort(self._order, (entry.created_us, entry.run_id))
        if ev.event == "queued":
            self._link(entry)
        if ev.is_terminal:
            self.active.pop(entry.run_id, None)
            if entry.full:
                # the full state moves to the detail cache; the index keeps a summary
                self._remember_detail(entry.state)
                summary = msgspec.structs.replace(entry.state, stages={})
                entry.state = summary
                entry.full = False

    # -- reading

    def created_after(self, threshold_us: int) -> list[str]:
        """Run ids created after the threshold, oldest first."""
        i = bisect.bisect_right(self._order, (threshold_us, "\U0010ffff"))
        return [rid for _, rid in self._order[i:]]

    def recent_ended(self, threshold_us: int) -> list[str]:
        return [rid for rid in self.created_after(threshold_us) if self.runs[rid].ended]

    def newest_first(self) -> Iterator[RunEntry]:
        undated = [e for e in self.runs.values() if e.created_us is None]
        yield from undated
        for _, rid in reversed(self._order):
            yield self.runs[rid]

    def forget_removed(self, present: set[str]) -> list[str]:
        """Drop ended runs whose journals are no longer in the directory (removed: e.g. old probe
        journals); the journal is the truth, so the lists stop showing them. Runs not ended stay: their
        journal may be about to appear, and a missing one is reported where it is needed (streams,
        /healthz). Discovery numbers are kept, so clients' "discovered after" positions stay valid."""
        # `present` was listed a moment ago: a run that ended since then may be missing from it, so each
        # candidate's file is looked for once more
        gone = [rid for rid, entry in self.runs.items()
                if entry.ended and rid not in present and not journal_path(self.journal_dir, rid).exists()]
        for rid in gone:
            entry = self.runs.pop(rid)
            if entry.created_us is not None:
                i = bisect.bisect_left(self._order, (entry.created_us, rid))
                if i < len(self._order) and self._order[i] == (entry.created_us, rid):
                    del self._order[i]
            self._details.pop(rid, None)
        return gone

    def cached_detail(self, run_id: str) -> RunState | None:
        """The full state of a run if at hand: live for runs not ended, else from the cache."""
        entry = self.runs.get(run_id)
        if entry is not None and entry.full:
            return entry.state
        cached = self._details.get(run_id)
        if cached is not None:
            self._details.move_to_end(run_id)
        return cached

    def remember_detail(self, state: RunState) -> None:
        if state.ended:
            self._remember_detail(state)

    def _remember_detail(self, state: RunState) -> None:
        self._details[state.run_id] = state
        self._details.move_to_end(state.run_id)
        while len(self._details) > _DETAIL_CACHE:
            self._details.popitem(last=False)


def fold_journal(journal_dir: Path, run_id: str) -> RunState | None:
    """A run's full state from its journal, or None if it has none (blocking: for a worker thread)."""
    path = journal_path(journal_dir, run_id)
    if not path.exists():
        return None
    reader = JournalReader(path, run_id)
    return fold(run_id, (ev for chunk in reader.iter_chunks() for ev in chunk))


def dir_mtime_ns(journal_dir: Path) -> int:
    try:
        return os.stat(journal_dir).st_mtime_ns
    except FileNotFoundError:
        return -1
