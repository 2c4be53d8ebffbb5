"""The runner service: its sockets (PUB events, DEALER to the scheduler, control ROUTER), the runs it
executes, heartbeats, start-up recovery and a clean shutdown, all in one anyio task group.

(Some 430 lines, over the ~400 the house keeps to: a run's whole life in the runner, taken, run and
ended, is here with the sockets that start and end it, and cluster mode added its link to it. The end
path (_sweep, _end_open_stages, _mirror, _finish) is the piece to move out next.)"""

from __future__ import annotations

import logging
import os
import re
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import msgspec
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus

from shared import __version__
from shared.config import Settings
from shared.curve import CurveAuthenticator, load_keys
from shared.dispatch import (
    CancelRun,
    DispatchRun,
    ReleaseRun,
    RunAccepted,
    RunFinished,
    RunnerStatus,
    RunRejected,
    encode as encode_dispatch,
    from_scheduler_decoder,
)
from shared.errors import BadParams, JournalError, RunwireError, ServiceUnavailable, UnknownPipeline
from shared.events import PIPELINE_STAGE, now_timestamp
from shared.ids import check_run_id
from shared.journal import JournalWriter, stats_fields as journal_stats_fields
from shared.params import resolve_params
from shared.procs import kill_run_processes
from shared.values import DECODE_ERRORS
from shared.wire import Heartbeat, RecentlyEnded, configure_socket

from .control import RunnerControl
from .execute import RunExecution
from .publish import ChunkAppender, Publisher, RunJournal
from .recovery import recover_interrupted_runs
from .report import RunReport, write_report

if TYPE_CHECKING:
    from .clusterlink import ClusterLink

log = logging.getLogger(__name__)

SHUTDOWN_REASON = "runner shutting down"


