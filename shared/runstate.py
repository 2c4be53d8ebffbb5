"""A run's state, derived from its events alone (the journal is the truth): status, times, stages,
fan-out items and latest metrics. The gateway, the scheduler's recovery and the CLI all fold events
through `RunState.apply`, so there is one meaning of "running" or "failed".

Conventions the runner follows (and this module reads):
- pipeline `queued` carries data {pipeline, params, trigger, schedule?, slot?, rerun_of?, from_stage?,
  backfill?} (a re-run names the run it repeats, and the stage it starts from);
- pipeline `start` marks the run running; the terminal pipeline event ends it;
- a stage's `start`/`success`/`failure`/`skipped`/`cancelled` without `data.item` is the stage's own;
  with `data.item` it is one fan-out item's (e.g. {"item": "ES"});
- a `metric` event's data updates the stage's latest metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from .events import PIPELINE_STAGE, TERMINAL_KINDS, Event

RunStatus = Literal["queued", "running", "success", "failure", "cancelled"]
RUN_STATUSES: tuple[str, ...] = RunStatus.__args__  # type: ignore[attr-defined]
_STAGE_STATUS = {"start": "running", "success": "success", "failure": "failure", "skipped": "skipped", "cancelled": "cancelled"}


class RunFields(msgspec.Struct, kw_only=True):
    """What every view of a run says about it, from its journal: the scheduler's run summary
    (shared.replies.RunSummary) and the HTTP API's run (shared.httpapi.RunView) both start with these,
    so the two cannot drift apart field by field. Each subclass sets its own encoding options."""

    run_id: str
    pipeline: str
    status: RunStatus
    trigger: str
    schedule: str | None
    slot: str | None
    params: dict[str, Any]
    queued_at: str | None
    started_at: str | None
    ended_at: str | None
    msg: str  # the terminal event's msg once ended (a failure's cause); a cancel's reason while cancelling
    last_seq: int


# no omit_defaults: every field is always there, as the HTTP API's run detail documents its stages
class ItemState(msgspec.Struct):
    status: str = "running"
    started_at: str | None = None
    ended_at: str | None = None
    msg: str = ""


class StageState(msgspec.Struct):
    name: str
    status: str = "pending"
    started_at: str | None = None
    ended_at: str | None = None
    msg: str = ""
    metrics: dict[str, Any] = {}
    items: dict[str, ItemState] = {}


class RunState(msgspec.Struct):
    run_id: str
    status: RunStatus = "queued"
    pipeline: str = ""
    params: dict[str, Any] = {}
    trigger: str = "manual"
    schedule: str | None = None
    slot: str | None = None
    rerun_of: str | None = None  # the run this one repeats (a re-run, or a backfill of a slot that ran)
    from_stage: str | None = None  # a re-run from a failed stage: the stage it starts from
    queued_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    msg: str = ""
    last_seq: int = 0
    stages: dict[str, StageState] = {}

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL_KINDS

    def apply(self, ev: Event) -> None:
        """Fold one event in; events must come in seq order."""
        self.last_seq = ev.seq
        data = ev.data or {}
        if ev.stage == PIPELINE_STAGE:
            if ev.event == "queued":
                self.queued_at = ev.timestamp
                self.pipeline = str(data.get("pipeline", self.pipeline))
                params = data.get("params")
                if isinstance(params, dict):
                    self.params = params
                self.trigger = str(data.get("trigger", self.trigger))
                self.schedule = data.get("schedule") or self.schedule
                self.slot = data.get("slot") or self.slot
                rerun_of, from_stage = data.get("rerun_of"), data.get("from_stage")
                self.rerun_of = rerun_of if isinstance(rerun_of, str) else None
                self.from_stage = from_stage if isinstance(from_stage, str) else None
            elif ev.event == "start":
                self.status = "running"
                self.started_at = ev.timestamp
            elif ev.event in TERMINAL_KINDS:
                self.status = ev.event  # type: ignore[assignment]
                self.ended_at = ev.timestamp
                self.msg = ev.msg
            return
        stage = self.stages.get(ev.stage)
        if stage is None:
            stage = self.stages[ev.stage] = StageState(name=ev.stage)
        if ev.event == "metric":
            stage.metrics = {**stage.metrics, **data}
            return
        status = _STAGE_STATUS.get(ev.event)
        if status is None:
            return
        item = data.get("item")
        if item is not None:
            it = stage.items.get(str(item))
            if it is None:
                it = stage.items[str(item)] = ItemState()
            it.status = status
            if ev.event == "start":
                it.started_at = ev.timestamp
            else:
                it.ended_at = ev.timestamp
                it.msg = ev.msg
            return
        stage.status = status
        if ev.event == "start":
            stage.started_at = ev.timestamp
        else:
            stage.ended_at = ev.timestamp
            stage.msg = ev.msg


def open_stages(state: RunState) -> list[tuple[str, str | None]]:
    """(stage, item) pairs still `running` in a run's state, items first: what a writer ending the run
    on someone else's behalf (runner restarted, runner lost) must end too, so no stage stays running."""
    out: list[tuple[str, str | None]] = []
    for stage in state.stages.values():
        out.extend((stage.name, item) for item, it in stage.items.items() if it.status == "running")
        if stage.status == "running":
            out.append((stage.name, None))
    return out


def fold(run_id: str, events: Iterable[Event]) -> RunState:
    state = RunState(run_id=run_id)
    for ev in events:
        state.apply(ev)
    return state
