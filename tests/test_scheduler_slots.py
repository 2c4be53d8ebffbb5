"""Schedule arithmetic and misfire/overlap planning with a fake clock: pure functions, exact UTC instants.

The DST nights are America/Chicago's in 2026: 2026-03-08 02:00 CST -> 03:00 CDT (08:00Z), and
2026-11-01 02:00 CDT -> 01:00 CST (07:00Z).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim

from scheduler_svc.planner import MAX_SKIP_RECORDS, Policy, plan
from scheduler_svc.slots import SlotClock, is_imaginary, localize, slot_run_id
from shared.ids import is_valid_run_id

CHI = ZoneInfo("America/Chicago")
U = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=U)


def slots(clock: SlotClock, after: datetime, until: datetime) -> list[datetime]:
    out, more = clock.slots_between(after, until)
    assert not more
    return out


def quarter_hours(start: datetime, n: int) -> list[datetime]:
    return [start + timedelta(minutes=15 * i) for i in range(n)]


# ------------------------------------------------------------------------ cronsim's own behaviour


def test_cronsim_follows_debian_cron_for_fixed_time_jobs() -> None:
    """What the issue says of cronsim, checked: a fixed-time job in a missing hour runs at the next valid
    time, and in a repeated hour once; a wildcard-hour job runs by the new wall time (twice)."""
    spring = CronSim("30 2 * * *", datetime(2026, 3, 7, 12, 0, tzinfo=CHI))
    assert next(spring).astimezone(U) == utc(2026, 3, 8, 8, 0)  # 03:00 CDT
    fall = CronSim("30 1 * * *", datetime(2026, 10, 31, 12, 0, tzinfo=CHI))
    assert [next(fall).astimezone(U) for _ in range(2)] == [utc(2026, 11, 1, 6, 30), utc(2026, 11, 2, 7, 30)]
    hourly = CronSim("0 * * * *", datetime(2026, 11, 1, 0, 30, tzinfo=CHI))
    # Debian semantics: 01:00 CDT and 01:00 CST both fire. runwire fires hourly-or-slower once (below).
    assert [next(hourly).astimezone(U) for _ in range(3)] == [utc(2026, 11, 1, 6), utc(2026, 11, 1, 7), utc(2026, 11, 1, 8)]


# ------------------------------------------------------------------------ sub-hourly: real time


@pytest.mark.parametrize("spec", [{"cron": "*/15 * * * *"}, {"every": "15m"}])
def test_quarter_hour_across_spring_forward(spec: dict[str, str]) -> None:
    clock = SlotClock(tz=CHI, **spec)
    got = slots(clock, utc(2026, 3, 8, 6, 50), utc(2026, 3, 8, 8, 30))  # 00:50 CST .. 03:30 CDT
    # 01:00, 01:15, 01:30, 01:45 CST, then 03:00 CDT: every 15 real minutes, nothing doubled or lost
    assert got == quarter_hours(utc(2026, 3, 8, 7, 0), 7)
    assert [s.astimezone(CHI).strftime("%H:%M") for s in got] == ["01:00", "01:15", "01:30", "01:45", "03:00", "03:15", "03:30"]


@pytest.mark.parametrize("spec", [{"cron": "*/15 * * * *"}, {"every": "15m"}])
def test_quarter_hour_across_fall_back_fires_eight_times_in_the_repeated_hour(spec: dict[str, str]) -> None:
    clock = SlotClock(tz=CHI, **spec)
    # the wall-clock span 01:00-01:59 happens twice: 01:00 CDT (06:00Z) to 02:00 CST (08:00Z)
    got = slots(clock, utc(2026, 11, 1, 5, 59), utc(2026, 11, 1, 7, 59))
    assert got == quarter_hours(utc(2026, 11, 1, 6, 0), 8)
    assert [s.astimezone(CHI).strftime("%H:%M%Z") for s in got] == [
        "01:00CDT", "01:15CDT", "01:30CDT", "01:45CDT", "01:00CST", "01:15CST", "01:30CST", "01:45CST"]


def test_every_is_aligned_to_the_anchor_whenever_asked() -> None:
    clock = SlotClock(tz=CHI, every="15m")
    # asked at 10:07:31 local (16:07:31Z, CDT in July): next is 10:15, not 10:22:31
    assert clock.next_after(utc(2026, 7, 1, 15, 7, 31)) == utc(2026, 7, 1, 15, 15)
    assert clock.next_after(utc(2026, 7, 1, 15, 15)) == utc(2026, 7, 1, 15, 30)  # strictly after
    odd = SlotClock(tz=CHI, every="7m", anchor="2026-07-01T10:00:00")
    assert odd.next_after(utc(2026, 7, 1, 15, 0, 1)) == utc(2026, 7, 1, 15, 7)


def test_six_field_cron_with_seconds() -> None:
    clock = SlotClock(tz=CHI, cron="*/10 * * * * *")
    assert clock.sub_hourly
    assert slots(clock, utc(2026, 7, 1, 0, 0, 0), utc(2026, 7, 1, 0, 0, 30)) == [
        utc(2026, 7, 1, 0, 0, 10), utc(2026, 7, 1, 0, 0, 20), utc(2026, 7, 1, 0, 0, 30)]


# ------------------------------------------------------------------------ hourly or slower: wall clock


@pytest.mark.parametrize("spec", [{"cron": "30 2 * * *"}, {"every": "1d", "anchor": "2026-01-01T02:30:00"}])
def test_daily_0230_across_both_transitions(spec: dict[str, str]) -> None:
    clock = SlotClock(tz=CHI, **spec)
    assert not clock.sub_hourly
    spring = slots(clock, utc(2026, 3, 6, 12), utc(2026, 3, 9, 12))
    # 03-07 02:30 CST, 03-08 02:30 does not exist -> 03:00 CDT, 03-09 02:30 CDT
    assert spring == [utc(2026, 3, 7, 8, 30), utc(2026, 3, 8, 8, 0), utc(2026, 3, 9, 7, 30)]
    fall = slots(clock, utc(2026, 10, 31, 0), utc(2026, 11, 2, 12))
    # 02:30 exists once on 11-01 (CST, after the repeat): daily stays daily
    assert fall == [utc(2026, 10, 31, 7, 30), utc(2026, 11, 1, 8, 30), utc(2026, 11, 2, 8, 30)]


@pytest.mark.parametrize("spec", [{"cron": "30 1 * * *"}, {"every": "1d", "anchor": "2026-01-01T01:30:00"}])
def test_daily_in_the_repeated_hour_fires_once(spec: dict[str, str]) -> None:
    clock = SlotClock(tz=CHI, **spec)
    got = slots(clock, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12))
    assert got == [utc(2026, 11, 1, 6, 30), utc(2026, 11, 2, 7, 30)]  # 01:30 CDT only, not 01:30 CST


@pytest.mark.parametrize("spec", [{"cron": "0 * * * *"}, {"every": "1h"}])
def test_hourly_across_both_transitions(spec: dict[str, str]) -> None:
    clock = SlotClock(tz=CHI, **spec)
    assert not clock.sub_hourly
    # spring: 01:00 CST, (02:00 missing -> 03:00 CDT, the same instant as 03:00) once, 04:00 CDT
    assert slots(clock, utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 9, 30)) == [
        utc(2026, 3, 8, 7), utc(2026, 3, 8, 8), utc(2026, 3, 8, 9)]
    # fall: 00:00 CDT, 01:00 CDT, (01:00 CST not again), 02:00 CST, 03:00 CST
    assert slots(clock, utc(2026, 11, 1, 4, 30), utc(2026, 11, 1, 9, 30)) == [
        utc(2026, 11, 1, 5), utc(2026, 11, 1, 6), utc(2026, 11, 1, 8), utc(2026, 11, 1, 9)]


def test_localize_rules() -> None:
    assert is_imaginary(datetime(2026, 3, 8, 2, 30), CHI)
    assert not is_imaginary(datetime(2026, 11, 1, 1, 30), CHI)
    assert localize(datetime(2026, 3, 8, 2, 30, 15), CHI) == utc(2026, 3, 8, 8, 0)
    assert localize(datetime(2026, 11, 1, 1, 30), CHI) == utc(2026, 11, 1, 6, 30)


def test_next_after_from_inside_the_second_occurrence() -> None:
    """Asked during 01:xx CST (the repeat), an hourly schedule's next slot is 02:00 CST, not 01:00 again."""
    clock = SlotClock(tz=CHI, cron="0 * * * *")
    assert clock.next_after(utc(2026, 11, 1, 7, 10)) == utc(2026, 11, 1, 8)


