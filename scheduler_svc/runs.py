"""The scheduler's view of runs: one record per run, and rebuilding it from the journals at start.

Journals are the truth for a run's existence and end: at start every `<home>/events/` journal is read
from its tail (`JournalReader.last_event`) and its first lines (the `queued` data, and the runner's
`start` with its attempt), never in full.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared.events import PIPELINE_STAGE, TERMINAL_KINDS, Event
from shared.journal import JournalReader, journal_path, list_run_ids
from shared.replies import RunSummary

log = logging.getLogger(__name__)

# queued: the scheduler owns the journal. dispatching: DispatchRun being sent. dispatched: sent, not yet
# accepted. running: accepted by a runner. ending: the scheduler is writing the terminal event itself
# (runner lost); it no longer takes a concurrency slot. ended: terminal event in the journal.
Phase = Literal["queued", "dispatching", "dispatched", "running", "ending", "ended"]
ACTIVE_PHASES: frozenset[Phase] = frozenset({"dispatching", "dispatched", "running"})


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    params: dict[str, Any]
    trigger: str = "manual"
    schedule: str | None = None
    slot: str | None = None
    rerun_of: str | None = None  # the run this one repeats (queued data)
    from_stage: str | None = None  # a re-run from a failed stage: where it starts (queued data)
    backfill: str | None = None  # the backfill that queued it (queued data)
    queued_at: str | None = None
    phase: Phase = "queued"
    outcome: str | None = None  # success | failure | cancelled once ended
    started_at: str | None = None
    ended_at: str | None = None
    msg: str = ""
    runner: str | None = None
    attempt: int = 0
    last_seq: int = 1
    cancel_requested: bool = False
    not_before: float = 0.0  # monotonic: a rejected dispatch is retried after this
    rejections: int = 0
    last_rejection: str = ""
    unreported_since: float | None = None  # monotonic: its runner's status stopped listing it
    recovered: bool = False  # found active in the journals at start: awaiting its runner's word
    phase_since: float = field(default_factory=time.monotonic)

    @property
    def on_schedule(self) -> bool:
        """Fired by its schedule's clock: what the overlap policies look at (a backfill's runs are metered
        by the backfill instead)."""
        return self.schedule is not None and self.trigger == "schedule"

    @property
    def ended(self) -> bool:
        return self.phase == "ended"

    @property
    def status(self) -> str:
        """The status users see: queued, running, success, failure, cancelled."""
        if self.phase == "ended":
            return self.outcome or "failure"
        if self.phase in ("running", "ending"):
            return "running"
        return "queued"

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.phase_since = time.monotonic()

    def end(self, ev: Event) -> None:
        self.set_phase("ended")
        self.outcome = ev.event
        self.ended_at = ev.timestamp
        self.msg = ev.msg
        self.last_seq = ev.seq

    def summary(self, waiting: str | None = None) -> RunSummary:
        """The run for ListRuns/GetRun; `waiting` (the dispatcher's wait reason) only for a queued run.
        A run that ended says why in `msg` (its terminal event's), never in `waiting`."""
        return RunSummary(
            run_id=self.run_id, pipeline=self.pipeline, status=self.status,  # type: ignore[arg-type]
            trigger=self.trigger, schedule=self.schedule, slot=self.slot, params=self.params,
            queued_at=self.queued_at, started_at=self.started_at, ended_at=self.ended_at, msg=self.msg,
            last_seq=self.last_seq, runner=self.runner, attempt=self.attempt,
            waiting=waiting if self.phase == "queued" else None,
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def record_from_queued(ev: Event) -> RunRecord:
    data = ev.data or {}
    params = data.get("params")
    return RunRecord(
        run_id=ev.run_id,
        pipeline=str(data.get("pipeline", "")),
        params=params if isinstance(params, dict) else {},
        trigger=str(data.get("trigger", "manual")),
        schedule=data.get("schedule"),
        slot=data.get("slot"),
        rerun_of=_text(data.get("rerun_of")),
        from_stage=_text(data.get("from_stage")),
        backfill=_text(data.get("backfill")),
        queued_at=ev.timestamp,
        last_seq=ev.seq,
    )


def read_record(journal_dir: Path, run_id: str) -> RunRecord | None:
    """A run's record from its journal's first lines and last line; None if it has no readable events."""
    reader = JournalReader(journal_path(journal_dir, run_id), run_id)
    head = reader.head()
    if not head or head[0].event != "queued":
        log.warning("journal of run %s in %s: no `queued` first event; not a run the scheduler knows",
                    run_id, journal_dir)
        return None
    rec = record_from_queued(head[0])
    for ev in head[1:]:
        if ev.stage == PIPELINE_STAGE and ev.event == "start":
            data = ev.data or {}
            rec.started_at = ev.timestamp
            rec.runner = data.get("runner") if isinstance(data.get("runner"), str) else None
            attempt = data.get("attempt")
            rec.attempt = attempt if isinstance(attempt, int) else 0
            rec.set_phase("running")
            break
    last = reader.last_event()
    if last is not None:
        rec.last_seq = last.seq
        if last.stage == PIPELINE_STAGE and last.event in TERMINAL_KINDS:
            rec.end(last)
        elif last.seq > 1 and rec.phase == "queued":
            rec.set_phase("running")  # its start is not in the head: unusual but possible
    return rec


def scan_journals(journal_dir: Path) -> list[RunRecord]:
    out = []
    for run_id in list_run_ids(journal_dir):
        rec = read_record(journal_dir, run_id)
        if rec is not None:
            out.append(rec)
    return out
