"""The gateway's aiohttp application: routes, middlewares and the objects its handlers share (the hub,
the run index, the stats, the archiver). The hub and the archiver run in the service's task group
(service.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from shared.config import Settings
from shared.curve import load_keys

from . import api, backfill_api, health, history_api, streams
from .archiver import Archiver
from .errors import HttpError, error_middleware, expect_handler
from .hub import Hub
from .keys import ARCHIVER, CLIENTS, HUB, INDEX, REGISTRY, SETTINGS, STATS
from .metrics import GatewayStats, make_registry
from .runindex import RunIndex
from .security import auth_middleware

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_LINE = 64 * 1024  # request line and header sizes: cursors ride in URLs and Last-Event-ID


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
    hub.keys = load_keys(settings)  # CURVE for the SUB socket: None without [cluster.curve]
    archiver = Archiver(settings)  # runs in the service's task group beside the hub (service.py)
    hub.run_end_listeners.append(archiver.run_ended)
    app[ARCHIVER] = archiver
    app[CLIENTS] = set()
    app[REGISTRY] = make_registry(stats, hub.gauges, lambda: [seen.hb for seen in hub.publishers.values()],
                                  hub.counters)
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
    backfill_api.add_routes(app)
    for route in app.router.routes():
        # aiohttp takes an expect handler per route only (add_get(..., expect_handler=)): set it on all
        route._expect_handler = expect_handler  # type: ignore[attr-defined]
    return app
