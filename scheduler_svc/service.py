"""The scheduler service: the run lifecycle (queue, dispatch, runner heartbeats, runner lost, cancel),
its sockets, and the loops that drive them. Schedules are evaluated by `schedules.ScheduleDriver`.

Ownership of a run's journal: the scheduler writes `queued` (begin_run), hands the journal over with
`DispatchRun`, and takes it back only to write an end the runner cannot write (runner lost, cancel while
queued, rejected too often). Every event written here is journalled (fsync) before it is published.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import zmq
import zmq.asyncio

import shared
from shared.config import Settings, endpoints_of, resolve_params
from shared.control import (
    Cancel, GetRun, Identity, IdentityInfo, Launch, ListRuns, ListSchedules, Pause, Resume, serve_requests,
)
from shared.dispatch import (
    CancelRun, DispatchRun, ReleaseRun, RunAccepted, RunFinished, RunnerStatus, RunRejected,
    from_runner_decoder,
)
from shared.dispatch import encode as encode_dispatch
from shared.errors import BadParams, Conflict, JournalError, NotFound, ProtocolError, ServiceUnavailable
from shared.events import PIPELINE_STAGE, Event, now_timestamp
from shared.ids import check_run_id, new_run_id
from shared.journal import JournalReader, JournalWriter, begin_run, journal_path, read_events
from shared.journal import stats_fields as journal_stats_fields
from shared.runstate import RUN_STATUSES, fold, open_stages
from shared.wire import Heartbeat, RecentlyEnded, configure_socket, encode_event_frames, encode_heartbeat_frames

from .runs import ACTIVE_PHASES, RunRecord, read_record, record_from_queued, scan_journals
from .schedules import ScheduleDriver
from .state import StateStore

log = logging.getLogger(__name__)

MAX_REJECTIONS = 5  # dispatch attempts refused by runners before the run fails
_WARN_EVERY = 10.0


@dataclass
class RunnerInfo:
    runner_id: str
    routing: bytes | None = None  # None: known only from journals/state (after a scheduler restart)
    status: RunnerStatus | None = None
    last_seen: float = field(default_factory=time.monotonic)
    lost: bool = False
    runs: set[str] = field(default_factory=set)  # active runs assigned to it

    @property
    def connected(self) -> bool:
        return self.routing is not None and self.status is not None and not self.lost

    def free(self) -> int:
        return (self.status.capacity if self.status else 0) - len(self.runs)


class Scheduler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.config
        self.tz = settings.tz
        self.journal_dir = settings.journal_dir
        self.lost_after = self.cfg.scheduler.runner_lost_after
        self.runs: dict[str, RunRecord] = {}
        self.queue: dict[str, RunRecord] = {}  # phase queued, oldest first
        self.active: dict[str, RunRecord] = {}  # dispatching, dispatched, running
        self.runners: dict[str, RunnerInfo] = {}
        # run_id -> (terminal seq, when) for runs this scheduler ended: heartbeats list them for a while
        self.recently_ended = RecentlyEnded()
        self.state = StateStore(settings.state_dir / "scheduler.sqlite3")
        self.schedules = ScheduleDriver(self)
        self.pub_dropped = 0
        self.dispatch_dropped = 0
        self._last_drop_warn = 0.0
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._dispatch: zmq.asyncio.Socket | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        c = self.cfg.scheduler
        ctx = zmq.asyncio.Context()
        socks: list[zmq.asyncio.Socket] = []
        try:
            control = self._bind(ctx, socks, zmq.ROUTER, c.control, "scheduler.control")
            self._dispatch = self._bind(ctx, socks, zmq.ROUTER, c.dispatch, "scheduler.dispatch",
                                        mandatory=True)
            self._pub = self._bind(ctx, socks, zmq.PUB, c.publish, "scheduler.publish")
            log.info("config %s; journal directory %s; state %s", self.settings.path, self.journal_dir,
                     self.state.path)
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            self._recover()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(serve_requests, control, self.handle, f"scheduler.control {c.control}")
                tg.start_soon(self._receive_from_runners)
                tg.start_soon(self._dispatcher)
                tg.start_soon(self._monitor)
                tg.start_soon(self._heartbeats)
                await tg.start(self.schedules.run)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for s in socks:
                    s.close(linger=0)
                ctx.term()
                self.state.close()
                if self.pub_dropped or self.dispatch_dropped:
                    log.warning("dropped at shutdown count: %d published events, %d runner messages",
                                self.pub_dropped, self.dispatch_dropped)

    def _bind(self, ctx: zmq.asyncio.Context, socks: list[zmq.asyncio.Socket], kind: int, endpoint: str,
              what: str, mandatory: bool = False) -> zmq.asyncio.Socket:
        sock = ctx.socket(kind)
        socks.append(sock)
        configure_socket(sock, sndhwm=self.cfg.runner.send_hwm if kind == zmq.PUB else 10_000, rcvhwm=10_000)
        if mandatory:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a runner that is gone raises, not vanishes
            # a runner restarted after kill -9 reconnects with the same routing id while the dead
            # connection may still be held: without handover its messages would be silently ignored
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise ServiceUnavailable(f"cannot bind {what} to {endpoint}: {e} (another scheduler running? "
                                     f"change [scheduler] in {self.settings.path})") from e
        log.info("bound %s %s", what, endpoint)
        return sock

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Rebuild runs from journals (the truth), runner assignments from the state file."""
        assignments = self.state.assignments()
        records = scan_journals(self.journal_dir)
        now = time.monotonic()
        ended: list[str] = []
        requeued = adopted = 0
        for rec in records:
            self.runs[rec.run_id] = rec
            if rec.ended:
                if rec.run_id in assignments:
                    ended.append(rec.run_id)
                continue
            assigned = assignments.get(rec.run_id)
            if rec.phase == "queued" and assigned is None:
                self.queue[rec.run_id] = rec
                requeued += 1
                continue
            # dispatched before the restart, or running: wait for its runner to report it
            if assigned is not None:
                rec.runner = rec.runner or assigned[0]
                rec.attempt = max(rec.attempt, assigned[1])
            if rec.phase == "queued":
                rec.set_phase("dispatched")
            runner_id = rec.runner or "(unknown runner)"
            rec.runner = runner_id
            runner = self.runners.get(runner_id)
            if runner is None:
                runner = self.runners[runner_id] = RunnerInfo(runner_id, last_seen=now)
            runner.runs.add(rec.run_id)
            rec.unreported_since = now
            rec.recovered = True
            self.active[rec.run_id] = rec
            adopted += 1
        self.state.forget_sync(ended)
        log.info("recovered %d runs from %s: %d queued, %d dispatched or running (awaiting their runners: %s)",
                 len(records), self.journal_dir, requeued, adopted, ", ".join(sorted(self.runners)) or "none")

    # ------------------------------------------------------------------------------------ publishing

    async def publish(self, ev: Event) -> None:
        await self._send_pub(encode_event_frames(ev))

    async def _send_pub(self, frames: list[bytes]) -> None:
        assert self._pub is not None
        try:
            await self._pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.pub_dropped += 1
            if time.monotonic() - self._last_drop_warn > _WARN_EVERY:
                self._last_drop_warn = time.monotonic()
                log.warning("scheduler.publish: send queue full, %d messages dropped so far "
                            "(subscribers refill from the journal by seq)", self.pub_dropped)

    async def _heartbeats(self) -> None:
        interval = self.cfg.runner.heartbeat_interval
        while True:
            owned = self.recently_ended.seqs()
            owned.update({r.run_id: r.last_seq for r in self.queue.values()})
            owned.update({r.run_id: r.last_seq for r in self.active.values() if r.phase in ("dispatching", "dispatched")})
            hb = Heartbeat(runner_id="scheduler", timestamp=now_timestamp(self.tz), journal_dir=str(self.journal_dir),
                           config_path=str(self.settings.path), runs=owned, interval=interval, service="scheduler",
                           **journal_stats_fields())
            await self._send_pub(encode_heartbeat_frames(hb))
            await anyio.sleep(interval)

    # ------------------------------------------------------------------------------------ journal writes

    async def queue_run(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                        msg: str = "") -> RunRecord:
        """begin_run (fsync, in a worker thread), then publish `queued` and make it dispatchable."""
        ev = await anyio.to_thread.run_sync(begin_run, self.journal_dir, run_id, self.tz, pipeline, params, trigger, msg)
        rec = record_from_queued(ev)
        self.runs[rec.run_id] = rec
        self.queue[rec.run_id] = rec
        await self.publish(ev)
        self.wake()
        return rec

    async def record_skipped(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                             reason: str) -> RunRecord:
        """A slot that does not run still becomes a run: queued -> pipeline skipped -> cancelled."""
        events = await anyio.to_thread.run_sync(self._skipped_sync, pipeline, params, trigger, run_id, reason)
        rec = record_from_queued(events[0])
        rec.end(events[-1])
        self.runs[rec.run_id] = rec
        for ev in events:
            await self.publish(ev)
        self.recently_ended.add(rec.run_id, events[-1].seq)
        return rec

    def _skipped_sync(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                      reason: str) -> list[Event]:
        queued = begin_run(self.journal_dir, run_id, self.tz, pipeline, params, trigger, f"slot skipped: {reason}")
        with JournalWriter.open(self.journal_dir, run_id, self.tz) as w:
            skipped = w.append(PIPELINE_STAGE, "skipped", reason, {"reason": reason})
            cancelled = w.append(PIPELINE_STAGE, "cancelled", reason)
            w.sync()
        return [queued, skipped, cancelled]

    def _write_end_sync(self, run_id: str, kind: str, msg: str, data: dict[str, Any] | None) -> tuple[list[Event], bool]:
        """Take the journal (flock), write the terminal event unless one is there; (events written, the
        terminal last; or [the terminal found], True)."""
        with JournalWriter.open(self.journal_dir, run_id, self.tz) as w:
            if w.ended:
                last = JournalReader(w.path, run_id).last_event()
                assert last is not None
                return [last], True
            # stages the lost runner left running end too (items first), so none stays "running"
            written = [
                w.append(stage, kind, f"{kind}: {msg}", {"item": item} if item is not None else None)
                for stage, item in open_stages(fold(run_id, read_events(self.journal_dir, run_id)))
            ]
            written.append(w.append(PIPELINE_STAGE, kind, msg, data))
            w.sync()
            return written, False

    async def end_run(self, rec: RunRecord, kind: str, msg: str, data: dict[str, Any] | None = None) -> None:
        """End a run from the scheduler's side, retrying (loudly) while another writer holds its journal."""
        self._release_slot(rec)
        rec.set_phase("ending")
        tries = 0
        while True:
            try:
                written, was_there = await anyio.to_thread.run_sync(self._write_end_sync, rec.run_id, kind, msg, data)
                break
            except JournalError as e:
                tries += 1
                if not journal_path(self.journal_dir, rec.run_id).exists():
                    log.error("run %s: journal vanished, cannot write its %s (%s); forgetting the run", rec.run_id, kind, e)
                    self.runs.pop(rec.run_id, None)
                    return
                log.error("run %s: cannot write its %s yet (%s); retrying in 1 s (try %d) - another process "
                          "still holds %s", rec.run_id, kind, e, tries, journal_path(self.journal_dir, rec.run_id))
                await anyio.sleep(1.0)
        ev = written[-1]
        rec.end(ev)
        if was_there:
            log.warning("run %s had already ended (%s: %s) in its journal; nothing written", rec.run_id, ev.event, ev.msg)
        else:
            log.info("run %s: wrote terminal %s: %s", rec.run_id, kind, msg)
            for each in written:
                await self.publish(each)
            self.recently_ended.add(rec.run_id, ev.seq)
        self.wake()

    def _release_slot(self, rec: RunRecord) -> None:
        self.queue.pop(rec.run_id, None)
        self.active.pop(rec.run_id, None)
        if rec.runner and rec.runner in self.runners:
            self.runners[rec.runner].runs.discard(rec.run_id)

    # ------------------------------------------------------------------------------------ dispatching

    def _pipeline_limit(self, pipeline: str) -> int:
        p = self.cfg.pipelines.get(pipeline)
        return p.max_concurrent if p else 1

    def _occupancy(self) -> tuple[int, dict[str, int], set[str]]:
        per_pipeline: dict[str, int] = {}
        schedules: set[str] = set()
        for r in self.active.values():
            per_pipeline[r.pipeline] = per_pipeline.get(r.pipeline, 0) + 1
            if r.schedule:
                schedules.add(r.schedule)
        return len(self.active), per_pipeline, schedules

    def _pick_runner(self) -> RunnerInfo | None:
        best = None
        for r in self.runners.values():
            if r.connected and r.free() > 0 and (best is None or r.free() > best.free()):
                best = r
        return best

    def wait_reason(self, rec: RunRecord) -> str | None:
        if rec.phase != "queued":
            return None
        if rec.not_before > time.monotonic():
            return f"waiting: retry after a runner rejected it ({rec.last_rejection})"
        if not any(r.connected for r in self.runners.values()):
            return f"waiting for a runner (none connected to scheduler.dispatch {self.cfg.scheduler.dispatch})"
        total, per_pipeline, schedules = self._occupancy()
        limit = self.cfg.scheduler.max_concurrent_runs
        if total >= limit:
            return f"waiting: global limit ({limit} runs at once) reached"
        plimit = self._pipeline_limit(rec.pipeline)
        if per_pipeline.get(rec.pipeline, 0) >= plimit:
            return f"waiting: pipeline {rec.pipeline} at its limit ({plimit} at once)"
        if rec.schedule and rec.schedule in schedules and self.schedules.overlap_of(rec.schedule) == "queue":
            return f"waiting: the previous run of schedule {rec.schedule} is still active (overlap = queue)"
        if self._pick_runner() is None:
            return "waiting: every runner is at capacity"
        return "waiting: next in the queue"

    async def _dispatcher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self._dispatch_ready()

    async def _dispatch_ready(self) -> None:
        limit = self.cfg.scheduler.max_concurrent_runs
        now = time.monotonic()
        total, per_pipeline, schedules = self._occupancy()
        for rec in list(self.queue.values()):
            if total >= limit:
                return
            if rec.phase != "queued" or rec.not_before > now:
                continue
            if per_pipeline.get(rec.pipeline, 0) >= self._pipeline_limit(rec.pipeline):
                continue
            if rec.schedule and rec.schedule in schedules and self.schedules.overlap_of(rec.schedule) == "queue":
                continue
            runner = self._pick_runner()
            if runner is None:
                return
            self.queue.pop(rec.run_id)
            rec.attempt += 1
            rec.runner = runner.runner_id
            rec.set_phase("dispatching")
            runner.runs.add(rec.run_id)
            self.active[rec.run_id] = rec
            total += 1
            per_pipeline[rec.pipeline] = per_pipeline.get(rec.pipeline, 0) + 1
            if rec.schedule:
                schedules.add(rec.schedule)
            # durable before it is sent, so attempt numbers never repeat across a scheduler restart
            await self.state.assign(rec.run_id, runner.runner_id, rec.attempt)
            if rec.phase != "dispatching":  # the runner was declared lost meanwhile
                continue
            msg = DispatchRun(run_id=rec.run_id, attempt=rec.attempt, pipeline=rec.pipeline, params=rec.params)
            if not await self._send_runner(runner, msg):
                self._requeue(rec, "the dispatch could not be sent", delay=0.5)
                continue
            rec.set_phase("dispatched")
            log.info("run %s (%s) dispatched to runner %s, attempt %d", rec.run_id, rec.pipeline, runner.runner_id, rec.attempt)
            if rec.cancel_requested:
                await self._send_runner(runner, CancelRun(run_id=rec.run_id, attempt=rec.attempt, reason=rec.msg or "cancelled on request"))

    def _requeue(self, rec: RunRecord, why: str, delay: float = 0.0) -> None:
        self._release_slot(rec)
        rec.runner = None
        rec.unreported_since = None
        rec.set_phase("queued")
        rec.not_before = time.monotonic() + delay
        rec.last_rejection = why
        self.queue[rec.run_id] = rec
        self.wake()

    async def _send_runner(self, runner: RunnerInfo, msg: msgspec.Struct) -> bool:
        assert self._dispatch is not None
        if runner.routing is None:
            return False
        try:
            await self._dispatch.send_multipart([runner.routing, encode_dispatch(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH (gone; ROUTER_MANDATORY) or EAGAIN (its queue is full)
            self.dispatch_dropped += 1
            log.warning("scheduler.dispatch: %s to runner %s not sent: %s", type(msg).__name__, runner.runner_id, e)
            return False

    # ------------------------------------------------------------------------------------ runner messages

    async def _receive_from_runners(self) -> None:
        assert self._dispatch is not None
        where = f"scheduler.dispatch {self.cfg.scheduler.dispatch}"
        while True:
            frames = await self._dispatch.recv_multipart()
            if len(frames) != 2:
                self.dispatch_dropped += 1
                log.warning("%s: dropped a message of %d frames (expected routing id + payload)", where, len(frames))
                continue
            routing, payload = frames
            try:
                msg = from_runner_decoder.decode(payload)
            except msgspec.DecodeError as e:
                self.dispatch_dropped += 1
                log.warning("%s: dropped a bad message from %r: %s", where, routing[:64], e)
                continue
            match msg:
                case RunnerStatus():
                    await self._on_status(routing, msg)
                case RunAccepted():
                    await self._on_accepted(msg)
                case RunRejected():
                    await self._on_rejected(msg)
                case RunFinished():
                    self._on_finished(msg)

    def _runner_of(self, runner_id: str) -> RunnerInfo:
        r = self.runners.get(runner_id)
        if r is None:
            r = self.runners[runner_id] = RunnerInfo(runner_id)
        return r

    def _owned_by(self, rec: RunRecord | None, runner_id: str, attempt: int) -> bool:
        return (rec is not None and rec.run_id in self.active and rec.runner == runner_id
                and rec.attempt == attempt and rec.phase in ACTIVE_PHASES)

    async def _release(self, runner: RunnerInfo, run_id: str, attempt: int, reason: str) -> None:
        log.warning("runner %s reports run %s attempt %d, which %s: sending ReleaseRun", runner.runner_id, run_id, attempt, reason)
        await self._send_runner(runner, ReleaseRun(run_id=run_id, attempt=attempt, reason=reason))

    async def _on_status(self, routing: bytes, msg: RunnerStatus) -> None:
        r = self._runner_of(msg.runner_id)
        fresh = not r.connected or (r.status is not None and r.status.pid != msg.pid)
        if r.lost:
            log.warning("runner %s speaks again after being declared lost; its old runs stay ended", msg.runner_id)
        r.routing, r.status, r.last_seen, r.lost = routing, msg, time.monotonic(), False
        if fresh:
            log.info("runner %s connected: pid %d, capacity %d, journal dir %s, config %s, publishes on %s",
                     msg.runner_id, msg.pid, msg.capacity, msg.journal_dir, msg.config_path, msg.publish)
            if Path(msg.journal_dir) != self.journal_dir:
                log.error("runner %s writes journals in %s but the scheduler reads %s: runs will look lost "
                          "(use one config for all services)", msg.runner_id, msg.journal_dir, self.journal_dir)
        for run_id, attempt in msg.runs.items():
            rec = self.runs.get(run_id)
            if rec is None:
                continue  # not a scheduler run (e.g. the doctor's probe)
            if rec.phase == "ended" or rec.phase == "ending":
                await self._release(r, run_id, attempt, f"has ended ({rec.outcome or 'ending'}: {rec.msg})")
            elif rec.phase == "queued" and attempt >= rec.attempt:
                self.queue.pop(run_id, None)  # the runner has it (dispatched before a scheduler restart)
                rec.runner, rec.attempt = r.runner_id, attempt
                rec.set_phase("running")
                r.runs.add(run_id)
                self.active[run_id] = rec
                log.info("run %s adopted: runner %s owns it (attempt %d)", run_id, r.runner_id, attempt)
            elif not self._owned_by(rec, r.runner_id, attempt):
                await self._release(r, run_id, attempt, f"is attempt {rec.attempt} on runner {rec.runner}")
            else:
                if rec.phase != "running" or rec.recovered:
                    rec.set_phase("running")
                    rec.recovered = False
                    log.info("run %s re-adopted: runner %s still runs attempt %d", run_id, r.runner_id, attempt)
                rec.unreported_since = None
        now = time.monotonic()
        for run_id in r.runs:
            rec = self.runs[run_id]
            if run_id not in msg.runs and rec.phase in ("dispatched", "running") and rec.unreported_since is None:
                rec.unreported_since = now
        self.wake()

    async def _on_accepted(self, msg: RunAccepted) -> None:
        rec = self.runs.get(msg.run_id)
        r = self._runner_of(msg.runner_id)
        if not self._owned_by(rec, msg.runner_id, msg.attempt):
            await self._release(r, msg.run_id, msg.attempt, "the scheduler no longer assigns to it")
            return
        assert rec is not None
        rec.set_phase("running")
        rec.unreported_since = None
        rec.started_at = rec.started_at or now_timestamp(self.tz)
        log.info("run %s accepted by runner %s (attempt %d)", rec.run_id, msg.runner_id, msg.attempt)

    async def _on_rejected(self, msg: RunRejected) -> None:
        rec = self.runs.get(msg.run_id)
        if not self._owned_by(rec, msg.runner_id, msg.attempt):
            log.warning("late RunRejected for run %s attempt %d from %s ignored", msg.run_id, msg.attempt, msg.runner_id)
            return
        assert rec is not None
        rec.rejections += 1
        log.warning("run %s attempt %d rejected by runner %s: %s", rec.run_id, msg.attempt, msg.runner_id, msg.reason)
        if rec.cancel_requested:
            await self.end_run(rec, "cancelled", rec.msg or "cancelled on request")
        elif rec.rejections >= MAX_REJECTIONS:
            await self.end_run(rec, "failure", f"rejected by runners {rec.rejections} times; last: {msg.reason}",
                               {"attempts": rec.attempt})
        else:
            self._requeue(rec, f"runner {msg.runner_id}: {msg.reason}", delay=min(0.2 * 2 ** (rec.rejections - 1), 5.0))

    def _on_finished(self, msg: RunFinished) -> None:
        rec = self.runs.get(msg.run_id)
        if not self._owned_by(rec, msg.runner_id, msg.attempt):
            log.warning("late RunFinished for run %s attempt %d from %s ignored", msg.run_id, msg.attempt, msg.runner_id)
            return
        assert rec is not None
        self._release_slot(rec)
        last = JournalReader(journal_path(self.journal_dir, rec.run_id), rec.run_id).last_event()
        if last is not None and last.is_terminal:
            rec.end(last)
        else:
            log.error("run %s: runner %s says %s but its journal has no terminal event", rec.run_id, msg.runner_id, msg.outcome)
            rec.set_phase("ended")
            rec.outcome = msg.outcome
        log.info("run %s finished on runner %s: %s", rec.run_id, msg.runner_id, rec.outcome)
        self.wake()

    # ------------------------------------------------------------------------------------ runner lost

    async def _monitor(self) -> None:
        tick = min(0.25, self.lost_after / 8)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            for r in list(self.runners.values()):
                if not r.lost and now - r.last_seen > self.lost_after:
                    self._declare_lost(r, now - r.last_seen)
            for rec in list(self.active.values()):
                if rec.unreported_since is not None and now - rec.unreported_since > self.lost_after:
                    self._reconcile_unreported(rec, now - rec.unreported_since)
            if any(r.not_before for r in self.queue.values()):
                self.wake()

    def _declare_lost(self, r: RunnerInfo, silence: float) -> None:
        assert self._tg is not None
        r.lost = True
        runs = sorted(r.runs)
        log.error("runner %s lost: no heartbeat for %.1f s (runner_lost_after %g s); failing its %d run(s): %s",
                  r.runner_id, silence, self.lost_after, len(runs), ", ".join(runs) or "none")
        for run_id in runs:
            rec = self.runs[run_id]
            self._release_slot(rec)
            rec.set_phase("ending")
            self._tg.start_soon(self.end_run, rec, "failure",
                                f"runner lost: no heartbeat from {r.runner_id} for {silence:.0f} s",
                                {"runner": r.runner_id, "attempt": rec.attempt})
        r.runs.clear()
        self.wake()

    def _reconcile_unreported(self, rec: RunRecord, silence: float) -> None:
        """Its runner is alive but has not listed the run for runner_lost_after: ask the journal."""
        assert self._tg is not None
        last = JournalReader(journal_path(self.journal_dir, rec.run_id), rec.run_id).last_event()
        if last is not None and last.is_terminal:
            self._release_slot(rec)
            rec.end(last)
            log.warning("run %s ended in its journal (%s) without a RunFinished from %s", rec.run_id, last.event, rec.runner)
            self.wake()
        elif last is not None and last.seq == 1:
            log.warning("run %s: runner %s never started attempt %d (not reported for %.0f s); queued again",
                        rec.run_id, rec.runner, rec.attempt, silence)
            self._requeue(rec, f"runner {rec.runner} never started attempt {rec.attempt}")
        else:
            runner = rec.runner
            self._release_slot(rec)
            rec.set_phase("ending")
            self._tg.start_soon(self.end_run, rec, "failure",
                                f"runner lost: {runner} stopped reporting this run for {silence:.0f} s",
                                {"runner": runner, "attempt": rec.attempt})

    # ------------------------------------------------------------------------------------ control

    async def handle(self, req: Any) -> Any:
        match req:
            case Launch():
                return await self._launch(req)
            case Cancel():
                return await self._cancel(req)
            case ListRuns():
                return self._list_runs(req)
            case GetRun():
                return await self._get_run(req)
            case ListSchedules():
                return {"schedules": self.schedules.describe()}
            case Pause():
                return await self.schedules.set_paused(req.name, True)
            case Resume():
                return await self.schedules.set_paused(req.name, False)
            case Identity():
                return self._identity()
        raise ProtocolError(f"{type(req).__name__} is not a scheduler operation (the runner answers it)")

    async def _launch(self, req: Launch) -> dict[str, Any]:
        pipeline = self.settings.pipeline(req.pipeline)
        params = resolve_params(pipeline, req.params)
        rec = await self.queue_run(req.pipeline, params, {"trigger": "manual"}, new_run_id())
        log.info("run %s (%s) queued on request", rec.run_id, rec.pipeline)
        return {"run_id": rec.run_id, "status": "queued"}

    def _find(self, run_id: str) -> RunRecord:
        check_run_id(run_id)
        rec = self.runs.get(run_id)
        if rec is None:
            raise NotFound(f"run {run_id} not found in {self.journal_dir}")
        return rec

    async def _cancel(self, req: Cancel) -> dict[str, Any]:
        rec = self._find(req.run_id)
        reason = req.reason or "cancelled on request"
        if rec.phase == "ended":
            raise Conflict(f"run {rec.run_id} has already ended ({rec.outcome}); nothing to cancel")
        if rec.phase == "ending":
            raise Conflict(f"run {rec.run_id} is already being ended by the scheduler")
        if rec.phase == "queued":
            await self.end_run(rec, "cancelled", reason, {"reason": reason})
            return {"run_id": rec.run_id, "status": rec.status}
        rec.cancel_requested = True
        rec.msg = reason
        if rec.phase != "dispatching" and rec.runner in self.runners:
            await self._send_runner(self.runners[rec.runner],
                                    CancelRun(run_id=rec.run_id, attempt=rec.attempt, reason=reason))
        log.info("run %s: cancel forwarded to runner %s", rec.run_id, rec.runner)
        return {"run_id": rec.run_id, "status": "cancelling"}

    def _list_runs(self, req: ListRuns) -> dict[str, Any]:
        if req.status is not None and req.status not in RUN_STATUSES:
            raise BadParams(f"status {req.status!r}: expected one of {', '.join(RUN_STATUSES)}")
        limit = max(1, min(req.limit, 10_000))
        out = []
        for run_id in sorted(self.runs, reverse=True):
            rec = self.runs[run_id]
            if req.status is None or rec.status == req.status:
                out.append(rec.summary(self.wait_reason(rec)))
                if len(out) >= limit:
                    break
        return {"runs": out}

    async def _get_run(self, req: GetRun) -> dict[str, Any]:
        rec = self.runs.get(check_run_id(req.run_id))
        if rec is None:
            rec = await anyio.to_thread.run_sync(read_record, self.journal_dir, req.run_id)
            if rec is None:
                raise NotFound(f"run {req.run_id} not found in {self.journal_dir}")
        events = await anyio.to_thread.run_sync(read_events, self.journal_dir, rec.run_id)
        state = msgspec.to_builtins(fold(rec.run_id, events))
        return {**state, **rec.summary(self.wait_reason(rec)), "stages": state.get("stages", {})}

    def _identity(self) -> IdentityInfo:
        runners = {}
        now = time.monotonic()
        for r in self.runners.values():
            if r.connected and r.status is not None:
                s = r.status
                runners[r.runner_id] = {
                    "runner_id": r.runner_id, "pid": s.pid, "version": s.version, "config_path": s.config_path,
                    "journal_dir": s.journal_dir, "publish": s.publish, "control": s.control,
                    "capacity": s.capacity, "runs": len(r.runs), "last_seen_s": round(now - r.last_seen, 3),
                }
        return IdentityInfo(service="scheduler", version=shared.__version__, pid=os.getpid(),
                            config_path=str(self.settings.path), journal_dir=str(self.journal_dir),
                            endpoints=endpoints_of(self.settings), runners=runners)
