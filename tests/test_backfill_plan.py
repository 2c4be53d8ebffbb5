"""What a backfill runs, decided in-process: the policy matrix over a slot's runs (pure), the request's
terms (times, policy, max_parallel), and a real scheduler on a fake clock planning against journals."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from scheduler_svc.backfill_plan import SlotRuns, decide, derived_id, slot_runs
from scheduler_svc.runs import RunRecord
from scheduler_svc.slots import slot_run_id
from shared.backfill import check_max_parallel, check_policy, parse_moment
from shared.control import Backfill, ListBackfills
from shared.errors import BadParams, NotFound
from shared.events import PIPELINE_STAGE
from shared.journal import JournalWriter, begin_run
from tests.fake_clock import FakeClock
from tests.test_schedule_driver import scheduler, settings_with, utc

SLOT = datetime(2026, 7, 1, 10, 15, tzinfo=UTC)
OWN = slot_run_id(SLOT, "quarter")


def ended(run_id: str, outcome: str, started: bool = True) -> RunRecord:
    rec = RunRecord(run_id=run_id, pipeline="sleepy", params={}, trigger="schedule", schedule="quarter")
    rec.phase, rec.outcome = "ended", outcome
    if started:
        rec.started_at, rec.attempt = "2026-07-01T10:15:01+00:00", 1
    return rec


@pytest.mark.parametrize(("latest", "policy", "action", "why"), [
    (None, "missing", "run", "no run for this slot"),
    ("success", "missing", "skip", "ended success (policy missing)"),
    ("failure", "missing", "skip", "ended failure (policy missing)"),
    ("never", "missing", "run", "never started"),
    ("failure", "failed", "run", "ended failure"),
    ("cancelled", "failed", "run", "ended cancelled"),
    ("success", "failed", "skip", "ended success (policy failed)"),
    ("success", "all", "run", "ended success (policy all)"),
    ("running", "all", "skip", "still running"),
])
def test_the_policy_matrix(latest: str | None, policy: str, action: str, why: str) -> None:
    if latest is None:
        runs = SlotRuns(None, OWN)
    elif latest == "running":
        rec = ended(OWN, "success")
        rec.phase = "running"
        runs = SlotRuns(rec, derived_id(OWN, 1))
    elif latest == "never":
        runs = SlotRuns(ended(OWN, "cancelled", started=False), derived_id(OWN, 1))
    else:
        runs = SlotRuns(ended(OWN, latest), derived_id(OWN, 1))
    d = decide(SLOT, "quarter", policy, runs, None)
    assert d.action == action and why in d.reason, d
    assert d.slot == "2026-07-01T10:15:00Z"
    if action == "run" and latest is None:
        assert d.run_id == OWN and d.rerun_of is None  # a slot's first run has the slot's own id
    elif action == "run":
        assert d.run_id == f"{OWN}.r1" and d.rerun_of == OWN  # a repeat: derived id, linked to the latest


def test_a_slot_pending_in_another_backfill_is_left_to_it() -> None:
    d = decide(SLOT, "quarter", "all", SlotRuns(None, OWN), "bf-1")
    assert d.action == "skip" and "backfill bf-1" in d.reason


def test_slot_runs_follow_the_derived_ids_to_the_latest() -> None:
    book = {OWN: ended(OWN, "failure"), f"{OWN}.r1": ended(f"{OWN}.r1", "failure"),
            f"{OWN}.r2": ended(f"{OWN}.r2", "success")}
    runs = slot_runs(OWN, book.get, lambda rid: rid in book)
    assert runs.latest is book[f"{OWN}.r2"] and runs.next_id == f"{OWN}.r3"
    assert decide(SLOT, "quarter", "failed", runs, None).action == "skip"  # its latest run succeeded
    assert slot_runs(OWN, {}.get, lambda rid: False) == SlotRuns(None, OWN)


def test_request_terms_are_checked_naming_the_field() -> None:
    tz = ZoneInfo("America/Chicago")
    assert parse_moment("2026-07-01", tz, "from") == datetime(2026, 7, 1, tzinfo=tz)
    assert parse_moment("2026-07-01T05:00", tz, "from").utcoffset().total_seconds() == -5 * 3600  # CDT
    assert parse_moment("2026-07-01T10:00:00Z", tz, "to") == utc(2026, 7, 1, 10)
    for bad in ("yesterday", "", "2026-13-01", 5):
        with pytest.raises(BadParams, match="^from"):
            parse_moment(bad, tz, "from")
    with pytest.raises(BadParams, match="policy 'some'"):
        check_policy("some")
    for n in (0, 101, "2", True, 1.5):
        with pytest.raises(BadParams, match="max_parallel"):
            check_max_parallel(n)


QUARTER = """
[schedules.quarter]
pipeline = "sleepy"
cron = "*/15 * * * *"
timezone = "UTC"
"""


def _write_run(settings: object, run_id: str, slot: str, ends: list[tuple[str, str]]) -> None:
    jdir = settings.journal_dir  # type: ignore[attr-defined]
    tz = settings.tz  # type: ignore[attr-defined]
    begin_run(jdir, run_id, tz, "sleepy", {"seconds": 0.2},
              {"trigger": "schedule", "schedule": "quarter", "slot": slot})
    with JournalWriter.open(jdir, run_id, tz) as w:
        for stage, kind in ends:
            w.append(stage, kind, kind, {"attempt": 1, "runner": "r"} if kind == "start" else None)
        w.sync()


async def test_a_scheduler_plans_from_the_journals_and_a_dry_run_creates_nothing(tmp_path: Path) -> None:
    """No runner: the plan alone. 10:00 succeeded, 10:15 was recorded skipped, 10:30 failed, 10:45 and
    11:00 have no run; the clock is 11:07, so 11:15 (in the window) is the schedule's, not the backfill's."""
    settings = settings_with(tmp_path, QUARTER)
    settings.journal_dir.mkdir(parents=True)
    _write_run(settings, slot_run_id(utc(2026, 7, 1, 10, 0), "quarter"), "2026-07-01T10:00:00Z",
               [(PIPELINE_STAGE, "start"), (PIPELINE_STAGE, "success")])
    _write_run(settings, slot_run_id(utc(2026, 7, 1, 10, 15), "quarter"), "2026-07-01T10:15:00Z",
               [(PIPELINE_STAGE, "skipped"), (PIPELINE_STAGE, "cancelled")])
    _write_run(settings, slot_run_id(utc(2026, 7, 1, 10, 30), "quarter"), "2026-07-01T10:30:00Z",
               [(PIPELINE_STAGE, "start"), (PIPELINE_STAGE, "failure")])
    clock = FakeClock(utc(2026, 7, 1, 11, 7))
    async with scheduler(settings, clock) as sched:
        before = set(sched.book.runs)
        req = Backfill(schedule="quarter", start="2026-07-01T10:00:00Z", end="2026-07-01T11:30:00Z", dry_run=True)
        plan = await sched.backfills.backfill(req)
        assert [(s.slot[11:16], s.action) for s in plan.slots] == [
            ("10:00", "skip"), ("10:15", "run"), ("10:30", "skip"), ("10:45", "run"), ("11:00", "run")]
        assert plan.slots[1].run_id == slot_run_id(utc(2026, 7, 1, 10, 15), "quarter") + ".r1"
        assert plan.progress is None and set(sched.book.runs) == before
        assert sched.backfills.listing(ListBackfills()).backfills == []
        failed = await sched.backfills.backfill(Backfill(schedule="quarter", start="2026-07-01T10:00:00Z",
                                                         end="2026-07-01T11:00:00Z", policy="failed", dry_run=True))
        assert [s.action for s in failed.slots] == ["skip", "run", "run", "run", "run"]
        assert failed.slots[2].rerun_of == slot_run_id(utc(2026, 7, 1, 10, 30), "quarter")

        made = await sched.backfills.backfill(Backfill(schedule="quarter", start="2026-07-01T10:00:00Z",
                                                       end="2026-07-01T11:00:00Z", max_parallel=2))
        assert made.progress is not None and made.progress.total == 3
        with anyio.fail_after(10):
            while sum(r.trigger == "backfill" for r in sched.book.runs.values()) < 2:
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # the meter looks again: no third run while two are queued
        assert sum(r.trigger == "backfill" for r in sched.book.runs.values()) == 2
        again = await sched.backfills.backfill(Backfill(schedule="quarter", start="2026-07-01T10:00:00Z",
                                                        end="2026-07-01T11:00:00Z"))
        assert again.progress is None and all(s.action == "skip" for s in again.slots)
        assert {s.reason.split(" ")[0] for s in again.slots if s.slot[11:16] in ("10:15", "10:45", "11:00")} <= {"run", "backfill"}
        # the backfill's queued runs are not "a run of the schedule still active" for its overlap = skip
        clock.advance(8 * 60)
        await clock.idle()
        live = sched.book.get(slot_run_id(utc(2026, 7, 1, 11, 15), "quarter"))
        assert live is not None and live.status == "queued", live
        with pytest.raises(NotFound):
            await sched.backfills.backfill(Backfill(schedule="nope", start="2026-07-01", end="2026-07-02"))
        with pytest.raises(BadParams, match="before from"):
            await sched.backfills.backfill(Backfill(schedule="quarter", start="2026-07-02", end="2026-07-01"))
