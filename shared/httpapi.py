"""The gateway's HTTP answers as Structs (the routes of CONTRACT.md "HTTP"; gateway_svc/api.py documents
each route): the gateway encodes them, the CLI and doctor decode them, and the dashboard's mirror of
their field names (gateway_svc/static/shapes.js) is checked against them by a test.

Every field is always present (no omit_defaults): a JSON client sees `null`, never a missing key.
"""

from __future__ import annotations

from typing import Any

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
