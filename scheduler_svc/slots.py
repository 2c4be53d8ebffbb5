"""Schedule arithmetic: when a schedule's slots fall, as UTC instants. Pure functions of `now`; no clock.

DST semantics (America/Chicago is the demo zone; every IANA zone works the same way):

- Sub-hourly schedules (a cron expression that fires more than once in an hour, or `every` < 1 h)
  follow elapsed real time. `*/15` fires every 15 real minutes straight through both transitions: on
  the fall-back night the wall-clock hour 01:00-01:59 happens twice and fires 8 times (01:00 CDT ...
  01:45 CDT, 01:00 CST ... 01:45 CST); on the spring-forward night 02:00-02:59 does not exist, and
  nothing is "missed": 01:45 CST is followed by 03:00 CDT, 15 real minutes later.
- Hourly-or-slower schedules (one fire per hour or fewer: `0 * * * *`, `30 2 * * *`, `every = "1d"`)
  follow the wall clock, like Debian cron's handling of fixed-time jobs:
  * a local time that does not exist fires at the next valid time: 02:30 on 2026-03-08 fires at
    03:00 CDT (08:00Z); slots that land on the same instant fire once (hourly 02:00 and 03:00 both
    map to 03:00 CDT);
  * a local time that happens twice fires once, at its first occurrence (fold 0, daylight time):
    01:30 on 2026-11-01 fires at 01:30 CDT (06:30Z) only. An hourly schedule therefore has a two-hour
    real gap that night (01:00 CDT, then 02:00 CST).
- cronsim (Debian-cron compatible) parses and matches every expression. For 5-field expressions with a
  fixed minute and hour it applies exactly the rule above itself; for expressions with a wildcard hour
  (`0 * * * *`) Debian cron (and cronsim) fire by the new wall time, i.e. twice in the repeated hour.
  runwire deliberately differs there (hourly-or-slower fires once): hourly-or-slower expressions are
  walked on naive wall time (cronsim without a zone) and localised here; sub-hourly expressions are
  walked in real time (cronsim with the zone, in its 6-field form so no wall-clock fix-up applies).
  tests/test_scheduler_slots.py pins both cronsim's own behaviour and ours.
- `every` slots are aligned to `anchor` (a local time): every 15 minutes means :00, :15, :30, :45
  whenever the service started. Sub-hourly: anchor + k * period in real time. Hourly-or-slower:
  anchor + k * period on the wall clock, localised by the rules above.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from cronsim import CronSim

from shared.config import ScheduleConfig, parse_duration

UTC = timezone.utc
_MINUTE = timedelta(minutes=1)
# How far before a wall time to start a naive cron walk, so no slot near a DST shift is missed.
_NAIVE_LOOKBACK = timedelta(hours=3)


def is_imaginary(naive: datetime, tz: ZoneInfo) -> bool:
    """True when the local wall time `naive` does not exist in `tz` (it falls in a spring-forward gap)."""
    aware = naive.replace(tzinfo=tz, fold=0)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != naive


def localize(naive: datetime, tz: ZoneInfo) -> datetime:
    """A local wall time as a UTC instant: its first occurrence when repeated; the first valid minute
    after the gap when it does not exist (as Debian cron and cronsim do)."""
    if is_imaginary(naive, tz):
        naive = naive.replace(second=0, microsecond=0)
        while is_imaginary(naive, tz):
            naive += _MINUTE
    return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)


def to_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("schedule arithmetic needs aware datetimes")
    return moment.astimezone(UTC)


class SlotClock:
    """The slots of one schedule. `next_after(t)` is the first slot strictly after `t` (UTC)."""

    def __init__(self, *, tz: ZoneInfo, cron: str | None = None, every: str | None = None,
                 anchor: str = "2000-01-01T00:00:00") -> None:
        if (cron is None) == (every is None):
            raise ValueError("a schedule needs exactly one of cron or every")
        self.tz = tz
        self.cron = cron
        self.every = every
        if cron is not None:
            probe = CronSim(cron, datetime(2000, 1, 1))
            fields = cron.split()
            self._cron6 = cron if len(fields) == 6 else f"0 {cron}"
            # fires per hour > 1: several minutes, or several seconds (6-field form)
            self.sub_hourly = len(probe.minutes) * len(probe.seconds) > 1
            self.period: timedelta | None = None
        else:
            assert every is not None
            self.period = timedelta(seconds=parse_duration(every))
            self.sub_hourly = self.period < timedelta(hours=1)
            self._anchor_naive = datetime.fromisoformat(anchor).replace(tzinfo=None)
            self._anchor_utc = localize(self._anchor_naive, tz)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, default_tz: str) -> SlotClock:
        return cls(tz=ZoneInfo(cfg.timezone or default_tz), cron=cfg.cron, every=cfg.every, anchor=cfg.anchor)

    @property
    def spec(self) -> str:
        return self.cron if self.cron is not None else f"every {self.every}"

    def next_after(self, after: datetime) -> datetime:
        after = to_utc(after)
        if self.cron is not None:
            if self.sub_hourly:
                return self._cron_real_next(after)
            return self._cron_wall_next(after)
        if self.sub_hourly:
            return self._every_real_next(after)
        return self._every_wall_next(after)

    def iter_after(self, after: datetime) -> Iterator[datetime]:
        """Slots strictly after `after`, ascending, forever."""
        t = to_utc(after)
        while True:
            t = self.next_after(t)
            yield t

    def slots_between(self, after: datetime, until: datetime, limit: int = 100_000) -> tuple[list[datetime], bool]:
        """Slots in (after, until], ascending, at most `limit`; and whether more were left out."""
        out: list[datetime] = []
        until = to_utc(until)
        for slot in self.iter_after(after):
            if slot > until:
                return out, False
            if len(out) >= limit:
                return out, True
            out.append(slot)
        raise AssertionError("unreachable")

    # -- cron

    def _cron_real_next(self, after: datetime) -> datetime:
        # cronsim with an aware datetime ticks in real time; the 6-field form opts out of its
        # wall-clock fix-up, so every matching wall time that occurs (twice in a repeated hour) fires.
        start = after.replace(microsecond=0).astimezone(self.tz)
        for slot in CronSim(self._cron6, start):
            slot_utc = slot.astimezone(UTC)
            if slot_utc > after:
                return slot_utc
        raise AssertionError("unreachable")

    def _cron_wall_next(self, after: datetime) -> datetime:
        assert self.cron is not None
        start = after.astimezone(self.tz).replace(tzinfo=None, microsecond=0) - _NAIVE_LOOKBACK
        for naive in CronSim(self.cron, start):  # naive: cronsim walks the wall clock, no DST
            slot = localize(naive, self.tz)
            if slot > after:
                return slot
        raise AssertionError("unreachable")

    # -- every

    def _every_real_next(self, after: datetime) -> datetime:
        assert self.period is not None
        k = (after - self._anchor_utc) // self.period + 1
        return self._anchor_utc + k * self.period

    def _every_wall_next(self, after: datetime) -> datetime:
        assert self.period is not None
        naive_after = after.astimezone(self.tz).replace(tzinfo=None)
        k = (naive_after - self._anchor_naive - _NAIVE_LOOKBACK) // self.period
        while True:
            slot = localize(self._anchor_naive + k * self.period, self.tz)
            if slot > after:
                return slot
            k += 1


def slot_run_id(slot: datetime, schedule: str) -> str:
    """The run id of a schedule's slot: sorts by slot time, and names at most one run per slot."""
    return f"{to_utc(slot).strftime('%Y%m%dT%H%M%S%fZ')}-{schedule}"


def iso_utc(moment: datetime) -> str:
    return to_utc(moment).isoformat().replace("+00:00", "Z")
