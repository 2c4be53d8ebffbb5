"""Entry point of the scheduler: `python -m scheduler_svc [--config PATH]`."""

from __future__ import annotations

import logging

import anyio

from shared.config import Settings
from shared.entry import service_main, watch_signals

from .service import Scheduler

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    scheduler = Scheduler(settings)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watch_signals, tg.cancel_scope)
            await tg.start(scheduler.run)
            log.info("scheduler ready")
    finally:
        log.info("scheduler stopped")


def main(argv: list[str] | None = None) -> int:
    return service_main("scheduler", "runwire scheduler: schedules and launches", argv, serve)
