"""How every runwire service starts and stops: its arguments, config, logging, the one owner of
SIGINT/SIGTERM and of the service's task group, and exit codes (0 clean stop, 1 could not start or
failed, 2 bad config).

The one service shape: a service is an object with `async def run(self, *, task_status)` that opens its
sockets in the task that owns them, calls `task_status.started()` once it serves, and runs until
cancelled; optionally `async def before_stop(self, signame)` (e.g. end runs cleanly) runs on the first
signal, before the cancel. `service_main` runs it here; the tests start services through the same
object (`run_service`, or `tg.start(service.run)` in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from . import gcpauses
from .config import Settings, load_settings
from .errors import ConfigError, RunwireError
from .logs import setup_logging

log = logging.getLogger(__name__)

# "0" runs a service on asyncio's own event loop even where uvloop is installed (default "1": uvloop
# where installed, which costs about half as much per loop wake-up: see README, End-to-end benchmark)
UVLOOP_ENV = "RUNWIRE_UVLOOP"
_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")


def use_uvloop(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether services run on uvloop: installed, and not turned off by RUNWIRE_UVLOOP=0.
    A value that is neither yes nor no is a ConfigError naming the variable."""
    value = environ.get(UVLOOP_ENV, "1").strip().lower()
    if value in _NO:
        return False
    if value not in _YES:
        raise ConfigError(f"environment variable {UVLOOP_ENV}={environ[UVLOOP_ENV]!r}: expected 1 or 0 (true/false, yes/no, on/off)")
    return importlib.util.find_spec("uvloop") is not None


class Service(Protocol):
    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...


async def run_service(name: str, service: Service, settle_gc: bool = False) -> None:
    """Run `service` in a task group with the signal watcher; log `<name> ready` once it serves (the
    line the tests and the run book wait for) and `<name> stopped` at the end, however it ends.
    `settle_gc` (a service's own process): then freeze what it holds out of the collector's scans
    (shared/gcpauses.py)."""
    before_stop: Callable[[str], Awaitable[None]] | None = getattr(service, "before_stop", None)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watch_signals, tg.cancel_scope, before_stop)
            await tg.start(service.run)
            if settle_gc:
                log.info("%s: %d objects held since start frozen out of the garbage collector's scans", name, gcpauses.settle())
            log.info("%s ready", name)
    finally:
        log.info("%s stopped", name)


def service_main(
    name: str,
    description: str,
    argv: list[str] | None,
    make: Callable[[Settings], Service],
    check: Callable[[Settings], None] | None = None,
) -> int:
    """Parse `--config`, load and check the settings, set up logging, run the service `make` builds.

    A service that cannot start because of its environment (a port taken, a directory it cannot make:
    OSError or RunwireError, alone or in a task group) says so in one line and exits 1; anything else
    is a bug and keeps its traceback.
    """
    parser = argparse.ArgumentParser(prog=f"{name}_svc", description=description)
    parser.add_argument("--config", help="runwire.toml (default: $RUNWIRE_CONFIG, then ./runwire.toml)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        if check is not None:
            check(settings)
        uvloop = use_uvloop()
    except ConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.config.log_level, name)
    try:
        anyio.run(_build_and_run, name, make, settings, backend_options={"use_uvloop": uvloop})
    except KeyboardInterrupt:
        return 0
    except (OSError, RunwireError, BaseExceptionGroup) as e:
        leaves = _leaves(e)
        if not all(isinstance(x, (OSError, RunwireError)) for x in leaves):
            raise
        for x in leaves:
            log.error("%s cannot start: %s", name, x)
        return 1
    return 0


async def _build_and_run(name: str, make: Callable[[Settings], Service], settings: Settings) -> None:
    loop = type(asyncio.get_running_loop())
    log.info("%s: event loop %s.%s", name, loop.__module__, loop.__qualname__)  # uvloop.Loop, or asyncio's
    await run_service(name, make(settings), settle_gc=True)  # built inside the event loop: it may use anyio at once


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def watch_signals(
    scope: anyio.CancelScope,
    before_stop: Callable[[str], Awaitable[None]] | None = None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The service's one owner of SIGINT/SIGTERM: on the first, run `before_stop` (e.g. cancel runs
    cleanly), then cancel `scope`, the service's task group."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("%s received: shutting down", name)
            if before_stop is not None:
                await before_stop(name)
            scope.cancel()
            return
