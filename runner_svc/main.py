"""Entry point of the runner: parse arguments, load the config, run the service until a signal."""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from shared.config import load_settings
from shared.errors import ConfigError
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
    anyio.run(service.serve)
    return 0
