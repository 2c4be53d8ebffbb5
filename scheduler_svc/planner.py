"""What to do with a schedule's due slots: fire or skip each one (with the reason). Pure: takes `now`.

Misfire policy (per schedule):
- A slot late by at most `misfire_grace` seconds is still due (an ordinary tick is a few ms late;
  a restart within the grace catches up). Beyond the grace it is a misfire: recorded as skipped.
- Several due slots at once (after downtime): `coalesce` fires one run (the newest slot) and records the
  others as skipped ("coalesced into ..."); `catch_up` fires each, at most `catch_up_max` (the newest
  ones), recording the older ones beyond the cap as skipped.
Overlap policy, against runs of the schedule still active when the evaluation starts (runs fired by
the same catch-up batch do not count, or `catch_up` + `skip` could never catch up):
- `skip`: the slot is recorded as skipped ("overlap: run ... still active"); `queue` and `allow` fire
  (the dispatcher holds `queue` runs until the schedule's previous run has ended).
Skipped slots become runs (queued -> pipeline skipped -> cancelled), so nothing is dropped silently;
past `MAX_SKIP_RECORDS` skipped slots in one evaluation, the oldest are summarised in one such run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .slots import iso_utc

MAX_SKIP_RECORDS = 50


@dataclass(frozen=True)
class Decision:
    slot: datetime  # UTC; names the run (see slots.slot_run_id)
    action: Literal["fire", "skip"]
    reason: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    misfire_grace: float = 60.0
    misfire: Literal["coalesce", "catch_up"] = "coalesce"
    catch_up_max: int = 10
    overlap: Literal["skip", "queue", "allow"] = "skip"


def plan(slots: list[datetime], now: datetime, policy: Policy, active_run: str | None = None,
         more_before: bool = False) -> list[Decision]:
    """Decisions for the due `slots` (ascending, all <= now), oldest first.

    `active_run`: a run of this schedule still queued or running, if any. `more_before`: slots older
    than `slots[0]` were due too but not enumerated (a very long outage); they are mentioned.
    """
    missed = [s for s in slots if (now - s).total_seconds() > policy.misfire_grace]
    due = [s for s in slots if (now - s).total_seconds() <= policy.misfire_grace]
    out: list[Decision] = []
    out.extend(_misfires(missed, now, policy, more_before))

    fires: list[tuple[datetime, str, dict[str, Any]]] = []
    if policy.misfire == "coalesce" and len(due) > 1:
        keep = due[-1]
        for s in due[:-1]:
            out.append(Decision(s, "skip", f"coalesced into the run of slot {iso_utc(keep)} (misfire = coalesce)",
                                {"coalesced_into": iso_utc(keep)}))
        fires.append((keep, f"coalesced {len(due)} due slots into one run", {"coalesced": len(due)}))
    else:
        if len(due) > policy.catch_up_max:
            cut = len(due) - policy.catch_up_max
            for s in due[:cut]:
                out.append(Decision(s, "skip", f"catch_up_max {policy.catch_up_max} reached: "
                                               f"{len(due)} slots were due at once"))
            due = due[cut:]
        for s in due:
            late = (now - s).total_seconds()
            why = "on time" if late < 1.0 else f"{late:.0f} s late, within misfire_grace {policy.misfire_grace:g} s"
            if len(due) > 1:
                why = f"catch-up: {why}"
            fires.append((s, why, {}))

    for s, why, data in fires:
        if active_run is not None and policy.overlap == "skip":
            out.append(Decision(s, "skip", f"overlap: run {active_run} of this schedule is still active (overlap = skip)",
                                {"overlapped": active_run}))
        else:
            out.append(Decision(s, "fire", why, data))
    out.sort(key=lambda d: d.slot)
    return out


def _misfires(missed: list[datetime], now: datetime, policy: Policy, more_before: bool) -> list[Decision]:
    if not missed:
        return []
    out: list[Decision] = []
    if len(missed) > MAX_SKIP_RECORDS or more_before:
        cut = max(len(missed) - (MAX_SKIP_RECORDS - 1), 1)
        old = missed[:cut]
        count = f"at least {len(old)}" if more_before else str(len(old))
        out.append(Decision(
            old[-1], "skip",
            f"misfire: {count} slots from {iso_utc(old[0])} to {iso_utc(old[-1])} missed by more than "
            f"misfire_grace {policy.misfire_grace:g} s (one record for all of them)",
            {"slots_skipped": len(old), "first_slot": iso_utc(old[0]), "last_slot": iso_utc(old[-1]),
             "count_exact": not more_before},
        ))
        missed = missed[cut:]
    for s in missed:
        late = (now - s).total_seconds()
        out.append(Decision(s, "skip", f"misfire: {late:.0f} s late, beyond misfire_grace {policy.misfire_grace:g} s",
                            {"late_s": round(late, 3)}))
    return out
