"""Cluster mode: backfills kept in the cluster's database and planned from its `runs` rows, so whichever
scheduler leads carries a backfill on, and a slot runs once across the schedule and every backfill.

- The store: the same rows as state.StateStore's, written through the lease's fence (a leader taken
  over changes nothing more); loaded at each term's start.
- What a slot has run: the `runs` rows whose trigger names the schedule and the slot (the schedule's own
  firings, skipped slots, backfills' runs, by any earlier leader), with the run book's records first
  (the runs of this term and those taken over, as the event stream has them).
- A slot's own run id is claimed in the fire ledger, as the schedule driver claims it: whichever of the
  two comes first runs the slot, the other finds it claimed. A re-run's derived id (`<slot id>.rN`) is
  created as a run row, once (its primary key).
- Progress of runs that ended before this term: their rows' outcome, loaded at the term's start.

Database errors are ServiceUnavailable or LeaseLost: the term steps down and the next one carries on.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from runwire_cluster.runs import LeaderState, RunRow
from runwire_cluster.state import Lease
from shared.config import Settings
from shared.errors import JournalError, ServiceUnavailable

from .backfills import Backfills, Lookup
from .cluster_journaling import ClusterJournaling, record_from_row
from .runbook import RunBook
from .runs import RunRecord
from .schedules import ScheduleDriver, ScheduleEntry
from .slots import iso_utc, slot_run_id
from .state import BackfillRow, BackfillRunRow

log = logging.getLogger(__name__)


class ClusterBackfillStore:
    """backfills.BackfillStore on the cluster's database, every write fenced by the leader's lease."""

    def __init__(self, leader: LeaderState, lease: Lease) -> None:
        self.state = leader.state
        self.lease = lease

    async def load_backfills(self) -> list[tuple[BackfillRow, list[BackfillRunRow]]]:
        async with self.state.connection() as conn:
            heads = await conn.fetch("SELECT * FROM backfills ORDER BY made_at, id")
            runs = await conn.fetch("SELECT * FROM backfill_runs ORDER BY backfill_id, pos")
        rows: dict[str, list[BackfillRunRow]] = {h["id"]: [] for h in heads}
        for r in runs:
            rows[r["backfill_id"]].append(BackfillRunRow(r["pos"], r["slot"], r["run_id"], r["rerun_of"], r["reason"],
                                                         r["queued"]))
        return [(BackfillRow(h["id"], h["schedule"], h["start_"], h["end_"], h["policy"], h["max_parallel"],
                             h["created_at"], h["done"]), rows[h["id"]]) for h in heads]

    async def add_backfill(self, head: BackfillRow, runs: list[BackfillRunRow]) -> None:
        """The backfill and its whole plan, in one transaction."""
        async with self.state.fenced(self.lease) as conn:
            await conn.execute("INSERT INTO backfills (id, schedule, start_, end_, policy, max_parallel, created_at) "
                               "VALUES ($1, $2, $3, $4, $5, $6, $7)", head.id, head.schedule, head.start, head.end,
                               head.policy, head.max_parallel, head.created_at)
            await conn.executemany("INSERT INTO backfill_runs (backfill_id, pos, slot, run_id, rerun_of, reason) "
                                   "VALUES ($1, $2, $3, $4, $5, $6)",
                                   [(head.id, r.pos, r.slot, r.run_id, r.rerun_of, r.reason) for r in runs])

    async def backfill_run_queued(self, backfill_id: str, pos: int) -> None:
        async with self.state.fenced(self.lease) as conn:
            await conn.execute("UPDATE backfill_runs SET queued = true WHERE backfill_id = $1 AND pos = $2",
                               backfill_id, pos)

    async def backfill_done(self, backfill_id: str) -> None:
        async with self.state.fenced(self.lease) as conn:
            await conn.execute("UPDATE backfills SET done = true WHERE id = $1", backfill_id)


class ClusterBackfills(Backfills):
    def __init__(self, book: RunBook, settings: Settings, journaling: ClusterJournaling, schedules: ScheduleDriver,
                 leader: LeaderState, lease: Lease) -> None:
        super().__init__(book, settings, ClusterBackfillStore(leader, lease), journaling, schedules)
        self.cluster_journaling = journaling
        self.leader = leader
        self.lease = lease
        self.before: dict[str, RunRecord] = {}  # backfills' runs known from their rows at the term's start

    async def _load(self) -> None:
        await super()._load()
        ids = [r.run_id for bf in self.all.values() for r in bf.runs if r.queued and self.book.get(r.run_id) is None]
        self.before = {row.run_id: record_from_row(row) for row in await self.leader.runs(ids)} if ids else {}

    async def _slot_lookup(self, schedule: str, slots: list[datetime]) -> Lookup:
        rows = {row.run_id: record_from_row(row) for row in await self.leader.slot_runs(schedule, [iso_utc(s) for s in slots])}

        def known(run_id: str) -> RunRecord | None:
            return self.book.get(run_id) or rows.get(run_id)

        return known, rows.__contains__

    async def _existing(self, run_ids: list[str]) -> set[str]:
        return {row.run_id for row in await self.leader.runs(run_ids)} if run_ids else set()

    def _record(self, run_id: str) -> RunRecord | None:
        return self.book.get(run_id) or self.before.get(run_id)

    async def _queue_run(self, e: ScheduleEntry, r: BackfillRunRow, trigger: dict[str, Any], msg: str) -> bool:
        row = RunRow(r.run_id, e.cfg.pipeline, dict(e.params), trigger, msg)
        slot = datetime.fromisoformat(r.slot)
        if r.run_id == slot_run_id(slot, e.name):
            before = await self.leader.claim_slot_run(self.lease, e.name, slot, row)
            if before is not None:
                log.info("backfill %s: slot %s of schedule %s was claimed by %s; not run twice", trigger["backfill"],
                         r.slot, e.name, before)
                return False
        elif not await self.leader.add_run(self.lease, row):  # a re-run of the slot: its row made once
            log.info("backfill %s: run %s of slot %s exists in the cluster's runs already; not run twice",
                     trigger["backfill"], r.run_id, r.slot)
            return False
        try:
            await self.cluster_journaling.write_queued(row)
        except JournalError as ex:  # the row is ours: the caller must not take it for another writer's run
            raise ServiceUnavailable(f"run {r.run_id} of backfill {trigger['backfill']}: its row is in the cluster's "
                                     f"database but its `queued` could not be written here ({ex}); stepping down, the "
                                     "next term writes it") from ex
        return True
