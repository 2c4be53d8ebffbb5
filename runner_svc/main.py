"""Entry point of the runner: `python -m runner_svc [--config PATH]`."""

from __future__ import annotations

from shared.entry import service_main

from .service import RunnerService


def main(argv: list[str] | None = None) -> int:
    return service_main("runner", "runwire runner: executes pipeline runs", argv, RunnerService)
