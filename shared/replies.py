"""The replies on the control sockets, one Struct per request (`shared.control` pairs each request with
its reply): the scheduler and the runner return them, `serve_requests` checks the type at the point of
return, and `ControlClient.call` decodes the answer into it.

Fields a sender always knows have no default, so a reply that lacks one (a field renamed on one side,
an older peer) fails to decode with the field's name instead of going quietly missing; fields that are
really optional have a default and are omitted when they hold it. Unknown fields are tolerated (a newer
peer may add some).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .runstate import RunFields, RunStatus, StageState


class _Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


# ---------------------------------------------------------------------------------------- runs


class LaunchResult(_Reply):
    """Launch: the run that was queued, or (a retry with the same idempotency key) the first one."""

    run_id: str
    status: RunStatus
    replayed: bool = False  # True: the key's first run answered, no new run


class RerunResult(_Reply):
    """Rerun: the new run, queued; it names the run it repeats and, from a failed stage, where it starts."""

    run_id: str
    status: RunStatus
    rerun_of: str
    from_stage: str | None  # None: every stage runs
    skipped_stages: list[str]  # the stages before from_stage, whose outputs are present


class CancelResult(_Reply):
    """Cancel: `cancelled` when the run was still queued (ended at once), else `cancelling` (the
    runner was asked to stop it)."""

    run_id: str
    status: Literal["cancelled", "cancelling"]


class RunSummary(RunFields, kw_only=True, omit_defaults=True):
    """One run as the scheduler knows it now (ListRuns, and the head of GetRun): the run's fields and
    what only the scheduler knows."""

    runner: str | None
    attempt: int
    waiting: str | None  # why a queued run waits ("waiting for a runner ..."); None for any other run


class RunList(_Reply):
    runs: list[RunSummary]


class RunDetail(RunSummary):
    """GetRun: the summary and the run's state folded from its journal, stage by stage."""

    stages: dict[str, StageState]


# ---------------------------------------------------------------------------------------- schedules


class ScheduleInfo(_Reply):
    """One schedule (ListSchedules; Pause and Resume answer the schedule as it is after them)."""

    name: str
    pipeline: str
    cron: str | None
    every: str | None
    spec: str  # the rule in words, as the scheduler reads it
    timezone: str
    paused: bool
    enabled: bool  # not paused
    next_fire: str | None  # local time in the schedule's zone; None while paused
    next_fire_utc: str | None
    last_slot: str
    misfire: str
    misfire_grace: float
    overlap: str
    fire_at_start: bool
    active_run: str | None


class ScheduleList(_Reply):
    schedules: list[ScheduleInfo]


# ---------------------------------------------------------------------------------------- backfills


class BackfillSlot(_Reply):
    """One slot of a backfill's window: what runs (or ran) for it, or why nothing does."""

    slot: str  # ISO UTC
    action: Literal["run", "skip"]
    run_id: str | None  # the run it gets: the slot's own id, or `<slot id>.rN` for a slot that ran
    rerun_of: str | None  # the slot's latest run, when the new run repeats it
    reason: str


class BackfillProgress(_Reply):
    """A backfill and how far it is: its runs by status (pending: not queued yet)."""

    backfill_id: str
    schedule: str
    start: str  # ISO UTC of the window's ends, as given (inclusive)
    end: str
    policy: Literal["missing", "failed", "all"]
    max_parallel: int
    created_at: str
    done: bool  # every run queued and ended
    total: int  # slots that get a run
    pending: int
    queued: int
    running: int
    success: int
    failure: int
    cancelled: int


class BackfillResult(_Reply):
    """Backfill: the plan, slot by slot, and (unless a dry run) the backfill that carries it out."""

    dry_run: bool
    schedule: str
    policy: Literal["missing", "failed", "all"]
    slots: list[BackfillSlot]
    progress: BackfillProgress | None  # None for a dry run, or when no slot needs a run


class BackfillList(_Reply):
    """ListBackfills: newest first."""

    backfills: list[BackfillProgress]


# ---------------------------------------------------------------------------------------- services


class RunnerFacts(_Reply):
    """A runner connected to the scheduler, as its last status said (in the scheduler's Identity)."""

    runner_id: str
    pid: int
    version: str
    config_path: str
    journal_dir: str
    publish: str
    control: str
    capacity: int
    runs: int  # runs it owns now
    last_seen_s: float  # seconds since its last status


class IdentityInfo(_Reply):
    """Identity: what doctor and /healthz compare across services."""

    service: str
    version: str
    pid: int
    config_path: str
    journal_dir: str
    endpoints: dict[str, str] = {}
    runners: dict[str, RunnerFacts] = {}  # scheduler only: the runners connected now


class ProbeResult(_Reply):
    """Probe (runner): the probe run written and published end to end."""

    run_id: str
    last_seq: int
