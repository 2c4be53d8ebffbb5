"""The gateway's aiohttp application: routes, middlewares, and the lifecycle of the hub (ZeroMQ
subscriber and journal sweeper) as a cleanup context: started before the site listens, cancelled and
awaited on shutdown after every open stream was closed with 1001."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import zmq.asyncio
from aiohttp import web

from shared.config import Settings

from . import api, health, history_api, streams
from .archiver import Archiver
from .errors import HttpError, error_middleware, expect_handler
from .hub import Hub
from .keys import ARCHIVER, CLIENTS, HUB, INDEX, REGISTRY, SETTINGS, STATS, ZMQ
from .metrics import GatewayStats, make_registry
from .runindex import RunIndex
from .security import auth_middleware

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
HUB_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("hub_task")
MAX_LINE = 64 * 1024  # request line and header sizes: cursors ride in URLs and Last-Event-ID


class _Started:
    """The `task_status` of a hub run inside a plain asyncio task."""

    def __init__(self, fut: asyncio.Future[None]) -> None:
        self.fut = fut

    def started(self, value: Any = None) -> None:
        if not self.fut.done():
            self.fut.set_result(None)


async def _run_hub(hub: Hub, ctx: zmq.asyncio.Context, started: asyncio.Future[None]) -> None:
    try:
        await hub.run(ctx, task_status=_Started(started))  # type: ignore[arg-type]
    except Exception as e:
        if not started.done():
            started.set_exception(e)
            return
        log.critical("the event hub failed: %s", e, exc_info=True)
        raise


async def _hub_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    journal_dir = settings.journal_dir
    count = await asyncio.to_thread(app[HUB].prepare)
    log.info("indexed %d run(s) from %s", count, journal_dir)
    ctx = zmq.asyncio.Context()
    app[ZMQ] = ctx
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_run_hub(app[HUB], ctx, started), name="gateway-hub")
    app[HUB_TASK] = task
    try:
        await started
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ctx.destroy(linger=0)
        raise
    try:
        yield
    finally:
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        if isinstance(results[0], Exception):
            log.error("event hub ended with %r", results[0])
        ctx.destroy(linger=0)


async def _archiver_context(app: web.Application) -> AsyncIterator[None]:
    """The archiver's task for the app's lifetime: a failure that ends it is logged at once (it retries
    its own errors, so only a bug ends it), and it is cancelled and awaited on shutdown."""
    archiver = app[ARCHIVER]

    def ended(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.critical("the archiver failed: runs are no longer archived: %r", t.exception())

    task = asyncio.create_task(archiver.run(), name="gateway-archiver")
    task.add_done_callback(ended)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def index_page(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return web.Response(text="runwire gateway: the dashboard page is not installed (gateway_svc/static/index.html)\n")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.StreamResponse:
    """A file of the dashboard (the folder is flat); a missing one is the API's JSON 404 (aiohttp's
    static route answers an empty application/octet-stream 404)."""
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if name.startswith(".") or "/" in name or "\\" in name or not path.is_file():
        raise HttpError(404, "not_found", f"no dashboard file {name[:100]!r}")
    return web.FileResponse(path)


def make_app(settings: Settings) -> web.Application:
    gw = settings.config.gateway
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(settings.token)],
        client_max_size=gw.max_body_bytes,
        handler_args={"max_line_size": MAX_LINE, "max_field_size": MAX_LINE},
    )
    stats = GatewayStats()
    index = RunIndex(settings.journal_dir)
    hub = Hub(settings, stats, index)
    app[SETTINGS] = settings
    app[STATS] = stats
    app[INDEX] = index
    app[HUB] = hub
    archiver = Archiver(settings)
    hub.run_end_listeners.append(archiver.run_ended)
    app[ARCHIVER] = archiver
    app[CLIENTS] = set()
    app[REGISTRY] = make_registry(stats, hub.gauges, lambda: [seen.hb for seen in hub.publishers.values()])
    app.cleanup_ctx.append(_hub_context)
    app.cleanup_ctx.append(_archiver_context)
    app.on_shutdown.append(streams.close_streams)

    app.router.add_get("/", index_page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/api/events", streams.sse_events)
    app.router.add_get("/ws/events", streams.ws_all_events)
    app.router.add_get("/ws/events/{run_id}", streams.ws_run_events)
    api.add_routes(app)
    history_api.add_routes(app)
    for route in app.router.routes():
        # aiohttp takes an expect handler per route only (add_get(..., expect_handler=)): set it on all
        route._expect_handler = expect_handler  # type: ignore[attr-defined]
    return app
