"""The scheduler in cluster mode: several on one database, one leading (`leader.py`). Each binds its
sockets at start and serves its control socket throughout; only while it holds the lease does it run a
term: the schedule driver (slots claimed in the fire ledger), the launch claimer (`launches` rows),
dispatch to runners and the runner monitor, all in one task group beside the lease's renewal, so a lost
lease (or one it cannot renew in time) stops all of them at once. A term is built afresh each time it
leads, and begins from the database and the event stream, never from what an earlier term held: the
runs not ended (`runs` rows) are taken over as the stream has them (queued runs dispatched again,
dispatched ones awaiting their runner's word, or declared lost and ended through the fence).

A standby answers control requests with 503-worthy ServiceUnavailable: gateways ask the leader, whose
control endpoint is recorded with the lease.

Backfills are kept in the database too (`cluster_backfills.py`): a takeover carries each one on;
re-runs find any run of the cluster by its row (`cluster_reruns.py`); this host's journals go by
`scheduler.keep_days` once the database says their runs ended (`cluster_retention.py`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import anyio
import anyio.abc
import msgspec
import zmq
import zmq.asyncio

from runwire_cluster.endpoints import reachable_endpoint
from runwire_cluster.events import EventStream
from runwire_cluster.runs import LeaderState
from runwire_cluster.state import ClusterState, Endpoints, Lease
from shared.config import Settings
from shared.control import serve_requests
from shared.curve import CurveAuthenticator, CurveKeys, bind_secured, load_keys
from shared.errors import LeaseLost, ServiceUnavailable
from shared.fence import restore_fences
from shared.wire import RecentlyEnded, configure_socket

from .alert_rules import rules_of, run_link_base
from .alerts import Alerts
from .clock import Clock
from .cluster_alerts import ClusterAlertStore
from .cluster_backfills import ClusterBackfills
from .cluster_journaling import ClusterJournaling
from .cluster_launches import ClusterLaunches, claim_launches, ends_stream, record_ends
from .cluster_reruns import ClusterReruns
from .cluster_retention import local_retention
from .cluster_schedules import ClusterScheduleDriver, ClusterScheduleStore
from .control import ControlHandler
from .dispatcher import Dispatcher
from .journaling import EndRequest, EndSender
from .leader import Leadership
from .runbook import RunBook, RunnerInfo
from .runners import RunnerTracker
from .runs import RunRecord
from .state import StateStore

log = logging.getLogger(__name__)

_RETRY = 1.0  # seconds between tries to reach the cluster's database or event stream at start


class ClusterScheduler:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        assert settings.config.cluster is not None
        self.settings = settings
        self.cfg = settings.config
        self.cluster_cfg = settings.config.cluster
        self.journal_dir = settings.journal_dir
        self.clock = clock
        self.recently_ended = RecentlyEnded(path=settings.state_dir / "recently-ended.scheduler.json")
        # this host's: what the Launches base expects
        self.state = StateStore(settings.state_dir / "scheduler.sqlite3")
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.control: ControlHandler | None = None  # the current term's, while leading

    # ------------------------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        c = self.cfg.scheduler
        keys = load_keys(self.settings)
        ctx = zmq.asyncio.Context()
        socks: list[zmq.asyncio.Socket] = []
        auth: AbstractContextManager[Any] = CurveAuthenticator(ctx, keys) if keys is not None else nullcontext()
        try:
            with auth:
                control = self._bind(ctx, socks, zmq.ROUTER, c.control, "scheduler.control", keys)
                dispatch = self._bind(ctx, socks, zmq.ROUTER, c.dispatch, "scheduler.dispatch", keys, mandatory=True)
                pub = self._bind(ctx, socks, zmq.PUB, c.publish, "scheduler.publish", keys)
                endpoints = Endpoints(reachable_endpoint(c.dispatch), reachable_endpoint(c.control), reachable_endpoint(c.publish))
                await anyio.to_thread.run_sync(self._prepare_dir)
                log.info("cluster mode: scheduler %s; config %s; journal directory %s; state %s", self.holder,
                         self.settings.path, self.journal_dir, self.cluster_cfg.state)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(serve_requests, control, self._handle, f"scheduler.control {c.control}")
                    task_status.started()
                    await self._lead(dispatch, pub, endpoints)
        finally:  # no await here: nothing in it can be cancelled
            for s in socks:
                s.close(linger=0)
            ctx.term()
            self.state.close()

    def _prepare_dir(self) -> None:
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        restore_fences(self.journal_dir)

    def _bind(self, ctx: zmq.asyncio.Context, socks: list[zmq.asyncio.Socket], kind: int, endpoint: str,
              what: str, keys: CurveKeys | None, mandatory: bool = False) -> zmq.asyncio.Socket:
        sock = ctx.socket(kind)
        socks.append(sock)
        configure_socket(sock, sndhwm=self.cfg.runner.send_hwm if kind == zmq.PUB else 10_000, rcvhwm=10_000)
        if mandatory:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # as in single-host mode (service.py)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind_secured(sock, endpoint, what, keys, self.settings.path)
        log.info("bound %s %s", what, endpoint)
        return sock

    async def _handle(self, req: Any) -> Any:
        control = self.control
        if control is None:
            raise ServiceUnavailable(f"scheduler {self.holder} is a standby: it does not lead the cluster now "
                                     "(the leader's control endpoint is recorded with lease 'scheduler' in cluster.state)")
        return await control.handle(req)

    # ------------------------------------------------------------------------------------ leading

    async def _connect(self) -> tuple[ClusterState, EventStream]:
        said = ""
        while True:
            try:
                state = await ClusterState.connect(self.cluster_cfg, min_size=0, max_size=6, timeout=3.0)
                try:
                    await state.migrate()
                    stream = await EventStream.connect(self.cluster_cfg)
                except BaseException:
                    await state.close()
                    raise
                try:
                    await stream.ensure()
                except BaseException:
                    await stream.close()
                    await state.close()
                    raise
                return state, stream
            except ServiceUnavailable as e:
                if str(e) != said:
                    log.warning("cluster mode: %s; trying again every %gs", e, _RETRY)
                    said = str(e)
                await anyio.sleep(_RETRY)

    async def _lead(self, dispatch: zmq.asyncio.Socket, pub: zmq.asyncio.Socket, endpoints: Endpoints) -> None:
        state, stream = await self._connect()
        async with state, stream:
            leadership = Leadership(state, self.holder, endpoints)
            while True:
                lease = await leadership.acquire()
                stepped_down = False
                try:
                    await self._term(lease, leadership, LeaderState(state), stream, dispatch, pub)
                except* (LeaseLost, ServiceUnavailable) as group:
                    stepped_down = True
                    for e in group.exceptions:
                        log.error("stopped leading (lease attempt %d): %s: %s", lease.attempt, type(e).__name__, e)
                finally:
                    self.control = None
                    if not stepped_down:  # a stop (or a bug): let a standby take over at once
                        await leadership.release(lease)

    async def _term(self, lease: Lease, leadership: Leadership, leader: LeaderState, stream: EventStream,
                    dispatch: zmq.asyncio.Socket, pub: zmq.asyncio.Socket) -> None:
        s, cfg = self.settings, self.cfg
        book = RunBook()
        ends_out, ends_in = anyio.create_memory_object_stream[EndRequest](math.inf)
        db_out, db_in = ends_stream()
        journaling = ClusterJournaling(book, self.journal_dir, s.tz, s.home, self.recently_ended, stream, leader, lease)
        journaling.pub = pub
        tracker = RunnerTracker(book, EndSender(book, ends_out), self.journal_dir, s.tz, cfg.scheduler.runner_lost_after,
                                f"scheduler.dispatch {cfg.scheduler.dispatch}")
        tracker.dispatch_sock = dispatch
        tracker.last_event = journaling.last_event
        tracker.same_host = False  # each runner has its own journal directory, on its own host
        journaling.judge_now = tracker.clock.now
        journaling.check_leading = leadership.check
        store = ClusterScheduleStore(leader, lease)
        await store.load()
        schedules = ClusterScheduleDriver(cfg, store, book, journaling, self.journal_dir, self.clock)

        async def assign(run_id: str, runner: str, attempt: int) -> None:
            await leader.run_dispatched(lease, run_id, runner, attempt)

        async def send(runner: RunnerInfo, msg: msgspec.Struct) -> bool:
            leadership.check()  # never a dispatch (or cancel) from a leader past its lease
            return await tracker.send(runner, msg)

        dispatcher = Dispatcher(book, cfg, send, assign, schedules.overlap_of)
        launches = ClusterLaunches(book, s, self.state, journaling)
        launches.leader = leader
        backfills = ClusterBackfills(book, s, journaling, schedules, leader, lease)
        control = ControlHandler(book, s, launches, schedules, journaling, send, dispatcher.wait_reason,
                                 tracker.clock.now, ClusterReruns(book, s, journaling, leader), backfills)
        alerts = Alerts(rules_of(cfg.alerts), ClusterAlertStore(leader.state), book, self.journal_dir, s.home,
                        run_link_base(cfg.gateway))

        def on_end(rec: RunRecord) -> None:
            alerts.notice(rec)
            db_out.send_nowait(rec)  # unbounded: one per run

        book.on_end = on_end
        async with anyio.create_task_group() as tg:
            tg.start_soon(leadership.keep, lease)
            await tg.start(record_ends, leader, lease, db_in)
            rows = await leader.active_runs()
            for row in rows:
                await journaling.adopt(row)
            await tg.start(journaling.write_ends, ends_in)
            await tg.start(alerts.run)
            tg.start_soon(tracker.receive)
            tg.start_soon(dispatcher.run)
            tg.start_soon(tracker.monitor)
            tg.start_soon(journaling.heartbeats, cfg.runner.heartbeat_interval, s.path)
            await tg.start(schedules.run)
            await tg.start(backfills.run)
            tg.start_soon(claim_launches, leader, lease, journaling)
            tg.start_soon(local_retention, leader, self.journal_dir, s.reports_dir, cfg.scheduler.keep_days)
            self.control = control
            log.info("leading (lease attempt %d): took over %d run(s) not ended: %d queued, %d awaiting their runners",
                     lease.attempt, len(rows), len(book.queue), len(book.active))
