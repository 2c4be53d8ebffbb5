"""Retention: the journals and reports of ended runs last written more than `scheduler.keep_days` ago
are removed, at start and every hour, by the scheduler (the owner of runs); the gateway's run list
follows at its next directory sweep. Runs not ended are never removed, however old, and a run is
archived (`runwire_history.archive`, normally done by the gateway at its end) before its journal goes, so it
stays queryable in the history."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from runwire_history.archive import Archive, archivable
from shared.journal import remove_expired

from .runbook import RunBook

log = logging.getLogger(__name__)

RETENTION_INTERVAL = 3600.0  # seconds between passes


def unarchived(archive: Archive) -> Callable[[str], bool]:
    """remove_expired's `keep`: a run the archive does not hold and cannot take now stays."""
    return lambda run_id: archivable(run_id) and not _archived(archive, run_id)


def _archived(archive: Archive, run_id: str) -> bool:
    """Whether the run is in the archive, archiving it now if the gateway has not (yet)."""
    try:
        archive.archive_run(run_id)
        return True
    except Exception as e:  # a journal is never removed unarchived: kept, and tried again next pass
        log.error("retention: run %s is not archived and cannot be archived now (%s): its journal is kept", run_id, e)
        return False


class Retention:
    def __init__(self, book: RunBook, journal_dir: Path, reports_dir: Path, keep_days: float, archive_dir: Path) -> None:
        self.book = book
        self.journal_dir = journal_dir
        self.archive_dir = archive_dir  # a journal is archived before it is removed
        self.reports_dir = reports_dir
        self.keep_days = keep_days

    async def run(self) -> None:
        if self.keep_days <= 0:
            return  # keep every run
        while True:
            archive = Archive(self.archive_dir, self.journal_dir)
            removed = await anyio.to_thread.run_sync(
                remove_expired, self.journal_dir, self.reports_dir, self.keep_days, time.time(),
                unarchived(archive))
            for run_id in removed:
                rec = self.book.get(run_id)
                if rec is not None and rec.ended:
                    self.book.forget(rec)
            if removed:
                log.info("removed %d ended run(s) last written more than %g days ago (journals and reports "
                         "in %s), oldest %s", len(removed), self.keep_days, self.journal_dir, removed[0])
            await anyio.sleep(RETENTION_INTERVAL)
