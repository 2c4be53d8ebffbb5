"""Entry point of the runner: parse arguments, load the config, run the service until a signal."""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from shared.config import load_settings
from shared.errors import ConfigError, RunwireError
from shared.logs import setup_logging

from .service import RunnerService

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runner_svc", description="runwire runner: executes pipeline runs")
    parser.add_argument("--config", help="path of runwire.toml (default: $RUNWIRE_CONFIG, then ./runwire.toml)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"runner: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.config.log_level, "runner")
    service = RunnerService(settings)
    try:
        anyio.run(service.serve)
    except BaseExceptionGroup as group:
        # a socket that cannot be bound (port taken) or a journal directory that cannot be made: say
        # which, without a traceback; anything else is a bug and keeps its traceback
        leaves = _leaves(group)
        if not all(isinstance(e, (OSError, RunwireError)) for e in leaves):
            raise
        for e in leaves:
            log.error("runner cannot start: %s", e)
        return 1
    except (OSError, RunwireError) as e:
        log.error("runner cannot start: %s", e)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
