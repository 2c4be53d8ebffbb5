"""Schedules in cluster mode: a slot is claimed in the fire ledger before it fires or is recorded
skipped, in the same fenced transaction as its run's row, so a slot fires once across every scheduler
and a takeover loses none: the new leader's bookmark for a schedule is the newest slot in the ledger
(or its last evaluated slot, kept in the database), and the planner applies the schedule's misfire
grace to the slots passed since. Paused and fire-at-start state live in the database too."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from runwire_cluster.runs import LeaderState, RunRow
from runwire_cluster.state import Lease
from shared.config import Config

from .clock import Clock
from .journaling import Journaling
from .planner import Decision
from .runbook import RunBook
from .schedules import ScheduleDriver, ScheduleEntry
from .slots import iso_utc
from .state import ScheduleState

log = logging.getLogger(__name__)


def _parse(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


class ClusterScheduleStore:
    """The ScheduleStore of a leader's term: read once when it begins, written fenced."""

    def __init__(self, leader: LeaderState, lease: Lease) -> None:
        self.leader = leader
        self.lease = lease
        self.saved: dict[str, ScheduleState] = {}

    async def load(self) -> None:
        self.saved = {
            name: ScheduleState(paused, iso_utc(last) if last else None, iso_utc(fired) if fired else None)
            for name, (paused, last, fired) in (await self.leader.schedule_states()).items()
        }

    def schedules(self) -> dict[str, ScheduleState]:
        return self.saved

    async def set_paused(self, name: str, paused: bool) -> None:
        await self.leader.set_schedule(self.lease, name, paused=paused)

    async def set_last_slot(self, name: str, slot_iso: str) -> None:
        await self.leader.set_schedule(self.lease, name, last_slot=_parse(slot_iso))

    async def set_start_fired(self, name: str, at_iso: str) -> None:
        await self.leader.set_schedule(self.lease, name, start_fired_at=_parse(at_iso))


class ClusterScheduleDriver(ScheduleDriver):
    def __init__(self, cfg: Config, store: ClusterScheduleStore, book: RunBook, journaling: Journaling,
                 journal_dir: Path, clock: Clock | None = None) -> None:
        super().__init__(cfg, store, book, journaling, journal_dir, clock)
        self.store = store

    async def _fired_before(self, e: ScheduleEntry, d: Decision, run_id: str, trigger: dict[str, Any], msg: str) -> bool:
        row = RunRow(run_id, e.cfg.pipeline, dict(e.params), dict(trigger), msg if d.action == "fire" else "",
                     skip=None if d.action == "fire" else d.reason)
        before = await self.store.leader.claim_slot_run(self.store.lease, e.name, d.slot, row)
        if before is not None:
            log.info("schedule %s: slot %s was claimed by %s; not again", e.name, iso_utc(d.slot), before)
            return True
        return False
