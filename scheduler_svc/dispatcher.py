"""Dispatching queued runs to runners with free capacity, under the global, per-pipeline and overlap
limits, and why a queued run waits. (The messages it sends are the wire protocol in `shared.dispatch`.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from shared.config import Config
from shared.dispatch import CancelRun, DispatchRun

from .runbook import RunBook, RunnerInfo
from .runs import RunRecord

log = logging.getLogger(__name__)

Send = Callable[[RunnerInfo, msgspec.Struct], Awaitable[bool]]
Assign = Callable[[str, str, int], Awaitable[None]]  # run id, runner id, attempt: made durable


class Dispatcher:
    def __init__(self, book: RunBook, cfg: Config, send: Send, assign: Assign,
                 overlap_of: Callable[[str], str]) -> None:
        self.book = book
        self.cfg = cfg
        self.send = send
        self.assign = assign
        self.overlap_of = overlap_of

    def _pipeline_limit(self, pipeline: str) -> int:
        p = self.cfg.pipelines.get(pipeline)
        return p.max_concurrent if p else 1

    def _occupancy(self) -> tuple[int, dict[str, int], set[str]]:
        per_pipeline: dict[str, int] = {}
        schedules: set[str] = set()
        for r in self.book.active.values():
            per_pipeline[r.pipeline] = per_pipeline.get(r.pipeline, 0) + 1
            if r.on_schedule:
                schedules.add(r.schedule)  # type: ignore[arg-type]
        return len(self.book.active), per_pipeline, schedules

    def _pick_runner(self) -> RunnerInfo | None:
        best = None
        for r in self.book.runners.values():
            if r.connected and r.free() > 0 and (best is None or r.free() > best.free()):
                best = r
        return best

    def wait_reason(self, rec: RunRecord) -> str | None:
        if rec.phase != "queued":
            return None
        if rec.not_before > time.monotonic():
            return f"waiting: retry after a runner rejected it ({rec.last_rejection})"
        if not any(r.connected for r in self.book.runners.values()):
            return f"waiting for a runner (none connected to scheduler.dispatch {self.cfg.scheduler.dispatch})"
        total, per_pipeline, schedules = self._occupancy()
        limit = self.cfg.scheduler.max_concurrent_runs
        if total >= limit:
            return f"waiting: global limit ({limit} runs at once) reached"
        plimit = self._pipeline_limit(rec.pipeline)
        if per_pipeline.get(rec.pipeline, 0) >= plimit:
            return f"waiting: pipeline {rec.pipeline} at its limit ({plimit} at once)"
        if rec.on_schedule and rec.schedule in schedules and self.overlap_of(rec.schedule) == "queue":  # type: ignore[arg-type]
            return f"waiting: the previous run of schedule {rec.schedule} is still active (overlap = queue)"
        if self._pick_runner() is None:
            return "waiting: every runner is at capacity"
        return "waiting: next in the queue"

    async def run(self) -> None:
        while True:
            await self.book.wait_changed()
            await self.dispatch_ready()

    async def dispatch_ready(self) -> None:
        book = self.book
        limit = self.cfg.scheduler.max_concurrent_runs
        now = time.monotonic()
        total, per_pipeline, schedules = self._occupancy()
        for rec in list(book.queue.values()):
            if total >= limit:
                return
            if rec.phase != "queued" or rec.not_before > now:
                continue
            if per_pipeline.get(rec.pipeline, 0) >= self._pipeline_limit(rec.pipeline):
                continue
            if rec.on_schedule and rec.schedule in schedules and self.overlap_of(rec.schedule) == "queue":  # type: ignore[arg-type]
                continue
            runner = self._pick_runner()
            if runner is None:
                return
            book.dispatch(rec, runner)
            total += 1
            per_pipeline[rec.pipeline] = per_pipeline.get(rec.pipeline, 0) + 1
            if rec.on_schedule:
                schedules.add(rec.schedule)  # type: ignore[arg-type]
            # durable before it is sent, so attempt numbers never repeat across a scheduler restart
            await self.assign(rec.run_id, runner.runner_id, rec.attempt)
            if rec.phase != "dispatching":  # the runner was declared lost, or the run cancelled, meanwhile
                log.info("run %s: %s while its dispatch to runner %s was being recorded; not sent",
                         rec.run_id, rec.phase, runner.runner_id)
                continue
            msg = DispatchRun(run_id=rec.run_id, attempt=rec.attempt, pipeline=rec.pipeline, params=rec.params,
                              from_stage=rec.from_stage, rerun_of=rec.rerun_of)
            if not await self.send(runner, msg):
                if rec.phase == "dispatching":
                    book.requeue(rec, "the dispatch could not be sent", delay=0.5)
                continue
            if rec.phase != "dispatching":
                continue  # taken back while sending (the runner will be told to release it)
            book.sent(rec)
            log.info("run %s (%s) dispatched to runner %s, attempt %d", rec.run_id, rec.pipeline, runner.runner_id, rec.attempt)
            if rec.cancel_requested:
                await self.send(runner, CancelRun(run_id=rec.run_id, attempt=rec.attempt,
                                                  reason=rec.msg or "cancelled on request"))
