"""The schedule driver of a real scheduler (in this process, real sockets and journals) on a fake wall
clock: slots, downtime after a restart, overlap, pause and fire_at_start decided without waiting on the
real clock. (One end-to-end test across a kill -9, on the real clock, is in test_scheduler_service.py.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

import anyio
import pytest

from scheduler_svc.runs import RunRecord
from scheduler_svc.service import Scheduler
from shared.config import Settings, load_settings
from shared.journal import read_events
from tests.fake_clock import FakeClock
from tests.harness import SLEEP_PIPELINE, write_config

U = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=U)


def settings_with(tmp: Path, schedule: str) -> Settings:
    cfg, _ = write_config(tmp, SLEEP_PIPELINE + schedule)
    return load_settings(cfg)


@asynccontextmanager
async def scheduler(settings: Settings, clock: FakeClock) -> AsyncIterator[Scheduler]:
    sched = Scheduler(settings, clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        await clock.idle()
        yield sched
        tg.cancel_scope.cancel()


def slot_runs(sched: Scheduler) -> list[RunRecord]:
    return sorted((r for r in sched.book.runs.values() if r.trigger == "schedule"), key=lambda r: r.run_id)


def kinds(settings: Settings, run_id: str) -> list[tuple[str, str]]:
    return [(e.stage, e.event) for e in read_events(settings.journal_dir, run_id)]


def set_last_slot(settings: Settings, name: str, last: datetime) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(settings.state_dir / "scheduler.sqlite3")
    db.executescript("CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, paused INTEGER, "
                     "last_slot TEXT, start_fired_at TEXT);")
    db.execute("INSERT INTO schedules VALUES (?, NULL, ?, NULL)", (name, last.isoformat()))
    db.commit()
    db.close()


DOWNTIME = """
[schedules.quarter]
pipeline = "sleepy"
cron = "*/15 * * * *"
misfire = "{misfire}"
misfire_grace = {grace}
catch_up_max = 3
overlap = "allow"
"""


@pytest.mark.parametrize(("misfire", "grace", "fired", "skipped"), [
    ("coalesce", 7200, 1, 3),   # one run for the 4 missed slots; 3 recorded as coalesced
    ("catch_up", 7200, 3, 1),   # each up to the cap of 3; the oldest recorded as skipped
    ("coalesce", 1, 0, 4),      # all beyond the grace: recorded as skipped
])
async def test_restart_after_an_hour_of_downtime(tmp_path: Path, misfire: str, grace: int, fired: int,
                                                 skipped: int) -> None:
    """The state file says the last evaluated slot was an hour and a bit ago (as after an outage)."""
    settings = settings_with(tmp_path, DOWNTIME.format(misfire=misfire, grace=grace))
    set_last_slot(settings, "quarter", utc(2026, 7, 1, 10, 0))
    clock = FakeClock(utc(2026, 7, 1, 11, 0, 30))  # 10:15, 10:30, 10:45, 11:00 are due
    async with scheduler(settings, clock) as sched:
        runs = slot_runs(sched)
        assert [r.slot for r in runs] == ["2026-07-01T10:15:00Z", "2026-07-01T10:30:00Z",
                                          "2026-07-01T10:45:00Z", "2026-07-01T11:00:00Z"]
        assert sum(r.status == "queued" for r in runs) == fired
        assert sum(r.status == "cancelled" for r in runs) == skipped
        for r in runs:
            assert r.schedule == "quarter"
            if r.status == "cancelled":
                assert kinds(settings, r.run_id) == [("pipeline", "queued"), ("pipeline", "skipped"),
                                                     ("pipeline", "cancelled")]
        [entry] = sched.schedules.describe()
        assert entry.last_slot == "2026-07-01T11:00:00Z" and entry.next_fire_utc == "2026-07-01T11:15:00Z"
        clock.advance(14 * 60 + 29)  # 11:14:59: nothing due yet
        await clock.idle()
        assert len(slot_runs(sched)) == 4
        clock.advance(1)
        await clock.idle()
        assert slot_runs(sched)[-1].slot == "2026-07-01T11:15:00Z" and len(slot_runs(sched)) == 5


TICK = """
[schedules.tick]
pipeline = "sleepy"
every = "2s"
overlap = "{overlap}"
"""


@pytest.mark.parametrize("overlap", ["skip", "queue", "allow"])
async def test_overlap_with_a_run_of_the_schedule_still_active(tmp_path: Path, overlap: str) -> None:
    """No runner: the first slot's run stays queued (active for the overlap policy) while the next come."""
    settings = settings_with(tmp_path, TICK.format(overlap=overlap))
    clock = FakeClock(utc(2026, 7, 1, 10, 0, 1))
    async with scheduler(settings, clock) as sched:
        for _ in range(3):
            clock.advance(2)
            await clock.idle()
        runs = slot_runs(sched)
    assert [r.slot for r in runs] == ["2026-07-01T10:00:02Z", "2026-07-01T10:00:04Z", "2026-07-01T10:00:06Z"]
    assert runs[0].status == "queued"
    for r in runs[1:]:
        if overlap == "skip":
            assert r.status == "cancelled" and f"overlap: run {runs[0].run_id}" in r.msg
            assert kinds(settings, r.run_id)[1] == ("pipeline", "skipped")
        else:
            assert r.status == "queued"


