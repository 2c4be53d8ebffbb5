"""Entry point of the scheduler: load the config, set up logging, run the service until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import anyio

from shared.config import ConfigError, Settings, load_settings
from shared.errors import RunwireError
from shared.logs import setup_logging

from .service import Scheduler

log = logging.getLogger(__name__)


async def _watch_signals(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


async def serve(settings: Settings) -> None:
    scheduler = Scheduler(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, tg.cancel_scope)
        await tg.start(scheduler.run)
        log.info("scheduler ready")


def _first_runwire_error(exc: BaseException) -> RunwireError | None:
    if isinstance(exc, RunwireError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_runwire_error(inner)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scheduler_svc", description="runwire scheduler: schedules and launches")
    parser.add_argument("--config", help="runwire.toml (default: $RUNWIRE_CONFIG, then ./runwire.toml)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"scheduler: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.config.log_level, "scheduler")
    try:
        anyio.run(serve, settings)
    except (RunwireError, BaseExceptionGroup) as e:
        err = _first_runwire_error(e)
        if err is None:
            raise
        log.error("scheduler stopped: %s", err)
        return 1
    except KeyboardInterrupt:
        pass
    log.info("scheduler stopped")
    return 0
