"""One logging setup for every runwire process: timestamped lines to stderr, level from the config."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", service: str = "runwire") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
