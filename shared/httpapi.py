"""The gateway's HTTP answers as Structs (the routes of CONTRACT.md "HTTP"; gateway_svc/api.py documents
each route): the gateway encodes them, the CLI and doctor decode them, and the dashboard's mirror of
their field names (gateway_svc/static/shapes.js) is checked against them by a test.

Every field is always present (no omit_defaults): a JSON client sees `null`, never a missing key.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .alertlog import AlertView
from .events import Event
from .replies import RunDetail, ScheduleInfo
from .runstate import RunFields, RunStatus, StageState


class RunView(RunFields, kw_only=True):
    """A run in GET /api/runs, from the journals: the run's fields and what the gateway adds."""

    waiting: str | None = None  # queued runs: why, as the scheduler says (RunSummary.waiting)
    rerun_of: str | None = None  # the run this one repeats (a re-run, or a backfill of a slot that ran)
    from_stage: str | None = None  # a re-run from a failed stage: the stage it started from


class RunsPage(msgspec.Struct, kw_only=True):
    runs: list[RunView]
    next_before: str | None  # the run id to pass as `before` for the next page


class RunPage(RunView, kw_only=True):
    """GET /api/runs/{run_id}: the run with its stages, in the pipeline's order."""

    stages: list[StageState]
    scheduler: RunDetail | None = None  # the scheduler's GetRun answer, for a run not ended
    reruns: list[str] = []  # the runs that repeat this one (their queued event names it as rerun_of)
    alerts: list[AlertView] = []  # its alert deliveries (<home>/alerts/<run_id>.jsonl), each by its latest attempt


class EventsPage(msgspec.Struct, kw_only=True):
    """GET /api/runs/{run_id}/events."""

    run_id: str
    events: list[Event]
    next_after_seq: int
    more: bool
    gaps: list[list[int]]  # [first, last] seqs missing from the journal (lines its reader skipped)


class Launched(msgspec.Struct, kw_only=True):
    """POST /api/runs (202)."""

    run_id: str
    status: RunStatus


class SchedulesPage(msgspec.Struct, kw_only=True):
    """GET /api/schedules; pause and resume answer one ScheduleInfo, cancel the scheduler's CancelResult."""

    schedules: list[ScheduleInfo]


class ParamView(msgspec.Struct, kw_only=True):
    name: str
    type: str
    default: Any
    choices: list[Any] | None
    description: str


class PipelineView(msgspec.Struct, kw_only=True):
    name: str
    description: str
    stages: list[str]
    params: list[ParamView]


class PipelinesPage(msgspec.Struct, kw_only=True):
    """GET /api/pipelines."""

    pipelines: list[PipelineView]


# ------------------------------------------------------------------------------------------ /healthz


class RunnerHealth(msgspec.Struct, kw_only=True):
    """One publisher that is a runner, as the gateway hears its heartbeats."""

    fresh: bool  # a heartbeat within gateway.runner_stale_after, and not a stopping one
    stopping: bool  # its last heartbeat said it was stopping
    age_s: float  # seconds since its last heartbeat
    journal_dir: str
    same_journal_dir: bool  # the directory the gateway reads
    runs_listed: int  # runs its heartbeat lists (owned now, and ended a moment ago)
    runs_active: int  # of those, the runs not ended in the journal the gateway reads


class HealthCheck(msgspec.Struct, kw_only=True):
    """One check of /healthz: ok, and why in words; each kind adds what it looked at."""

    ok: bool
    detail: str


class SchedulerHealth(HealthCheck, kw_only=True):
    endpoint: str  # its control endpoint (in cluster mode: the leader's)
    journal_dir: str | None = None  # the journal directory it writes (None: it did not answer)
    pid: int | None = None


class RunnersHealth(HealthCheck, kw_only=True):
    runners: dict[str, RunnerHealth]  # every runner heard, by id


class JournalDirHealth(HealthCheck, kw_only=True):
    path: str  # the directory the gateway reads


class EventStreamHealth(HealthCheck, kw_only=True):
    """Cluster mode: the gateway's connection to NATS JetStream (its source of replays and gap fills)."""

    servers: list[str]
    connected_to: str | None  # host:port of the server it is connected to


class RegistryHealth(HealthCheck, kw_only=True):
    """Cluster mode: the runner registry (PostgreSQL) the gateway follows; away, the last known runners
    are still followed, so it never fails /healthz (it is listed in `degraded`)."""

    where: str
    runners: dict[str, str]  # runner id -> the PUB endpoint followed
    refused: dict[str, str]  # runner id -> why its endpoint is not followed
    polls: int
    last_ok_age_s: float | None  # seconds since the registry last answered


class HealthChecks(msgspec.Struct, kw_only=True):
    scheduler: SchedulerHealth
    runner: RunnersHealth
    journal_dir: JournalDirHealth | None = None  # single-host mode (in cluster mode the host has no journals)
    event_stream: EventStreamHealth | None = None  # cluster mode
    registry: RegistryHealth | None = None  # cluster mode


class HealthError(msgspec.Struct, kw_only=True):
    code: str  # "unhealthy"
    message: str  # every failed check, "name: detail; ..."


class Health(msgspec.Struct, kw_only=True):
    """GET /healthz: 200 with status "ok", or 503 with status "fail", the failed checks' names and an error."""

    status: Literal["ok", "fail"]
    journal_dir: str
    config_path: str
    checks: HealthChecks
    failed: list[str]  # names of the failed checks ("scheduler", "runner", "journal_dir" or "event_stream")
    degraded: list[str]  # checks that fail without failing /healthz ("registry")
    error: HealthError | None
