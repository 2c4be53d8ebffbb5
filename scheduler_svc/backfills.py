"""Backfills: a schedule's slots in a window, planned once (backfill_plan.py) and run as the slots' own
runs, at most `max_parallel` of a backfill's runs queued or running at once.

A backfill is durable: its window and its whole plan (slot -> run id) go into the state file in one
transaction before the request is answered; each run is then queued by the meter (the one task here)
when the backfill has room, and marked queued in the state file after its journal exists. A scheduler
that restarts carries on with the runs not yet queued: a run whose journal exists (queued just before a
crash) is marked, never queued again, since its id is fixed by the plan and its journal is created
exclusively. Progress is counted from the run book (journals are the truth for how runs went).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import anyio
import anyio.abc

from shared.backfill import (
    MAX_SLOTS,
    check_max_parallel,
    check_policy,
    check_window,
    parse_moment,
)
from shared.config import Settings
from shared.control import Backfill, ListBackfills
from shared.errors import BadParams, JournalError, NotFound
from shared.events import now_timestamp
from shared.ids import new_run_id
from shared.journal import journal_path, list_run_ids
from shared.replies import BackfillList, BackfillProgress, BackfillResult

from .backfill_plan import decide, slot_runs
from .journaling import Journaling
from .runbook import RunBook
from .runs import RunRecord
from .schedules import ScheduleDriver, ScheduleEntry
from .slots import iso_utc, slot_run_id
from .state import BackfillRow, BackfillRunRow

log = logging.getLogger(__name__)

_LOOK_EVERY = 0.25  # seconds between looks at an open backfill's runs
_RETRY_AFTER = 5.0  # seconds before a run that could not be queued is tried again


class BackfillStore(Protocol):
    """Where backfills are kept: this host's state file (state.StateStore), or in cluster mode the
    cluster's database (cluster_backfills.py)."""

    async def load_backfills(self) -> list[tuple[BackfillRow, list[BackfillRunRow]]]: ...
    async def add_backfill(self, head: BackfillRow, runs: list[BackfillRunRow]) -> None: ...
    async def backfill_run_queued(self, backfill_id: str, pos: int) -> None: ...
    async def backfill_done(self, backfill_id: str) -> None: ...


Lookup = tuple[Callable[[str], RunRecord | None], Callable[[str], bool]]  # (what is known of a run, whether it exists)


@dataclass
class OpenBackfill:
    head: BackfillRow
    runs: list[BackfillRunRow]
    retry_at: float = 0.0  # anyio time
    counted: dict[str, int] = field(default_factory=dict)


