"""Entry point of the scheduler: `python -m scheduler_svc [--config PATH]`."""

from __future__ import annotations

from shared.config import Settings
from shared.entry import Service, service_main

from .service import Scheduler


def make(settings: Settings) -> Service:
    """Single-host mode, or (a `[cluster]` section) cluster mode, whose engines are loaded only then."""
    if settings.config.cluster is None:
        return Scheduler(settings)
    from .cluster import ClusterScheduler
    return ClusterScheduler(settings)


def main(argv: list[str] | None = None) -> int:
    return service_main("scheduler", "runwire scheduler: schedules and launches", argv, make)
