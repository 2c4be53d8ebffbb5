"""Entry point of the gateway: load the config, refuse an unsafe bind, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import anyio
from aiohttp import web

from shared.config import Settings, load_settings
from shared.errors import ConfigError
from shared.logs import setup_logging

from .app import HUB_TASK, make_app
from .security import check_bind

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0


async def serve(settings: Settings) -> None:
    gw = settings.config.gateway
    log.info("config %s", settings.path)
    log.info("journal directory %s", settings.journal_dir)
    app = make_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
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

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("%s received: shutting down", signal.Signals(signum).name)
                        tg.cancel_scope.cancel()
                        return

            async def watch_hub() -> None:
                # the hub runs for the app's lifetime; if it ever ends, the gateway must not keep serving stale
                await asyncio.wait([hub_task])
                raise RuntimeError(f"the event hub stopped: {hub_task.exception() if not hub_task.cancelled() else 'cancelled'}")

            tg.start_soon(watch_signals)
            tg.start_soon(watch_hub)
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
        log.info("gateway stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway_svc", description="runwire gateway: live events and the HTTP API")
    parser.add_argument("--config", help="path of runwire.toml (default: $RUNWIRE_CONFIG, then ./runwire.toml)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        check_bind(settings.config.gateway.host, settings.token, settings.path)
    except ConfigError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.config.log_level, "gateway")
    try:
        anyio.run(serve, settings)
    except OSError as e:
        log.error("%s", e)
        return 1
    return 0