class Backfills:
    """Single-host backfills: runs are known from the run book and the journal directory. Cluster mode
    (cluster_backfills.py) answers the four hooks below from the cluster's database instead."""

    def __init__(self, book: RunBook, settings: Settings, state: BackfillStore, journaling: Journaling,
                 schedules: ScheduleDriver) -> None:
        self.book = book
        self.settings = settings
        self.state = state
        self.journaling = journaling
        self.schedules = schedules
        self.all: dict[str, OpenBackfill] = {}  # oldest first
        self._wake = anyio.Event()

    # ------------------------------------------------------------------------------------ requests

    async def backfill(self, req: Backfill) -> BackfillResult:
        e = self.schedules.entries.get(req.schedule)
        if e is None:
            known = ", ".join(sorted(self.schedules.entries)) or "none"
            raise NotFound(f"schedule {req.schedule!r} not found (configured: {known})")
        policy = check_policy(req.policy)
        max_parallel = check_max_parallel(req.max_parallel)
        start = parse_moment(req.start, e.clock.tz, "from")
        end = parse_moment(req.end, e.clock.tz, "to")
        check_window(start, end)
        slots = self._slots(e, start, end)
        pending = self._pending_slots(e.name)
        of_run, exists = await self._slot_lookup(e.name, slots)
        decisions = [decide(s, e.name, policy, slot_runs(slot_run_id(s, e.name), of_run, exists), pending.get(iso_utc(s)))
                     for s in slots]
        runs = [d for d in decisions if d.action == "run"]
        result = BackfillResult(dry_run=req.dry_run, schedule=e.name, policy=policy, slots=decisions, progress=None)  # type: ignore[arg-type]
        if req.dry_run or not runs:
            log.info("backfill of %s %s .. %s (policy %s)%s: %d of %d slots would run", e.name, iso_utc(start),
                     iso_utc(end), policy, " dry run" if req.dry_run else "", len(runs), len(decisions))
            return result
        head = BackfillRow(id=new_run_id("bf-"), schedule=e.name, start=iso_utc(start), end=iso_utc(end),
                           policy=policy, max_parallel=max_parallel, created_at=now_timestamp(self.settings.tz),
                           done=False)
        rows = [BackfillRunRow(pos=i, slot=d.slot, run_id=d.run_id or "", rerun_of=d.rerun_of, reason=d.reason,
                               queued=False) for i, d in enumerate(runs)]
        await self.state.add_backfill(head, rows)
        self.all[head.id] = bf = OpenBackfill(head, rows)
        self._wake.set()
        log.info("backfill %s of schedule %s: %d runs for %s .. %s (policy %s, %d at once)", head.id, e.name,
                 len(rows), head.start, head.end, policy, max_parallel)
        result.progress = self._progress(bf)
        return result

    def listing(self, req: ListBackfills) -> BackfillList:
        limit = max(1, min(req.limit, 1000))
        return BackfillList(backfills=[self._progress(bf) for bf in reversed(self.all.values())][:limit])

    def _slots(self, e: ScheduleEntry, start: datetime, end: datetime) -> list[datetime]:
        now = self.schedules.clock.now()
        until = min(end, now)  # later slots are the schedule's to fire
        slots, more = e.clock.slots_between(start - timedelta(microseconds=1), until, MAX_SLOTS)
        if more:
            raise BadParams(f"from {iso_utc(start)} to {iso_utc(until)}: more than {MAX_SLOTS} slots of schedule "
                            f"{e.name} ({e.clock.spec}); backfill a shorter window")
        return slots

    def _pending_slots(self, schedule: str) -> dict[str, str]:
        """slot (ISO UTC) -> the open backfill of that schedule that has its run still to queue."""
        return {r.slot: bf.head.id for bf in self.all.values() if bf.head.schedule == schedule and not bf.head.done
                for r in bf.runs if not r.queued}

    # ------------------------------------------------------------------------------------ the hooks

    async def _slot_lookup(self, schedule: str, slots: list[datetime]) -> Lookup:
        """How the slots' runs are known: the run book, and which journals exist (one directory scan,
        off the event loop: a window may hold 10,000 slots)."""
        on_disk = set(await anyio.to_thread.run_sync(list_run_ids, self.settings.journal_dir))
        return self.book.get, on_disk.__contains__

    async def _existing(self, run_ids: list[str]) -> set[str]:
        """Which of these runs exist (their journal was created)."""
        jdir = self.settings.journal_dir
        return await anyio.to_thread.run_sync(lambda: {r for r in run_ids if journal_path(jdir, r).exists()})

    def _record(self, run_id: str) -> RunRecord | None:
        """What is known of a backfill's queued run (None: it is gone: counted cancelled)."""
        return self.book.get(run_id)

    async def _queue_run(self, e: ScheduleEntry, r: BackfillRunRow, trigger: dict[str, Any], msg: str) -> bool:
        """Queue the run; False when another writer made it first (its journal is created exclusively:
        a JournalError when it exists, which the caller checks)."""
        await self.journaling.queue_run(e.cfg.pipeline, e.params, trigger, r.run_id, msg)
        return True

    # ------------------------------------------------------------------------------------ progress

    def _progress(self, bf: OpenBackfill) -> BackfillProgress:
        counts = {"pending": 0, "queued": 0, "running": 0, "success": 0, "failure": 0, "cancelled": 0}
        for r in bf.runs:
            rec = self._record(r.run_id) if r.queued else None
            status = "pending" if not r.queued else (rec.status if rec is not None else "cancelled")
            counts[status] += 1
        h = bf.head
        return BackfillProgress(backfill_id=h.id, schedule=h.schedule, start=h.start, end=h.end, policy=h.policy,  # type: ignore[arg-type]
                                max_parallel=h.max_parallel, created_at=h.created_at, done=h.done,
                                total=len(bf.runs), **counts)

    # ------------------------------------------------------------------------------------ the meter

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load the backfills (after the run book is recovered), then queue their runs as room frees up."""
        await self._load()
        open_ = [bf for bf in self.all.values() if not bf.head.done]
        if open_:
            log.info("backfills carried on after the restart: %s", ", ".join(
                f"{bf.head.id} ({sum(not r.queued for r in bf.runs)} of {len(bf.runs)} runs to queue)" for bf in open_))
        task_status.started()
        while True:
            await self.meter()
            busy = any(not bf.head.done for bf in self.all.values())
            with anyio.move_on_after(_LOOK_EVERY if busy else math.inf):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()

    async def _load(self) -> None:
        for head, rows in await self.state.load_backfills():
            self.all[head.id] = OpenBackfill(head, rows)
        for bf in self.all.values():
            if not bf.head.done:
                await self._adopt_made(bf)

    async def _adopt_made(self, bf: OpenBackfill) -> None:
        """Runs that exist but are not marked queued: queued just before a crash (or by another writer of
        the slot). They are marked, never queued again."""
        made = await self._existing([r.run_id for r in bf.runs if not r.queued])
        for r in bf.runs:
            if not r.queued and r.run_id in made:
                log.info("backfill %s: run %s of slot %s exists already (queued before a restart); not again",
                         bf.head.id, r.run_id, r.slot)
                await self._mark_queued(bf, r)

    async def _mark_queued(self, bf: OpenBackfill, r: BackfillRunRow) -> None:
        await self.state.backfill_run_queued(bf.head.id, r.pos)
        r.queued = True

    async def meter(self) -> None:
        """Queue each open backfill's next runs while fewer than max_parallel of its runs are active."""
        for bf in list(self.all.values()):
            if bf.head.done:
                continue
            active = sum(1 for r in bf.runs if r.queued and (rec := self._record(r.run_id)) is not None and not rec.ended)
            todo = [r for r in bf.runs if not r.queued]
            if not todo and active == 0:
                await self.state.backfill_done(bf.head.id)
                bf.head.done = True
                log.info("backfill %s of schedule %s done: %s", bf.head.id, bf.head.schedule, self._progress(bf))
                continue
            if anyio.current_time() < bf.retry_at:
                continue
            for r in todo[:max(bf.head.max_parallel - active, 0)]:
                if not await self._queue(bf, r):
                    bf.retry_at = anyio.current_time() + _RETRY_AFTER
                    break

    async def _queue(self, bf: OpenBackfill, r: BackfillRunRow) -> bool:
        e = self.schedules.entries.get(bf.head.schedule)
        if e is None:
            log.error("backfill %s: schedule %s is no longer configured; its %d runs not yet queued stay pending",
                      bf.head.id, bf.head.schedule, sum(not x.queued for x in bf.runs))
            return False
        if await self._existing([r.run_id]):
            log.info("backfill %s: slot %s already has run %s (made by another writer); not again",
                     bf.head.id, r.slot, r.run_id)
            await self._mark_queued(bf, r)
            return True
        trigger: dict[str, Any] = {"trigger": "backfill", "schedule": e.name, "slot": r.slot, "backfill": bf.head.id,
                                   "decision": r.reason}
        if r.rerun_of is not None:
            trigger["rerun_of"] = r.rerun_of
        try:
            ours = await self._queue_run(e, r, trigger, f"{e.cfg.pipeline} queued by backfill {bf.head.id} for slot {r.slot}")
        except JournalError as ex:
            if not await self._existing([r.run_id]):
                log.error("backfill %s: run %s of slot %s could not be queued: %s; retrying in %gs",
                          bf.head.id, r.run_id, r.slot, ex, _RETRY_AFTER)
                return False
            log.info("backfill %s: slot %s was taken by another writer (%s); not run twice", bf.head.id, r.slot, ex)
            ours = False
        if ours:
            log.info("backfill %s: run %s queued for slot %s (%s)", bf.head.id, r.run_id, r.slot, r.reason)
        await self._mark_queued(bf, r)
        return True
