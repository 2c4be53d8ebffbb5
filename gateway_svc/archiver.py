"""The gateway's archiver: it sees every run end (the hub follows all runs) and writes each ended run
to the Parquet archive (`runwire_history.archive`) in a worker thread, off the event loop. At start it syncs
the archive with the journals (runs that ended while no gateway ran). A failed write is logged as an
error and retried with backoff; it never delays a run or the event stream."""

from __future__ import annotations

import asyncio
import logging

import anyio
import anyio.abc

from runwire_history.archive import Archive, archivable, archive_dir_of
from runwire_history.schema import NotArchivable
from shared.config import Settings

log = logging.getLogger(__name__)

RETRY_FIRST = 1.0
RETRY_MAX = 60.0


class Archiver:
    def __init__(self, settings: Settings) -> None:
        self.archive = Archive(archive_dir_of(settings.home), settings.journal_dir)
        self.pending: dict[str, None] = {}  # run ids ended, not yet archived (insertion order)
        self._wake = asyncio.Event()
        self.archived = 0
        self.failures = 0
        self.synced = False

    def run_ended(self, run_id: str) -> None:
        """Called by the hub for each terminal event it delivers (never blocks)."""
        if archivable(run_id):
            self.pending[run_id] = None
            self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._retrying("sync the archive with the journals", self._sync)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                run_id = next(iter(self.pending))
                await self._retrying(f"archive run {run_id}", self._archive_one, run_id)
                self.pending.pop(run_id, None)

    async def _sync(self) -> None:
        rep = await anyio.to_thread.run_sync(self.archive.sync)
        self.synced = True
        self.archived += len(rep.archived)
        log.info("archive %s: %s", self.archive.dir, rep.summary())

    async def _archive_one(self, run_id: str) -> None:
        try:
            if await anyio.to_thread.run_sync(self.archive.archive_run, run_id):
                self.archived += 1
        except (NotArchivable, FileNotFoundError) as e:
            # nothing to retry: a journal removed by hand, or a run someone else's end event named
            log.error("run %s cannot be archived: %s", run_id, e)

    async def _retrying(self, what: str, step, *args: str) -> None:  # type: ignore[no-untyped-def]
        delay = RETRY_FIRST
        while True:
            try:
                await step(*args)
                return
            except Exception as e:  # any failure of a write: loud, retried, never dropped
                self.failures += 1
                log.error("archive %s: cannot %s: %s (retrying in %.0f s)", self.archive.dir, what, e, delay,
                          exc_info=self.failures == 1)
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
