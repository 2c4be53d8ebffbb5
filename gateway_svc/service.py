"""The gateway as a service (see shared.entry): the hub (ZeroMQ subscriber and journal sweeper) in the
service's task group, the aiohttp site beside it. On cancel, every open stream is closed with 1001 while
the hub still runs; then the hub stops. A hub that fails stops the gateway with its cause.

With `[cluster]` (cluster.py) the gateway first connects to the event stream and loads its run index
from it (no journal directory is read), the hub's SUB socket follows the runner registry, and the
Parquet archiver reads the runs it archives from the stream (archiver.py)."""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager, nullcontext

import anyio
import zmq.asyncio
from aiohttp import web
from anyio.abc import TaskStatus

from shared.config import Settings
from shared.errors import BindError

from .app import make_app
from .errors import JsonErrorAppRunner
from .keys import ARCHIVER, CLUSTER_HEALTH, HUB, ZMQ

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0


class GatewayService:
    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None,
                 shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
        gw = settings.config.gateway
        self.settings = settings
        self.host = host or gw.host
        self.port = port or gw.port
        self.shutdown_timeout = shutdown_timeout
        self.app = make_app(settings)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s, app = self.settings, self.app
        log.info("config %s", s.path)
        log.info("journal directory %s", s.journal_dir)
        hub = app[HUB]
        cluster: AbstractAsyncContextManager[object]
        if s.config.cluster is None:
            count = await anyio.to_thread.run_sync(hub.prepare)
            log.info("indexed %d run(s) from %s", count, s.journal_dir)
            cluster = nullcontext()
        else:
            from .cluster import ClusterGateway  # cluster mode only: nothing of NATS/PostgreSQL is loaded without it

            cluster = link = ClusterGateway(s, hub, app[ARCHIVER])
            app[CLUSTER_HEALTH] = link.health
        async with cluster:
            await self._serve(task_status)

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        s, app = self.settings, self.app
        hub = app[HUB]
        ctx = app[ZMQ] = zmq.asyncio.Context()
        hub_scope = anyio.CancelScope(shield=True)  # stopped by us, after the streams are closed

        async def run_hub(*, task_status: TaskStatus[None]) -> None:
            with hub_scope:
                await hub.run(ctx, task_status=task_status)
            if not hub_scope.cancel_called:
                raise RuntimeError("the event hub stopped on its own: the gateway must not serve stale events")

        try:
            async with anyio.create_task_group() as tg:
                await tg.start(run_hub)
                await tg.start(app[ARCHIVER].run)  # it retries its own failures; one that ends it stops us
                runner = JsonErrorAppRunner(app, handle_signals=False, access_log=None,
                                            shutdown_timeout=self.shutdown_timeout)
                await runner.setup()
                try:
                    site = web.TCPSite(runner, self.host, self.port, reuse_address=True, backlog=1024)
                    try:
                        await site.start()
                    except OSError as e:
                        raise BindError("gateway.port", self.url, e.strerror or str(e), s.path, "HTTP") from e
                    log.info("listening on %s%s", self.url, " (token required)" if s.token else "")
                    log.info("scheduler control %s", s.config.scheduler.control)
                    task_status.started()
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await runner.cleanup()  # streams get 1001 while the hub still runs
                    hub_scope.cancel()
        finally:
            ctx.destroy(linger=0)
