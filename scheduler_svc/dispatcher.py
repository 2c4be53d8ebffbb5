"""Dispatching queued runs to runners with free capacity, under the global, per-pipeline and overlap
limits, and why a queued run waits. (The messages it sends are the wire protocol in `shared.dispatch`.)
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

from shared.dispatch import CancelRun, DispatchRun

from .runs import RunRecord

if TYPE_CHECKING:
    from .runners import RunnerInfo
    from .service import Scheduler

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self._wake = anyio.Event()

    def wake(self) -> None:
        self._wake.set()

    def release_slot(self, rec: RunRecord) -> None:
        s = self.s
        s.queue.pop(rec.run_id, None)
        s.active.pop(rec.run_id, None)
        if rec.runner and rec.runner in s.runners:
            s.runners[rec.runner].runs.discard(rec.run_id)

    def _pipeline_limit(self, pipeline: str) -> int:
        p = self.s.cfg.pipelines.get(pipeline)
        return p.max_concurrent if p else 1

    def _occupancy(self) -> tuple[int, dict[str, int], set[str]]:
        per_pipeline: dict[str, int] = {}
        schedules: set[str] = set()
        for r in self.s.active.values():
            per_pipeline[r.pipeline] = per_pipeline.get(r.pipeline, 0) + 1
            if r.schedule:
                schedules.add(r.schedule)
        return len(self.s.active), per_pipeline, schedules

    def _pick_runner(self) -> RunnerInfo | None:
        best = None
        for r in self.s.runners.values():
            if r.connected and r.free() > 0 and (best is None or r.free() > best.free()):
                best = r
        return best

    def wait_reason(self, rec: RunRecord) -> str | None:
        s = self.s
        if rec.phase != "queued":
            return None
        if rec.not_before > time.monotonic():
            return f"waiting: retry after a runner rejected it ({rec.last_rejection})"
        if not any(r.connected for r in s.runners.values()):
            return f"waiting for a runner (none connected to scheduler.dispatch {s.cfg.scheduler.dispatch})"
        total, per_pipeline, schedules = self._occupancy()
        limit = s.cfg.scheduler.max_concurrent_runs
        if total >= limit:
            return f"waiting: global limit ({limit} runs at once) reached"
        plimit = self._pipeline_limit(rec.pipeline)
        if per_pipeline.get(rec.pipeline, 0) >= plimit:
            return f"waiting: pipeline {rec.pipeline} at its limit ({plimit} at once)"
        if rec.schedule and rec.schedule in schedules and s.schedules.overlap_of(rec.schedule) == "queue":
            return f"waiting: the previous run of schedule {rec.schedule} is still active (overlap = queue)"
        if self._pick_runner() is None:
            return "waiting: every runner is at capacity"
        return "waiting: next in the queue"

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self._dispatch_ready()

    async def _dispatch_ready(self) -> None:
        s = self.s
        limit = s.cfg.scheduler.max_concurrent_runs
        now = time.monotonic()
        total, per_pipeline, schedules = self._occupancy()
        for rec in list(s.queue.values()):
            if total >= limit:
                return
            if rec.phase != "queued" or rec.not_before > now:
                continue
            if per_pipeline.get(rec.pipeline, 0) >= self._pipeline_limit(rec.pipeline):
                continue
            if rec.schedule and rec.schedule in schedules and s.schedules.overlap_of(rec.schedule) == "queue":
                continue
            runner = self._pick_runner()
            if runner is None:
                return
            s.queue.pop(rec.run_id)
            rec.attempt += 1
            rec.runner = runner.runner_id
            rec.set_phase("dispatching")
            runner.runs.add(rec.run_id)
            s.active[rec.run_id] = rec
            total += 1
            per_pipeline[rec.pipeline] = per_pipeline.get(rec.pipeline, 0) + 1
            if rec.schedule:
                schedules.add(rec.schedule)
            # durable before it is sent, so attempt numbers never repeat across a scheduler restart
            await s.state.assign(rec.run_id, runner.runner_id, rec.attempt)
            if rec.phase != "dispatching":  # the runner was declared lost meanwhile
                continue
            msg = DispatchRun(run_id=rec.run_id, attempt=rec.attempt, pipeline=rec.pipeline, params=rec.params)
            if not await s.tracker.send(runner, msg):
                self.requeue(rec, "the dispatch could not be sent", delay=0.5)
                continue
            rec.set_phase("dispatched")
            log.info("run %s (%s) dispatched to runner %s, attempt %d", rec.run_id, rec.pipeline, runner.runner_id, rec.attempt)
            if rec.cancel_requested:
                await s.tracker.send(runner, CancelRun(run_id=rec.run_id, attempt=rec.attempt,
                                                       reason=rec.msg or "cancelled on request"))

    def requeue(self, rec: RunRecord, why: str, delay: float = 0.0) -> None:
        self.release_slot(rec)
        rec.runner = None
        rec.unreported_since = None
        rec.set_phase("queued")
        rec.not_before = time.monotonic() + delay
        rec.last_rejection = why
        self.s.queue[rec.run_id] = rec
        self.wake()
