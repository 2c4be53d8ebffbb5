"""Entry point of the scheduler: `python -m scheduler_svc [--config PATH]`."""

from __future__ import annotations

from shared.entry import service_main

from .service import Scheduler


def main(argv: list[str] | None = None) -> int:
    return service_main("scheduler", "runwire scheduler: schedules and launches", argv, Scheduler)