def test_slot_run_ids_sort_by_time_and_are_valid() -> None:
    a = slot_run_id(utc(2026, 11, 1, 6, 0), "market-data-15m")
    b = slot_run_id(utc(2026, 11, 1, 6, 15), "market-data-15m")
    assert a == "20261101T060000000000Z-market-data-15m"
    assert a < b and is_valid_run_id(a) and is_valid_run_id(b)


def test_slots_between_reports_truncation() -> None:
    clock = SlotClock(tz=CHI, every="1s")
    got, more = clock.slots_between(utc(2026, 1, 1), utc(2026, 1, 2), limit=100)
    assert len(got) == 100 and more


# ------------------------------------------------------------------------ misfire and overlap


def _hour_of_downtime() -> tuple[list[datetime], datetime]:
    """*/15 slots missed while the scheduler was down from 10:00Z to 11:00:30Z."""
    clock = SlotClock(tz=CHI, cron="*/15 * * * *")
    now = utc(2026, 7, 1, 11, 0, 30)
    return slots(clock, utc(2026, 7, 1, 10, 0), now), now


def test_restart_after_an_hour_coalesce_fires_one_run() -> None:
    due, now = _hour_of_downtime()
    assert due == quarter_hours(utc(2026, 7, 1, 10, 15), 4)
    got = plan(due, now, Policy(misfire_grace=7200, misfire="coalesce"))
    assert [(d.slot, d.action) for d in got] == [
        (due[0], "skip"), (due[1], "skip"), (due[2], "skip"), (due[3], "fire")]
    assert got[3].data == {"coalesced": 4}
    assert all("coalesced into" in d.reason for d in got[:3])


