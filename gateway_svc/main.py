"""Entry point of the gateway: load the config, refuse an unsafe bind, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import anyio
from aiohttp import web

from shared.config import Settings
from shared.entry import service_main, watch_signals

from .app import HUB_TASK, make_app
from .errors import JsonErrorAppRunner
from .security import check_bind

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0


async def serve(settings: Settings) -> None:
    gw = settings.config.gateway
    log.info("config %s", settings.path)
    log.info("journal directory %s", settings.journal_dir)
    app = make_app(settings)
    runner = JsonErrorAppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()  # indexes the journals and connects the subscriber (cleanup context)
    try:
        site = web.TCPSite(runner, gw.host, gw.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as e:
            raise OSError(f"gateway: cannot listen on http://{gw.host}:{gw.port}: {e.strerror or e}") from e
        log.info("listening on http://%s:%d%s", gw.host, gw.port, " (token required)" if settings.token else "")
        log.info("scheduler control %s", settings.config.scheduler.control)
        log.info("gateway ready")
        hub_task = app[HUB_TASK]
        async with anyio.create_task_group() as tg:

            async def watch_hub() -> None:
                # the hub runs for the app's lifetime; if it ever ends, the gateway must not keep serving stale
                await asyncio.wait([hub_task])
                raise RuntimeError(f"the event hub stopped: {hub_task.exception() if not hub_task.cancelled() else 'cancelled'}")

            await tg.start(watch_signals, tg.cancel_scope)
            tg.start_soon(watch_hub)
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
        log.info("gateway stopped")


def main(argv: list[str] | None = None) -> int:
    def check(settings: Settings) -> None:
        check_bind(settings.config.gateway.host, settings.token, settings.path)

    return service_main("gateway", "runwire gateway: live events and the HTTP API", argv, serve, check)
