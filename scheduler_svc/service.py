"""The scheduler service: its lifecycle (sockets, the task group and the loops in it) and recovery at
start; it holds the shared state (runs, queue, active runs, runners) that its parts work on:
`journaling` (its own journal writes and publishing), `dispatcher` (queue -> runners), `runners` (runner
messages, runner lost), `control` (control requests), `retention` (old ended runs) and
`schedules.ScheduleDriver` (schedules).

Ownership of a run's journal: the scheduler writes `queued` (begin_run), hands the journal over with
`DispatchRun`, and takes it back only to write an end the runner cannot write (runner lost, cancel while
queued, rejected too often). Every event written here is journalled (fsync) before it is published.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.abc
import zmq
import zmq.asyncio

from shared.config import Settings
from shared.control import serve_requests
from shared.errors import BindError
from shared.fence import restore_fences
from shared.wire import RecentlyEnded, configure_socket

from .control import ControlHandler
from .dispatcher import Dispatcher
from .journaling import Journaling
from .retention import Retention
from .runners import RunnerInfo, RunnerTracker
from .runs import RunRecord, scan_journals
from .schedules import ScheduleDriver
from .state import StateStore

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.config
        self.tz = settings.tz
        self.journal_dir = settings.journal_dir
        self.runs: dict[str, RunRecord] = {}
        self.queue: dict[str, RunRecord] = {}  # phase queued, oldest first
        self.active: dict[str, RunRecord] = {}  # dispatching, dispatched, running
        self.runners: dict[str, RunnerInfo] = {}
        # run_id -> (terminal seq, when) for runs this scheduler ended: heartbeats list them for a while
        self.recently_ended = RecentlyEnded(path=settings.state_dir / "recently-ended.scheduler.json")
        self.state = StateStore(settings.state_dir / "scheduler.sqlite3")
        self.schedules = ScheduleDriver(self)
        self.journaling = Journaling(self)
        self.dispatcher = Dispatcher(self)
        self.tracker = RunnerTracker(self)
        self.control = ControlHandler(self)
        self.retention = Retention(self)
        self.tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        c = self.cfg.scheduler
        ctx = zmq.asyncio.Context()
        socks: list[zmq.asyncio.Socket] = []
        try:
            control = self._bind(ctx, socks, zmq.ROUTER, c.control, "scheduler.control")
            self.tracker.dispatch_sock = self._bind(ctx, socks, zmq.ROUTER, c.dispatch, "scheduler.dispatch",
                                                    mandatory=True)
            self.journaling.pub = self._bind(ctx, socks, zmq.PUB, c.publish, "scheduler.publish")
            log.info("config %s; journal directory %s; state %s", self.settings.path, self.journal_dir,
                     self.state.path)
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            self._recover()
            async with anyio.create_task_group() as tg:
                self.tg = tg
                tg.start_soon(serve_requests, control, self.control.handle, f"scheduler.control {c.control}")
                tg.start_soon(self.tracker.receive)
                tg.start_soon(self.dispatcher.run)
                tg.start_soon(self.tracker.monitor)
                tg.start_soon(self.journaling.heartbeats)
                tg.start_soon(self.retention.run)
                await tg.start(self.schedules.run)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for s in socks:
                    s.close(linger=0)
                ctx.term()
                self.state.close()
                if self.journaling.pub_dropped or self.tracker.dispatch_dropped:
                    log.warning("dropped at shutdown count: %d published events, %d runner messages",
                                self.journaling.pub_dropped, self.tracker.dispatch_dropped)

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
            raise BindError(what, endpoint, str(e), self.settings.path) from e
        log.info("bound %s %s", what, endpoint)
        return sock

    # ------------------------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Rebuild runs from journals (the truth), runner assignments from the state file."""
        assignments = self.state.assignments()
        restore_fences(self.journal_dir)  # before reading journals: a fence this process died in
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