EVERY_SECOND = """
[schedules.tick]
pipeline = "sleepy"
every = "1s"
overlap = "allow"
misfire = "coalesce"
misfire_grace = 60
"""


async def test_every_slot_is_recorded_exactly_once_across_a_restart(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, EVERY_SECOND)
    clock = FakeClock(utc(2026, 7, 1, 10, 0, 0, 500_000))
    async with scheduler(settings, clock):
        for _ in range(3):
            clock.advance(1)
            await clock.idle()
    clock.advance(2.5)  # down for 2.5 s: two slots pass unseen
    async with scheduler(settings, clock) as sched:
        for _ in range(2):
            clock.advance(1)
            await clock.idle()
        runs = slot_runs(sched)
    slots = [datetime.fromisoformat(r.slot.replace("Z", "+00:00")) for r in runs if r.slot]
    assert slots == [utc(2026, 7, 1, 10, 0, s) for s in range(1, 9)]  # each second once, none twice
    coalesced = [r for r in runs if r.status == "cancelled"]
    assert [r.slot for r in coalesced] == ["2026-07-01T10:00:04Z", "2026-07-01T10:00:05Z"]
    assert all("coalesced into the run of slot 2026-07-01T10:00:06Z" in r.msg for r in coalesced)


HOURLY = """
[schedules.hourly]
pipeline = "sleepy"
cron = "0 * * * *"
fire_at_start = true
"""


async def test_pause_stops_slots_and_resume_does_not_catch_up(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, HOURLY.replace("fire_at_start = true", ""))
    clock = FakeClock(utc(2026, 7, 1, 10, 30))
    async with scheduler(settings, clock) as sched:
        paused = await sched.schedules.set_paused("hourly", True)
        assert paused.paused is True and paused.next_fire is None
        clock.advance(3 * 3600)  # 13:30: 11:00, 12:00 and 13:00 pass while paused
        await anyio.sleep(0.05)
        assert slot_runs(sched) == []
        resumed = await sched.schedules.set_paused("hourly", False)
        assert resumed.next_fire_utc == "2026-07-01T14:00:00Z"
        await clock.idle()
        assert slot_runs(sched) == []  # nothing caught up
        clock.advance(1800)
        await clock.idle()
        assert [r.slot for r in slot_runs(sched)] == ["2026-07-01T14:00:00Z"]


async def test_fire_at_start_once_and_not_again_on_a_quick_restart(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, HOURLY)
    clock = FakeClock(utc(2026, 7, 1, 10, 30))
    async with scheduler(settings, clock) as sched:
        [run] = slot_runs(sched)
        assert run.slot == "2026-07-01T10:30:00Z" and run.status == "queued"
    clock.advance(60)  # restarted within the hour
    async with scheduler(settings, clock) as sched:
        assert len(slot_runs(sched)) == 1
    clock.advance(3600)  # 11:31: the 11:00 slot has passed since the start-fire
    async with scheduler(settings, clock) as sched:
        slots = [r.slot for r in slot_runs(sched)]
    assert "2026-07-01T11:00:00Z" in slots and "2026-07-01T11:31:00Z" in slots
