"""Schedules in the running service: wait for the next slot, decide (planner), fire or record a skip,
persist the last evaluated slot, pause/resume, fire-at-start.

A slot fires at most once, across restarts and even for two schedulers sharing a journal directory:
its run id is derived from (slot, schedule) and `begin_run` creates the journal with O_EXCL, so the
journal's existence is the durable "fired" record. The last evaluated slot (state file) is only a
bookmark for what to evaluate after a restart; it is written after the slot's journal exists.

Pause: a paused schedule does not evaluate its slots (they are not runs, so not "skipped": pausing is
the user's decision, logged once); resume starts from the next slot after now, without catching up.
fire_at_start: one run at service start, named by the start time, unless the schedule is paused or
the previous start-fire happened after the schedule's last slot (a quick restart within one period
does not fire again). The overlap policy applies to it like any slot.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from shared.config import Config, ScheduleConfig
from shared.errors import JournalError, NotFound
from shared.journal import journal_path
from shared.params import resolve_params
from shared.replies import ScheduleInfo

from .clock import Clock, WallClock
from .journaling import Journaling
from .planner import Decision, Policy, plan
from .runbook import RunBook
from .slots import SlotClock, iso_utc, slot_run_id
from .state import ScheduleState

log = logging.getLogger(__name__)

SLOT_SCAN_LIMIT = 10_000


@dataclass
class ScheduleEntry:
    name: str
    cfg: ScheduleConfig
    clock: SlotClock
    policy: Policy
    params: dict[str, Any]
    paused: bool
    last_slot: datetime
    start_fired_at: datetime | None
    next_fire: datetime

    def local(self, moment: datetime) -> str:
        return moment.astimezone(self.clock.tz).isoformat()


class ScheduleStore(Protocol):
    """Where a schedule's state is kept (StateStore here; the cluster's database in cluster mode)."""

    def schedules(self) -> dict[str, ScheduleState]: ...
    async def set_paused(self, name: str, paused: bool) -> None: ...
    async def set_last_slot(self, name: str, slot_iso: str) -> None: ...
    async def set_start_fired(self, name: str, at_iso: str) -> None: ...


class ScheduleDriver:
    def __init__(self, cfg: Config, state: ScheduleStore, book: RunBook, journaling: Journaling, journal_dir: Path,
                 clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.state = state
        self.book = book
        self.journaling = journaling
        self.journal_dir = journal_dir
        self.clock: Clock = clock or WallClock()
        self.entries: dict[str, ScheduleEntry] = {}
        self._changed = anyio.Event()

    def overlap_of(self, name: str) -> str:
        e = self.entries.get(name)
        return e.cfg.overlap if e else "allow"

    # ------------------------------------------------------------------------------------ loop

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self._load()
        task_status.started()
        for e in self.entries.values():
            if e.cfg.fire_at_start:
                await self._fire_at_start(e)
        while True:
            now = self.clock.now()
            for e in self.entries.values():
                if not e.paused and e.next_fire <= now:
                    await self._evaluate(e, now)
            upcoming = [e.next_fire for e in self.entries.values() if not e.paused]
            delay = (min(upcoming) - self.clock.now()).total_seconds() if upcoming else math.inf
            await self._wait(max(delay, 0.0))

    async def _wait(self, delay: float) -> None:
        """Until `delay` seconds pass on the clock, or a schedule is paused or resumed."""
        changed = self._changed
        if math.isinf(delay):
            await changed.wait()
        else:
            async with anyio.create_task_group() as tg:
                async def until_changed() -> None:
                    await changed.wait()
                    tg.cancel_scope.cancel()
                tg.start_soon(until_changed)
                await self.clock.sleep(delay)
                tg.cancel_scope.cancel()
        if changed.is_set():
            self._changed = anyio.Event()

    async def _load(self) -> None:
        cfg = self.cfg
        saved = self.state.schedules()  # at start, small (state.py)
        now = self.clock.now()
        for name, sc in cfg.schedules.items():
            st = saved.get(name)
            clock = SlotClock.from_config(sc, cfg.timezone)
            paused = (not sc.enabled) if st is None or st.paused is None else st.paused
            last = datetime.fromisoformat(st.last_slot) if st and st.last_slot else None
            if last is None:
                last = now  # a new schedule starts from now: no back-fill
                await self.state.set_last_slot(name, iso_utc(now))
            e = ScheduleEntry(
                name=name, cfg=sc, clock=clock,
                policy=Policy(sc.misfire_grace, sc.misfire, sc.catch_up_max, sc.overlap),
                params=resolve_params(cfg.pipelines[sc.pipeline], sc.params),
                paused=paused, last_slot=last,
                start_fired_at=datetime.fromisoformat(st.start_fired_at) if st and st.start_fired_at else None,
                next_fire=clock.next_after(max(last, now) if paused else last),
            )
            self.entries[name] = e
            log.info("schedule %s (%s, %s, %s, misfire %s grace %gs, overlap %s): %s; next fire %s (%s)",
                     name, sc.pipeline, clock.spec, clock.tz.key, sc.misfire, sc.misfire_grace, sc.overlap,
                     "PAUSED" if paused else "active", e.local(e.next_fire), iso_utc(e.next_fire))

    # ------------------------------------------------------------------------------------ deciding

    def _active_run(self, name: str) -> str | None:
        for rec in self.book.runs.values():
            if rec.schedule == name and rec.on_schedule and not rec.ended and rec.phase != "ending":
                return rec.run_id
        return None

    async def _evaluate(self, e: ScheduleEntry, now: datetime) -> None:
        slots, more = e.clock.slots_between(e.last_slot, now, SLOT_SCAN_LIMIT)
        if more:
            # a very long outage: look at the newest slots only; the older ones are summarised
            span = (slots[-1] - slots[0]) / max(len(slots) - 1, 1)
            slots, _ = e.clock.slots_between(now - span * (SLOT_SCAN_LIMIT // 2), now, SLOT_SCAN_LIMIT)
            log.warning("schedule %s: more than %d slots missed since %s; older ones summarised",
                        e.name, SLOT_SCAN_LIMIT, iso_utc(e.last_slot))
        if slots:
            decisions = plan(slots, now, e.policy, self._active_run(e.name), more_before=more)
            for d in decisions:
                await self._execute(e, d, now)
            e.last_slot = slots[-1]
            await self.state.set_last_slot(e.name, iso_utc(e.last_slot))
        e.next_fire = e.clock.next_after(max(now, e.last_slot))

    async def _execute(self, e: ScheduleEntry, d: Decision, now: datetime, extra: dict[str, Any] | None = None) -> None:
        run_id = slot_run_id(d.slot, e.name)
        late_ms = (now - d.slot).total_seconds() * 1000
        path = journal_path(self.journal_dir, run_id)
        trigger = {"trigger": "schedule", "schedule": e.name, "slot": iso_utc(d.slot), "decision": d.reason,
                   **d.data, **(extra or {})}
        msg = f"{e.cfg.pipeline} queued by schedule {e.name} for {e.local(d.slot)}"
        if await self._fired_before(e, d, run_id, trigger, msg):
            return
        try:
            if d.action == "fire":
                await self.journaling.queue_run(e.cfg.pipeline, e.params, trigger, run_id, msg)
                log.info("schedule %s: FIRE slot %s (%s) as run %s, %.1f ms after the slot: %s",
                         e.name, e.local(d.slot), iso_utc(d.slot), run_id, late_ms, d.reason)
            else:
                await self.journaling.record_skipped(e.cfg.pipeline, e.params, trigger, run_id, d.reason)
                log.warning("schedule %s: SKIP slot %s (%s), recorded as run %s: %s",
                            e.name, e.local(d.slot), iso_utc(d.slot), run_id, d.reason)
        except JournalError as ex:
            if await anyio.to_thread.run_sync(path.exists):
                log.info("schedule %s: slot %s was taken by another writer (%s); not fired twice", e.name, iso_utc(d.slot), ex)
            else:
                log.error("schedule %s: slot %s could not be recorded: %s", e.name, iso_utc(d.slot), ex)

    async def _fired_before(self, e: ScheduleEntry, d: Decision, run_id: str, trigger: dict[str, Any], msg: str) -> bool:
        """Did this slot fire (or get skipped) before? Here: its journal exists (the durable record)."""
        if await anyio.to_thread.run_sync(journal_path(self.journal_dir, run_id).exists):
            log.info("schedule %s: slot %s already has run %s (fired before a restart); not again",
                     e.name, iso_utc(d.slot), run_id)
            return True
        return False

    async def _fire_at_start(self, e: ScheduleEntry) -> None:
        now = self.clock.now()
        if e.paused:
            log.info("schedule %s: fire_at_start not done: the schedule is paused", e.name)
            return
        if e.start_fired_at is not None and now < e.clock.next_after(e.start_fired_at):
            log.info("schedule %s: fire_at_start not done: it already fired at start %s and no slot has passed "
                     "since (a quick restart)", e.name, e.local(e.start_fired_at))
            return
        [d] = plan([now], now, e.policy, self._active_run(e.name))
        if d.action == "fire":
            d = Decision(d.slot, "fire", "fire_at_start", d.data)
        await self._execute(e, d, now, {"fire_at_start": True})
        e.start_fired_at = now
        await self.state.set_start_fired(e.name, iso_utc(now))

    # ------------------------------------------------------------------------------------ control

    def _entry(self, name: str) -> ScheduleEntry:
        e = self.entries.get(name)
        if e is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise NotFound(f"schedule {name!r} not found (configured: {known})")
        return e

    async def set_paused(self, name: str, paused: bool) -> ScheduleInfo:
        e = self._entry(name)
        if e.paused != paused:
            await self.state.set_paused(name, paused)
            e.paused = paused
            now = self.clock.now()
            if not paused:
                e.last_slot = max(e.last_slot, now)  # no catching up on slots passed while paused
                await self.state.set_last_slot(name, iso_utc(e.last_slot))
            e.next_fire = e.clock.next_after(max(e.last_slot, now))
            log.info("schedule %s %s; next fire %s", name, "PAUSED" if paused else "resumed", e.local(e.next_fire))
            self._changed.set()
        return self._describe(e)

    def _describe(self, e: ScheduleEntry) -> ScheduleInfo:
        return ScheduleInfo(
            name=e.name, pipeline=e.cfg.pipeline, cron=e.cfg.cron, every=e.cfg.every,
            spec=e.clock.spec, timezone=e.clock.tz.key, paused=e.paused, enabled=not e.paused,
            next_fire=None if e.paused else e.local(e.next_fire),
            next_fire_utc=None if e.paused else iso_utc(e.next_fire),
            last_slot=iso_utc(e.last_slot), misfire=e.cfg.misfire, misfire_grace=e.cfg.misfire_grace,
            overlap=e.cfg.overlap, fire_at_start=e.cfg.fire_at_start, active_run=self._active_run(e.name),
        )

    def describe(self) -> list[ScheduleInfo]:
        return [self._describe(e) for e in self.entries.values()]
