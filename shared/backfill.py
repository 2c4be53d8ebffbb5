"""A backfill's request terms, checked the same way by the gateway (a 400 before anyone is asked), the CLI
and the scheduler: the policy, the cap on runs at once, and the window's times."""

from __future__ import annotations

from datetime import date, datetime, time
from zoneinfo import ZoneInfo

from .errors import BadParams

POLICIES = ("missing", "failed", "all")
MAX_PARALLEL_LIMIT = 100
MAX_SLOTS = 10_000  # slots one backfill may cover

_EXAMPLE = "2026-11-22, 2026-11-22T06:00 (the schedule's zone) or 2026-11-22T12:00:00Z"


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise BadParams(f"policy {str(policy)[:40]!r}: expected one of {', '.join(POLICIES)}")
    return policy  # type: ignore[return-value]


def check_max_parallel(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PARALLEL_LIMIT:
        raise BadParams(f"max_parallel {str(n)[:40]!r}: expected a whole number from 1 to {MAX_PARALLEL_LIMIT}")
    return n


def parse_moment(text: object, tz: ZoneInfo, what: str) -> datetime:
    """An ISO 8601 date or time; without an offset it is read in `tz` (a date: its midnight)."""
    if not isinstance(text, str) or not text.strip():
        raise BadParams(f"{what}: expected a time such as {_EXAMPLE}")
    raw = text.strip()
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(raw), time())
        except ValueError:
            raise BadParams(f"{what} {raw[:60]!r}: not a time; expected e.g. {_EXAMPLE}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)  # a repeated local hour: its first occurrence (fold 0)
    return moment


def check_window(start: datetime, end: datetime) -> None:
    if end < start:
        raise BadParams(f"to {end.isoformat()} is before from {start.isoformat()}")
