"""The scheduler service: its lifecycle (sockets, the task group and the loops in it) and recovery at
start. It builds its parts and hands each only what it uses: the run book (`runbook`: runs, queue,
active runs, runners, and their transitions), `journaling` (its own journal writes, publishing, and
the one task that writes the ends other parts send it), `dispatcher` (queue -> runners), `runners`
(runner messages, runner lost), `control` + `launches` + `reruns` + `backfills` (control requests; the
backfills' meter is a task of its own), `retention` (old ended runs), `schedules.ScheduleDriver`
(schedules, on a clock it is given) and `alerts` (webhooks on ends and long runs: the book tells it of
each end).

Ownership of a run's journal: the scheduler writes `queued` (begin_run), hands the journal over with
`DispatchRun`, and takes it back only to write an end the runner cannot write (runner lost, cancel while
queued, rejected too often). Every event written here is journalled (fsync) before it is published.
"""

from __future__ import annotations

import logging
import math
import time

import anyio
import anyio.abc
import zmq
import zmq.asyncio

from runwire_history.archive import archive_dir_of
from shared.config import Settings
from shared.control import serve_requests
from shared.curve import refuse_unsecured
from shared.errors import BindError
from shared.fence import restore_fences
from shared.wire import RecentlyEnded, configure_socket

from .alert_rules import rules_of, run_link_base
from .alerts import Alerts
from .backfills import Backfills
from .clock import Clock
from .control import ControlHandler
from .dispatcher import Dispatcher
from .journaling import EndRequest, EndSender, Journaling
from .launches import Launches
from .reruns import Reruns
from .retention import Retention
from .runbook import RunBook
from .runners import RunnerTracker
from .runs import RunRecord, scan_journals
from .schedules import ScheduleDriver
from .state import AlertStore, StateStore

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.cfg = cfg = settings.config
        self.journal_dir = journal_dir = settings.journal_dir
        self.book = book = RunBook()
        # run_id -> (terminal seq, when) for runs this scheduler ended: heartbeats list them for a while
        self.recently_ended = RecentlyEnded(path=settings.state_dir / "recently-ended.scheduler.json")
        self.state = state = StateStore(settings.state_dir / "scheduler.sqlite3")
        # ends requested by the parts, written by one task (Journaling.write_ends); at most one per run
        self._ends_out, self._ends_in = anyio.create_memory_object_stream[EndRequest](math.inf)
        self.journaling = Journaling(book, journal_dir, settings.tz, settings.home, self.recently_ended)
        self.tracker = RunnerTracker(book, EndSender(book, self._ends_out), journal_dir, settings.tz,
                                     cfg.scheduler.runner_lost_after, f"scheduler.dispatch {cfg.scheduler.dispatch}")
        self.schedules = ScheduleDriver(cfg, state, book, self.journaling, journal_dir, clock)
        self.dispatcher = Dispatcher(book, cfg, self.tracker.send, state.assign, self.schedules.overlap_of)
        self.launches = Launches(book, settings, state, self.journaling)
        self.backfills = Backfills(book, settings, state, self.journaling, self.schedules)
        self.control = ControlHandler(book, settings, self.launches, self.schedules, self.journaling,
                                      self.tracker.send, self.dispatcher.wait_reason, self.tracker.clock.now,
                                      Reruns(book, settings, self.journaling), self.backfills)
        self.alerts = Alerts(rules_of(cfg.alerts), AlertStore(state), book, journal_dir, settings.home,
                             run_link_base(cfg.gateway))
        book.on_end = self.alerts.notice
        self.retention = Retention(book, journal_dir, settings.reports_dir, cfg.scheduler.keep_days,
                                   archive_dir_of(settings.home))

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
            await self._recover()
            async with anyio.create_task_group() as tg:
                await tg.start(self.journaling.write_ends, self._ends_in)
                await tg.start(self.alerts.run)
                tg.start_soon(serve_requests, control, self.control.handle, f"scheduler.control {c.control}")
                tg.start_soon(self.tracker.receive)
                tg.start_soon(self.dispatcher.run)
                tg.start_soon(self.tracker.monitor)
                tg.start_soon(self.journaling.heartbeats, self.cfg.runner.heartbeat_interval, self.settings.path)
                tg.start_soon(self.retention.run)
                await tg.start(self.schedules.run)
                await tg.start(self.backfills.run)
                task_status.started()
        finally:  # no await here: nothing in it can be cancelled
            self._ends_out.close()
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
        refuse_unsecured(endpoint, what, None, self.settings.path)  # no CURVE in the services yet
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise BindError(what, endpoint, str(e), self.settings.path) from e
        log.info("bound %s %s", what, endpoint)
        return sock

    # ------------------------------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        """Rebuild runs from journals (the truth), runner assignments from the state file."""
        assignments = self.state.assignments()
        records = await anyio.to_thread.run_sync(self._read_journals)
        book = self.book
        now = time.monotonic()
        ended: list[RunRecord] = []
        requeued = adopted = 0
        for rec in records:
            if rec.ended:
                book.record(rec)
                if rec.run_id in assignments:
                    ended.append(rec)  # dispatched by an earlier start (and ended meanwhile, maybe while down)
                continue
            assigned = assignments.get(rec.run_id)
            if rec.phase == "queued" and assigned is None:
                book.record(rec)
                book.enqueue(rec)
                requeued += 1
                continue
            # dispatched before the restart, or running: wait for its runner to report it
            if assigned is not None:
                rec.runner = rec.runner or assigned[0]
                rec.attempt = max(rec.attempt, assigned[1])
            book.restore_active(rec, book.runner(rec.runner or "(unknown runner)", last_seen=now), now)
            adopted += 1
        self.state.forget_sync([rec.run_id for rec in ended])
        self.alerts.catch_up(ended, time.time())
        log.info("recovered %d runs from %s: %d queued, %d dispatched or running (awaiting their runners: %s)",
                 len(records), self.journal_dir, requeued, adopted, ", ".join(sorted(book.runners)) or "none")

    def _read_journals(self) -> list[RunRecord]:
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        restore_fences(self.journal_dir)  # before reading journals: a fence this process died in
        return scan_journals(self.journal_dir)
