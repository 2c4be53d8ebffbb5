"""Requests on the scheduler's control socket (gateway, CLI, doctor): launch (`launches.py`), cancel, list
and get runs, schedules and pause/resume, re-runs (`reruns.py`) and backfills (`backfills.py`),
identity. (The request types and their serving loop are in `shared.control`.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

import shared
from shared.config import Settings, endpoints_of
from shared.control import (
    Backfill,
    Cancel,
    GetRun,
    Identity,
    Launch,
    ListBackfills,
    ListRuns,
    ListSchedules,
    Pause,
    Rerun,
    Resume,
)
from shared.dispatch import CancelRun
from shared.errors import BadParams, Conflict, NotFound, ProtocolError
from shared.ids import check_run_id
from shared.journal import read_events
from shared.replies import CancelResult, IdentityInfo, RunDetail, RunList, RunnerFacts, ScheduleList
from shared.runstate import RUN_STATUSES, fold

from .backfills import Backfills
from .dispatcher import Send
from .journaling import Journaling
from .launches import Launches
from .reruns import Reruns
from .runbook import RunBook
from .runs import RunRecord, read_record
from .schedules import ScheduleDriver

log = logging.getLogger(__name__)


class ControlHandler:
    def __init__(self, book: RunBook, settings: Settings, launches: Launches, schedules: ScheduleDriver,
                 journaling: Journaling, send: Send, wait_reason: Callable[[RunRecord], str | None],
                 judge_now: Callable[[], float], reruns: Reruns, backfills: Backfills) -> None:
        self.book = book
        self.settings = settings
        self.journal_dir = settings.journal_dir
        self.launches = launches
        self.schedules = schedules
        self.journaling = journaling
        self.send = send
        self.wait_reason = wait_reason
        self.judge_now = judge_now  # the runner monitor's clock: what a runner's last_seen is on
        self.reruns = reruns
        self.backfills = backfills

    async def handle(self, req: Any) -> Any:  # each request's reply type (checked by serve_requests)
        match req:
            case Launch():
                return await self.launches.launch(req)
            case Cancel():
                return await self._cancel(req)
            case ListRuns():
                return self._list_runs(req)
            case GetRun():
                return await self._get_run(req)
            case ListSchedules():
                return ScheduleList(schedules=self.schedules.describe())
            case Pause():
                return await self.schedules.set_paused(req.name, True)
            case Resume():
                return await self.schedules.set_paused(req.name, False)
            case Rerun():
                return await self.reruns.rerun(req)
            case Backfill():
                return await self.backfills.backfill(req)
            case ListBackfills():
                return self.backfills.listing(req)
            case Identity():
                return self._identity()
        raise ProtocolError(f"{type(req).__name__} is not a scheduler operation (the runner answers it)")

    def _find(self, run_id: str) -> RunRecord:
        check_run_id(run_id)
        rec = self.book.get(run_id)
        if rec is None:
            raise NotFound(f"run {run_id} not found in {self.journal_dir}")
        return rec

    async def _cancel(self, req: Cancel) -> CancelResult:
        rec = self._find(req.run_id)
        reason = req.reason or "cancelled on request"
        if rec.phase == "ended":
            raise Conflict(f"run {rec.run_id} has already ended ({rec.outcome}); nothing to cancel")
        if rec.phase == "ending":
            raise Conflict(f"run {rec.run_id} is already being ended by the scheduler")
        if rec.phase == "queued":
            await self.journaling.end_run(rec, "cancelled", reason, {"reason": reason})
            return CancelResult(run_id=rec.run_id, status="cancelled")
        rec.cancel_requested = True
        rec.msg = reason
        if rec.phase != "dispatching" and rec.runner in self.book.runners:
            await self.send(self.book.runners[rec.runner],
                            CancelRun(run_id=rec.run_id, attempt=rec.attempt, reason=reason))
        log.info("run %s: cancel forwarded to runner %s", rec.run_id, rec.runner)
        return CancelResult(run_id=rec.run_id, status="cancelling")

    def _list_runs(self, req: ListRuns) -> RunList:
        runs = self.book.runs
        if req.status is not None and req.status not in RUN_STATUSES:
            raise BadParams(f"status {req.status!r}: expected one of {', '.join(RUN_STATUSES)}")
        limit = max(1, min(req.limit, 10_000))
        out = []
        for run_id in sorted(runs, reverse=True):
            rec = runs[run_id]
            if req.status is None or rec.status == req.status:
                out.append(rec.summary(self.wait_reason(rec)))
                if len(out) >= limit:
                    break
        return RunList(runs=out)

    async def _get_run(self, req: GetRun) -> RunDetail:
        rec = self.book.get(check_run_id(req.run_id))
        if rec is None:
            rec = await anyio.to_thread.run_sync(read_record, self.journal_dir, req.run_id)
            if rec is None:
                raise NotFound(f"run {req.run_id} not found in {self.journal_dir}")
        events = await anyio.to_thread.run_sync(read_events, self.journal_dir, rec.run_id)
        state = fold(rec.run_id, events)
        fields = msgspec.structs.asdict(rec.summary(self.wait_reason(rec)))
        fields["last_seq"] = max(fields["last_seq"], state.last_seq)  # the journal, just read, may be ahead
        return RunDetail(**fields, stages=state.stages)

    def _identity(self) -> IdentityInfo:
        runners = {}
        now = self.judge_now()  # last_seen is judge time
        for r in self.book.runners.values():
            if r.connected and r.status is not None:
                st = r.status
                runners[r.runner_id] = RunnerFacts(
                    runner_id=r.runner_id, pid=st.pid, version=st.version, config_path=st.config_path,
                    journal_dir=st.journal_dir, publish=st.publish, control=st.control,
                    capacity=st.capacity, runs=len(r.runs), last_seen_s=round(now - r.last_seen, 3),
                )
        return IdentityInfo(service="scheduler", version=shared.__version__, pid=os.getpid(),
                            config_path=str(self.settings.path), journal_dir=str(self.journal_dir),
                            endpoints=endpoints_of(self.settings), runners=runners)
