"""The runner's connections in cluster mode (loaded only with `[cluster]`): the event stream (NATS
JetStream), opened before the runner serves and closed after its last run has ended, and the runner
registry (PostgreSQL), where the runner registers its PUB and control endpoints and capacity and then
heartbeats. A registry that cannot be reached is logged loudly and tried again; it never stops the
runner (its runs go on streaming through JetStream). Also the retention of this host's journals, and
the ends journaled here that the stream never acknowledged."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self
from zoneinfo import ZoneInfo

import anyio
import asyncpg

from runwire_cluster.endpoints import reachable_endpoint
from runwire_cluster.events import EventStream, describe_nats
from runwire_cluster.state import ClusterState
from shared.config import Settings
from shared.errors import ServiceUnavailable
from shared.journal import JournalWriter, remove_expired

from .publish import Publisher
from .streamed import EndMarks, StopSwitch, StreamAppender, open_local_journal, take_over_run
from .unacked_ends import SETTLE_EVERY_S, settle_unacked_ends

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 2.0  # between two tries to reach NATS at start
RETENTION_INTERVAL_S = 3600.0  # between two passes over this host's journals


class ClusterLink:
    """An async context manager: entering connects to the event stream (trying again, loudly, until it
    answers); `registry_loop` (a task of the service's group) keeps the registry entry; leaving
    removes the entry (a clean stop: gateways let the runner go) and closes both connections."""

    def __init__(self, settings: Settings, runner_id: str) -> None:
        assert settings.config.cluster is not None
        self.cluster = settings.config.cluster
        self.cfg = settings.config.runner
        self.runner_id = runner_id
        self.publish = reachable_endpoint(self.cfg.publish)
        self.control = reachable_endpoint(self.cfg.control)
        self.stream: EventStream | None = None
        self.state: ClusterState | None = None
        self.registered = False
        self.heartbeats = 0
        self.stop_switch = StopSwitch()  # thrown once the runner stops waiting for its runs' appends
        self.settings = settings
        self.end_marks = EndMarks(settings.state_dir / "unacked-ends")
        self.writer_id = f"runner.{runner_id}"

    async def __aenter__(self) -> Self:
        self.stream = await self._connect_stream()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        with anyio.CancelScope(shield=True):
            if self.state is not None:
                await self._leave(self.state)
            if self.stream is not None:
                await self.stream.close()

    async def _connect_stream(self) -> EventStream:
        stream = await EventStream.open_ready(self.cluster, who=f"runner {self.runner_id}",
                                              waiting="runs cannot be taken before it answers", retry_every=CONNECT_RETRY_S)
        log.info("event stream %s on NATS %s", stream.name, describe_nats(self.cluster))
        return stream

    # ---------------------------------------------------------------------------------- registry

    async def registry_loop(self) -> None:
        """Register, then heartbeat every runner.heartbeat_interval; register again if the entry was
        removed (e.g. a scheduler declared this runner lost). The database away: logged, tried again."""
        interval = self.cfg.heartbeat_interval
        failing_since: float | None = None
        last_error_log = float("-inf")
        while True:
            try:
                await self._beat()
                if failing_since is not None:
                    log.warning("runner registry %s: reachable again after %.0fs; runner %s registered",
                                self._where(), time.monotonic() - failing_since, self.runner_id)
                    failing_since = None
            except (ServiceUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - last_error_log >= 10.0:  # loud, but not a line per heartbeat
                    last_error_log = now
                    log.error("runner registry %s: runner %s cannot register or heartbeat (for %.0fs): %s: %s; "
                              "trying again every %gs (its runs go on)", self._where(), self.runner_id,
                              now - failing_since, type(e).__name__, e, interval)
            await anyio.sleep(interval)

    def _where(self) -> str:
        return self.state.where if self.state is not None else "(cluster.state)"

    async def _beat(self) -> None:
        if self.state is None:
            self.state = await ClusterState.connect(self.cluster, min_size=1, max_size=2)
        state = self.state
        if self.registered:
            if await state.runner_heartbeat(self.runner_id):
                self.heartbeats += 1
                return
            log.warning("runner registry %s: runner %s is no longer registered (removed as lost?): registering again",
                        state.where, self.runner_id)
            self.registered = False
        await state.migrate()  # the registry's table, whichever service reached the database first
        await state.register_runner(self.runner_id, self.publish, self.control, self.cfg.capacity)
        self.registered = True
        log.info("runner registry %s: registered runner %s (publish %s, control %s, capacity %d)", state.where,
                 self.runner_id, self.publish, self.control, self.cfg.capacity)

    async def retention_loop(self) -> None:
        """This host's journals (a task of the service's group): in cluster mode no scheduler sees
        them, so the runner removes its ended runs' journals and reports once older than
        `scheduler.keep_days`, at start and every hour (0: keeps every run). The event stream keeps
        its own copy by `cluster.stream_max_age`."""
        s = self.settings
        keep_days = s.config.scheduler.keep_days
        if keep_days <= 0:
            return
        while True:
            removed = await anyio.to_thread.run_sync(remove_expired, s.journal_dir, s.reports_dir, keep_days, time.time(),
                                                      self.end_marks.has)  # an end not settled yet stays
            if removed:
                log.info("retention: removed %d ended run(s) last written more than %g days ago from %s, oldest %s",
                         len(removed), keep_days, s.journal_dir, removed[0])
            await anyio.sleep(RETENTION_INTERVAL_S)

    async def _leave(self, state: ClusterState) -> None:
        try:
            with anyio.fail_after(3.0):
                if self.registered:
                    await state.remove_runner(self.runner_id)
                    log.info("runner registry %s: runner %s removed (stopping)", state.where, self.runner_id)
        except (TimeoutError, ServiceUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("runner registry %s: runner %s not removed at its stop (%s: %s): it ages out by its heartbeat",
                        state.where, self.runner_id, type(e).__name__, e)
        finally:
            with anyio.move_on_after(3.0):
                await state.close()

    # -------------------------------------------------------------------------------------- runs

    async def open_run(self, journal_dir: Path, run_id: str, tz: ZoneInfo) -> tuple[JournalWriter, StreamAppender]:
        """A dispatched run's local journal (made here if this host has none yet) brought level with
        the event stream, and its appender there. JournalError, ServiceUnavailable: not taken."""
        writer = await anyio.to_thread.run_sync(  # open or create, lock, repair: file work, off the loop
            open_local_journal, journal_dir, run_id, tz, self.cfg.durability, self.cfg.group_commit_ms)
        try:
            return writer, await self.take_over(writer)
        except BaseException:
            if writer.last_seq == 0:  # made just now, and nothing to put in it: not left behind
                writer.path.unlink(missing_ok=True)
            writer.close()
            raise

    async def take_over(self, writer: JournalWriter) -> StreamAppender:
        """The run's appender to the event stream, its local journal brought level with the stream."""
        assert self.stream is not None
        rw = await take_over_run(self.stream, writer, self.writer_id)
        return StreamAppender(rw, self.stop_switch, self.end_marks)

    async def new_run(self, run_id: str) -> StreamAppender:
        """The appender of a run this runner makes itself (the doctor's probe): no events in the stream
        yet, so a run of the same id written by anyone else fences the first append."""
        assert self.stream is not None
        return StreamAppender(await self.stream.writer(run_id, new=True, writer_id=self.writer_id), self.stop_switch,
                              self.end_marks)

    async def settle_ends(self, publisher: Publisher, busy: Callable[[str], bool] = lambda run_id: False) -> int:
        """Runs whose end was journaled here but maybe never reached the stream (runner_svc/
        unacked_ends.py), but those `busy` here. Returns how many ends were appended now."""
        assert self.stream is not None
        s = self.settings
        return await settle_unacked_ends(self.end_marks, self.stream, s.journal_dir, s.tz, self.cfg.durability,
                                         publisher, self.writer_id, self.stop_switch, busy)

    async def settle_loop(self, publisher: Publisher, busy: Callable[[str], bool]) -> None:
        """After the start's settling (a task of the service's group): marks left unsettled are tried
        again every SETTLE_EVERY_S; a run active here (`busy`) is left to its own append."""
        while True:
            await anyio.sleep(SETTLE_EVERY_S)
            await self.settle_ends(publisher, busy)