def default_runner_id() -> str:
    """The host name, made fit for an id: stable across restarts, so a restarted runner knows its runs."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "runner"
    if not name[0].isalnum():
        name = "r" + name
    return name[:64]


@dataclass
class ActiveRun:
    run_id: str
    attempt: int
    pipeline: str
    journal: RunJournal
    report: RunReport
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    cancel_reason: str | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.scope.cancel()


class RunnerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.config.runner
        self.runner_id = self.cfg.id or default_runner_id()
        self.runs: dict[str, ActiveRun] = {}
        # run_id -> (last seq published, when it ended): heartbeats keep listing a run for a minute after
        # its end, so a subscriber that lost the last events (the terminal one too) still learns of them
        self.recently_ended = RecentlyEnded(path=settings.state_dir / f"recently-ended.runner.{self.runner_id}.json")
        self.shutting_down = False
        self.publisher: Publisher | None = None
        self.link: ClusterLink | None = None  # cluster mode: the event stream and the runner registry
        self._dispatch: zmq.asyncio.Socket | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.dispatch_dropped = 0
        self._dispatch_warned_at = float("-inf")

    # ------------------------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The service (see shared.entry): bind, recover interrupted runs, serve until cancelled."""
        s = self.settings
        log.info("runner %s (pid %d) starting: config %s", self.runner_id, os.getpid(), s.path)
        log.info("journal directory %s", s.journal_dir)
        await anyio.to_thread.run_sync(lambda: s.journal_dir.mkdir(parents=True, exist_ok=True))
        keys = load_keys(s)  # [cluster.curve]: the PUB and control sockets are CURVE servers
        ctx = zmq.asyncio.Context()
        try:
            async with AsyncExitStack() as stack:
                if s.config.cluster is not None:  # nothing of cluster mode is imported without it
                    from .clusterlink import ClusterLink

                    # entered first, left last: the stream stays open until every run has ended
                    self.link = await stack.enter_async_context(ClusterLink(s, self.runner_id))
                if keys is not None:  # ZAP: only clients presenting the cluster's pair get in
                    stack.enter_context(CurveAuthenticator(zmq.Context(shadow=ctx.underlying), keys))
                tg = await stack.enter_async_context(anyio.create_task_group())
                self._tg = tg
                self.publisher = Publisher.bind(ctx, self.cfg.publish, self.cfg.send_hwm, s.path, keys)
                log.info("bound PUB %s (SNDHWM %d%s)", self.cfg.publish, self.cfg.send_hwm, ", CURVE" if keys else "")
                control = RunnerControl(s, self.runner_id, self.publisher, self.recently_ended, keys,
                                        self.link.new_run if self.link is not None else None)
                await tg.start(control.run, ctx)
                if self.link is not None:  # ends journaled here that the event stream may lack
                    await self.link.settle_ends(self.publisher)
                recovered = await recover_interrupted_runs(
                    s.journal_dir, s.home, self.runner_id, s.tz, self.publisher, self.cfg.durability, self.cfg.group_commit_ms,
                    self.link.take_over if self.link is not None else None,
                )
                if recovered:
                    log.warning("recovered %d interrupted run(s): %s", len(recovered), ", ".join(r.run_id for r in recovered))
                for r in recovered:  # published right after the bind, before most subscribers are back
                    self.recently_ended.add(r.run_id, r.last_seq)
                await tg.start(self._dispatch_loop, ctx)
                for r in recovered:  # the scheduler learns of each as an ordinary end
                    await self._send(RunFinished(runner_id=self.runner_id, run_id=r.run_id, attempt=r.attempt, outcome="failure"))
                tg.start_soon(self._heartbeat_loop)
                if self.link is not None:
                    tg.start_soon(self.link.registry_loop)
                    tg.start_soon(self.link.retention_loop)
                    tg.start_soon(self.link.settle_loop, self.publisher, self.runs.__contains__)
                task_status.started()
        finally:
            if self.publisher is not None:
                # a last heartbeat saying "stopping", so watchers know at once that this runner is gone
                # rather than late; a short linger lets it leave before the context terminates
                self.publisher.publish_heartbeat(self._heartbeat(stopping=True))
                self.publisher.close(linger_ms=200)
            ctx.term()
            log.info("runner %s: events published %d, dropped %d", self.runner_id,
                     self.publisher.sent if self.publisher else 0, self.publisher.dropped if self.publisher else 0)

    async def before_stop(self, signame: str) -> None:
        log.info("cancelling %d active run(s) before stopping", len(self.runs))
        self.shutting_down = True
        await self._cancel_all(SHUTDOWN_REASON)
        if self.link is not None and self.runs:
            # runs still waiting for the event stream (no quorum): their appends stop, their events stay
            # in the local journals (a restarted runner appends them; or the scheduler ends the runs)
            log.error("runner stopping with %d run(s) still waiting for the event stream: %s", len(self.runs),
                      ", ".join(self.runs))
            self.link.stop_switch.throw()

    async def _cancel_all(self, reason: str) -> None:
        runs = list(self.runs.values())
        for run in runs:
            run.cancel(reason)
        # each run ends its process groups (TERM, kill_grace, KILL) and writes its terminal event
        with anyio.move_on_after(self.cfg.kill_grace + 10) as scope:
            for run in runs:
                await run.done.wait()
        if scope.cancelled_caught:
            log.error("runs still ending %.0fs after cancel: %s", self.cfg.kill_grace + 10,
                      ", ".join(r.run_id for r in runs if not r.done.is_set()))

    # ------------------------------------------------------------------------------------ heartbeat

    def _status(self) -> RunnerStatus:
        s = self.settings
        return RunnerStatus(
            runner_id=self.runner_id, capacity=self.cfg.capacity, pid=os.getpid(), version=__version__,
            config_path=str(s.path), journal_dir=str(s.journal_dir), publish=self.cfg.publish,
            control=self.cfg.control, runs={r.run_id: r.attempt for r in self.runs.values()},
        )

    def _heartbeat(self, stopping: bool = False) -> Heartbeat:
        s = self.settings
        runs = self.recently_ended.seqs()
        runs.update({r.run_id: r.journal.published_seq for r in self.runs.values()})
        return Heartbeat(
            runner_id=self.runner_id, timestamp=now_timestamp(s.tz), journal_dir=str(s.journal_dir),
            config_path=str(s.path), runs=runs, interval=self.cfg.heartbeat_interval, service="runner",
            stopping=stopping, **journal_stats_fields(),
        )

    async def _heartbeat_loop(self) -> None:
        assert self.publisher is not None
        interval = min(self.cfg.heartbeat_interval, 2.0)
        while True:
            self.publisher.publish_heartbeat(self._heartbeat())
            await self._send(self._status())
            await anyio.sleep(interval)

    # ------------------------------------------------------------------------------------- dispatch

    async def _send(self, msg: msgspec.Struct) -> None:
        """To the scheduler, never blocking: a full queue (scheduler away) drops and says so."""
        sock = self._dispatch
        if sock is None:
            log.warning("dispatch socket closed: %s not sent to the scheduler", type(msg).__name__)
            return
        try:
            await sock.send(encode_dispatch(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.dispatch_dropped += 1
            now = anyio.current_time()
            if now - self._dispatch_warned_at >= 10.0 or not isinstance(msg, RunnerStatus):
                self._dispatch_warned_at = now
                log.warning("dispatch %s: send queue full (scheduler away?): %s dropped (%d messages so far)",
                            self.settings.config.scheduler.dispatch, type(msg).__name__, self.dispatch_dropped)

    async def _dispatch_loop(self, ctx: zmq.asyncio.Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        endpoint = self.settings.config.scheduler.dispatch
        sock = ctx.socket(zmq.DEALER)
        try:
            configure_socket(sock, sndhwm=1000, rcvhwm=1000)
            sock.setsockopt(zmq.ROUTING_ID, self.runner_id.encode())
            if self.settings.config.cluster is None:
                sock.connect(endpoint)
                log.info("connected DEALER %s (routing id %s)", endpoint, self.runner_id)
            else:  # the leading scheduler's endpoint, from the database, followed across takeovers
                from .dispatch_link import follow_leader
                assert self._tg is not None
                await self._tg.start(follow_leader, sock, self.settings)
            self._dispatch = sock
            task_status.started()
            while True:
                frames = await sock.recv_multipart()
                try:
                    msg = from_scheduler_decoder.decode(frames[-1])
                except DECODE_ERRORS as e:
                    log.warning("dispatch %s: ignored a bad message (%d frames): %s", endpoint, len(frames), e)
                    continue
                await self._on_scheduler_message(msg)
        finally:
            self._dispatch = None
            sock.close(linger=0)

    async def _on_scheduler_message(self, msg: DispatchRun | CancelRun | ReleaseRun) -> None:
        run = self.runs.get(msg.run_id)
        match msg:
            case DispatchRun():
                await self._on_dispatch(msg)
            case CancelRun():
                if run is None or run.attempt != msg.attempt:
                    log.warning("cancel of run %s attempt %d ignored: not running here", msg.run_id, msg.attempt)
                    return
                log.info("run %s: cancel requested: %s", msg.run_id, msg.reason)
                run.cancel(msg.reason)
            case ReleaseRun():
                if run is None or run.attempt != msg.attempt:
                    log.info("release of run %s attempt %d: not running here (nothing to do)", msg.run_id, msg.attempt)
                    return
                log.warning("run %s: released by the scheduler (%s): stopping its processes, writing nothing more",
                            msg.run_id, msg.reason)
                run.journal.release()
                run.cancel(f"released by the scheduler: {msg.reason}")

    async def _reject(self, msg: DispatchRun, reason: str) -> None:
        log.warning("run %s attempt %d rejected: %s", msg.run_id, msg.attempt, reason)
        await self._send(RunRejected(runner_id=self.runner_id, run_id=msg.run_id, attempt=msg.attempt, reason=reason))

    async def _on_dispatch(self, msg: DispatchRun) -> None:
        try:
            await self._take_run(msg)
        except Exception as e:  # a bug or an unexpected OS error: refuse the run loudly, keep serving
            if msg.run_id in self.runs:
                raise  # the run was taken: its own task ends it; this is a bug worth ending the service
            log.exception("run %s: dispatch failed", msg.run_id)
            await self._reject(msg, f"runner error while taking the run: {type(e).__name__}: {e}")

    async def _take_run(self, msg: DispatchRun) -> None:
        s = self.settings
        existing = self.runs.get(msg.run_id)
        if existing is not None:
            if existing.attempt == msg.attempt:  # a repeated dispatch: answer again, run once
                await self._send(RunAccepted(runner_id=self.runner_id, run_id=msg.run_id, attempt=msg.attempt))
            else:
                await self._reject(msg, f"run {msg.run_id} is running here as attempt {existing.attempt}")
            return
        if self.shutting_down:
            return await self._reject(msg, SHUTDOWN_REASON)
        if len(self.runs) >= self.cfg.capacity:
            return await self._reject(msg, f"runner {self.runner_id} at capacity ({self.cfg.capacity} runs)")
        try:
            check_run_id(msg.run_id)
            pipeline = s.pipeline(msg.pipeline)
            params = resolve_params(pipeline, dict(msg.params))
        except (UnknownPipeline, BadParams) as e:
            return await self._reject(msg, f"{e} (runner config {s.path})")
        except RunwireError as e:  # an invalid run id: the reason goes back to the scheduler
            return await self._reject(msg, str(e))
        stream: ChunkAppender | None = None
        try:
            if self.link is None:
                writer = await anyio.to_thread.run_sync(  # open, lock and repair: file work, off the loop
                    JournalWriter.open, s.journal_dir, msg.run_id, s.tz, self.cfg.durability, self.cfg.group_commit_ms)
            else:  # the journal brought level with the event stream, and the run's appender there
                writer, stream = await self.link.open_run(s.journal_dir, msg.run_id, s.tz)
        except (JournalError, ServiceUnavailable) as e:
            return await self._reject(msg, str(e))
        if writer.ended:
            writer.close()
            return await self._reject(msg, f"run {msg.run_id} has already ended (journal {writer.path})")
        assert self.publisher is not None
        journal = RunJournal(writer, self.publisher, stream)
        try:
            ev = await journal.emit(
                PIPELINE_STAGE, "start", f"{msg.pipeline} started on runner {self.runner_id} (attempt {msg.attempt})",
                {"runner": self.runner_id, "attempt": msg.attempt, "pid": os.getpid()},
            )
        except JournalError as e:
            journal.close()
            return await self._reject(msg, str(e))
        report = RunReport(run_id=msg.run_id, pipeline=msg.pipeline, params=params, runner=self.runner_id, attempt=msg.attempt)
        report.start = ev.timestamp if ev else None
        report._t0 = anyio.current_time()
        run = ActiveRun(run_id=msg.run_id, attempt=msg.attempt, pipeline=msg.pipeline, journal=journal, report=report)
        journal.on_fenced = run.cancel
        self.runs[msg.run_id] = run
        log.info("run %s attempt %d accepted: pipeline %s, journal %s", msg.run_id, msg.attempt, msg.pipeline, writer.path)
        await self._send(RunAccepted(runner_id=self.runner_id, run_id=msg.run_id, attempt=msg.attempt))
        assert self._tg is not None
        execution = RunExecution(
            home=s.home, runner_id=self.runner_id, run_id=msg.run_id, attempt=msg.attempt, pipeline=pipeline,
            params=params, journal=journal, report=report, kill_grace=self.cfg.kill_grace,
            cancel_reason=lambda: run.cancel_reason or SHUTDOWN_REASON,
            from_stage=msg.from_stage, rerun_of=msg.rerun_of,
        )
        self._tg.start_soon(self._run, run, execution, name=f"run {msg.run_id}")

    # ------------------------------------------------------------------------------------------ run

    async def _run(self, run: ActiveRun, execution: RunExecution) -> None:
        outcome, msg = "failure", "runner error"
        try:
            with run.scope:
                outcome, msg = await execution.execute()
            if run.scope.cancelled_caught:
                outcome, msg = "cancelled", run.cancel_reason or SHUTDOWN_REASON
        except anyio.get_cancelled_exc_class():
            # the service itself is being cancelled: the run still gets its end, then cancellation goes on
            with anyio.CancelScope(shield=True):
                await self._finish(run, "cancelled", run.cancel_reason or SHUTDOWN_REASON)
            raise
        except Exception as e:  # a bug in execution must end the run loudly, not leave it "running"
            log.exception("run %s: execution failed", run.run_id)
            outcome, msg = "failure", f"runner error: {type(e).__name__}: {e}"
        with anyio.CancelScope(shield=True):
            await self._finish(run, outcome, msg)

    async def _sweep(self, run: ActiveRun) -> None:
        """Kill what a stage left behind outside its process group (e.g. a daemon that called setsid);
        such processes still carry the run's RUNWIRE_RUN_ID."""
        killed = await anyio.to_thread.run_sync(  # a scan of /proc: off the loop
            kill_run_processes, self.settings.home, run.run_id, "left running outside its stage's group")
        if killed:
            log.warning("run %s: killed %d process(es) left running outside their stage's group: %s", run.run_id, len(killed), killed)
            try:
                await run.journal.emit(PIPELINE_STAGE, "log", f"killed {len(killed)} process(es) the stages left running",
                                       {"pids": killed, "source": "runner"})
            except JournalError as e:
                log.error("run %s: cannot journal the sweep of left-over processes: %s", run.run_id, e)

    async def _end_open_stages(self, run: ActiveRun, outcome: str, msg: str) -> None:
        """A stage (or item) still open, e.g. when the execution itself raised, ends with the run, so
        none stays "running" (in the journal and in the report)."""
        for stage, item in run.journal.open_stages():
            why = f"{outcome}: {msg}"
            try:
                ev = await run.journal.emit(stage, outcome, why, {"item": item} if item is not None else None)
            except JournalError as e:
                log.error("run %s: cannot end its open stage %s%s: %s", run.run_id, stage, f" [{item}]" if item else "", e)
                return
            rep = run.report.stage(stage)
            target = rep if item is None else rep.items.get(item)
            if target is not None:
                target.finish(outcome, ev.timestamp if ev else None, why)
            log.warning("run %s: stage %s%s was still open at the run's end: ended %s", run.run_id, stage,
                        f" [{item}]" if item else "", outcome)

    async def _mirror(self, run: ActiveRun) -> None:
        """Cluster mode, fenced: the local journal made to say what the event stream says."""
        assert run.journal.stream is not None
        try:
            await run.journal.stream.mirror(run.journal.writer)
        except (JournalError, ServiceUnavailable) as e:
            log.error("run %s: fenced, and its local journal %s not made the event stream's copy: %s (the stream is "
                      "the run's record)", run.run_id, run.journal.writer.path, e)

    async def _finish(self, run: ActiveRun, outcome: str, msg: str) -> None:
        journal = run.journal
        try:
            await self._sweep(run)
            if journal.released:
                log.info("run %s: %s; journal closed without a terminal event of ours (no RunFinished)", run.run_id,
                         "fenced" if journal.fenced else "released")
                if journal.fenced and journal.stream is not None:
                    await self._mirror(run)
                return
            await self._end_open_stages(run, outcome, msg)
            # the report first, so whoever sees the terminal event finds the report in place
            report = run.report
            report.status, report.msg = outcome, msg
            report.end = now_timestamp(self.settings.tz)
            report.duration_s = round(anyio.current_time() - report._t0, 6)
            path = None
            try:
                path = await anyio.to_thread.run_sync(write_report, self.settings.reports_dir, report)  # fsync
            except OSError as e:
                log.error("run %s: cannot write its report to %s: %s", run.run_id, self.settings.reports_dir, e)
            try:
                ev = await journal.emit(PIPELINE_STAGE, outcome, msg, {"runner": self.runner_id, "attempt": run.attempt})
            except JournalError as e:
                log.error("run %s: cannot write its terminal %s event: %s; the scheduler ends it when this runner "
                          "stops reporting it", run.run_id, outcome, e)
                return
            if ev is None:
                log.info("run %s: fenced while ending; its end is the scheduler's (no RunFinished)", run.run_id)
                return
            log.info("run %s ended %s: %s (report %s)", run.run_id, outcome, msg, path)
            await self._send(RunFinished(runner_id=self.runner_id, run_id=run.run_id, attempt=run.attempt, outcome=outcome))  # type: ignore[arg-type]
        finally:
            journal.close()
            self.runs.pop(run.run_id, None)
            if journal.ended:  # a run released or fenced was ended by the scheduler, which lists it
                self.recently_ended.add(run.run_id, journal.published_seq)
            run.done.set()

    # -------------------------------------------------------------------------------------- control
