"""Entry point of the runner: `python -m runner_svc [--config PATH]`."""

from __future__ import annotations

from shared.config import Settings
from shared.entry import service_main

from .service import RunnerService


async def _serve(settings: Settings) -> None:
    await RunnerService(settings).serve()


def main(argv: list[str] | None = None) -> int:
    return service_main("runner", "runwire runner: executes pipeline runs", argv, _serve)