def test_restart_after_an_hour_catch_up_fires_each_up_to_the_cap() -> None:
    due, now = _hour_of_downtime()
    every = plan(due, now, Policy(misfire_grace=7200, misfire="catch_up", catch_up_max=10))
    assert [d.action for d in every] == ["fire"] * 4
    capped = plan(due, now, Policy(misfire_grace=7200, misfire="catch_up", catch_up_max=3))
    assert [(d.slot, d.action) for d in capped] == [
        (due[0], "skip"), (due[1], "fire"), (due[2], "fire"), (due[3], "fire")]
    assert "catch_up_max 3" in capped[0].reason


@pytest.mark.parametrize("misfire", ["coalesce", "catch_up"])
def test_restart_after_an_hour_beyond_grace_is_recorded_as_skipped(misfire: str) -> None:
    due, now = _hour_of_downtime()
    got = plan(due, now, Policy(misfire_grace=300, misfire=misfire))  # type: ignore[arg-type]
    # 10:15, 10:30, 10:45 are > 300 s late; 11:00 (30 s late) is within the grace and fires
    assert [(d.slot, d.action) for d in got] == [
        (due[0], "skip"), (due[1], "skip"), (due[2], "skip"), (due[3], "fire")]
    assert got[0].reason.startswith("misfire: 2730 s late")
    none_within = plan(due, now + timedelta(minutes=10), Policy(misfire_grace=300, misfire=misfire))  # type: ignore[arg-type]
    assert [d.action for d in none_within] == ["skip"] * 4


def test_overlap_skip_records_a_skipped_slot_and_queue_fires() -> None:
    slot = utc(2026, 7, 1, 10, 15)
    skipped = plan([slot], slot, Policy(overlap="skip"), active_run="R1")
    assert [(d.action, d.data) for d in skipped] == [("skip", {"overlapped": "R1"})]
    assert "still active" in skipped[0].reason
    for overlap in ("queue", "allow"):
        assert [d.action for d in plan([slot], slot, Policy(overlap=overlap), active_run="R1")] == ["fire"]  # type: ignore[arg-type]
    assert [d.action for d in plan([slot], slot, Policy(overlap="skip"))] == ["fire"]


def test_a_long_outage_is_summarised_not_dropped() -> None:
    clock = SlotClock(tz=CHI, every="1m")
    now = utc(2026, 7, 2, 0, 0, 30)
    due = slots(clock, utc(2026, 7, 1, 0, 0), now)
    got = plan(due, now, Policy(misfire_grace=60))
    assert len(got) == MAX_SKIP_RECORDS + 1  # one summary + (MAX - 1) recent misses + the fire
    summary = got[0]
    assert summary.data["slots_skipped"] + (MAX_SKIP_RECORDS - 1) + 1 == len(due)
    assert [d.action for d in got[1:]] == ["skip"] * (MAX_SKIP_RECORDS - 1) + ["fire"]
    assert len({d.slot for d in got}) == len(got)  # each record has its own slot, so its own run id
