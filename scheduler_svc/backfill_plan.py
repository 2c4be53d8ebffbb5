"""What a backfill runs: for each slot of a schedule in a window, a run or the reason there is none.
Pure: the slots and what is known of each slot's runs come in, the decisions go out.

A slot's run id is its own (`slots.slot_run_id`: `<slot in UTC>-<schedule>`), so a slot's first run,
whether the schedule or a backfill made it, is the same journal, created exclusively: it exists once.
A slot that already has runs gets, when the policy runs it again, the derived id `<slot id>.r<N>`
(N one past the highest so far), its `queued` data naming the slot's latest run as `rerun_of`.

Policies, each including the one before (a slot with a run still queued or running is never touched):
- `missing`: slots without a run, or whose runs never started (the schedule recorded the slot as
  skipped: a misfire, coalesced, overlap; or it was cancelled while queued);
- `failed`: those, and slots whose latest run failed or was cancelled;
- `all`: every slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from shared.replies import BackfillSlot

from .runs import RunRecord
from .slots import iso_utc, slot_run_id

POLICIES = ("missing", "failed", "all")


@dataclass(frozen=True)
class SlotRuns:
    """The runs a slot has: the latest (None: none), and the id its next run would get."""

    latest: RunRecord | None
    next_id: str


def never_started(rec: RunRecord) -> bool:
    """A slot's run that ended without running: a skip record, or cancelled while queued."""
    return rec.ended and rec.outcome == "cancelled" and rec.started_at is None and rec.attempt == 0


def derived_id(slot_id: str, n: int) -> str:
    return f"{slot_id}.r{n}"


def slot_runs(slot_id: str, known: Callable[[str], RunRecord | None], exists: Callable[[str], bool]) -> SlotRuns:
    """The slot's runs from `known` (the run book) and `exists` (its journal is on disk): the slot's own
    id, then `.r1`, `.r2` ... while they exist."""
    if known(slot_id) is None and not exists(slot_id):
        return SlotRuns(None, slot_id)
    latest = known(slot_id)
    n = 1
    while True:
        rid = derived_id(slot_id, n)
        rec = known(rid)
        if rec is None and not exists(rid):
            return SlotRuns(latest, rid)
        latest = rec or latest
        n += 1


def decide(slot: datetime, schedule: str, policy: str, runs: SlotRuns, pending_in: str | None) -> BackfillSlot:
    """The decision for one slot. `pending_in`: another backfill that has this slot still to run."""
    slot_iso = iso_utc(slot)
    own = slot_run_id(slot, schedule)

    def run(why: str) -> BackfillSlot:
        latest = runs.latest.run_id if runs.latest is not None and runs.next_id != own else None
        return BackfillSlot(slot=slot_iso, action="run", run_id=runs.next_id, rerun_of=latest, reason=why)

    def skip(why: str, run_id: str | None = None) -> BackfillSlot:
        return BackfillSlot(slot=slot_iso, action="skip", run_id=run_id, rerun_of=None, reason=why)

    if pending_in is not None:
        return skip(f"backfill {pending_in} has this slot still to run")
    latest = runs.latest
    if latest is None:
        if runs.next_id != own:  # journals on disk the run book does not hold (being created right now)
            return skip(f"slot has a journal ({own}) not yet known as a run; try again")
        return run("no run for this slot")
    if not latest.ended:
        return skip(f"run {latest.run_id} of this slot is still {latest.status}", latest.run_id)
    if never_started(latest):
        return run(f"run {latest.run_id} of this slot never started ({latest.msg or 'cancelled'})")
    if policy == "missing":
        return skip(f"ran: run {latest.run_id} ended {latest.outcome} (policy missing)", latest.run_id)
    if latest.outcome in ("failure", "cancelled"):
        return run(f"run {latest.run_id} ended {latest.outcome}")
    if policy == "failed":
        return skip(f"ran: run {latest.run_id} ended {latest.outcome} (policy failed)", latest.run_id)
    return run(f"run {latest.run_id} ended {latest.outcome} (policy all)")
