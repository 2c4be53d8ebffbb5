"""Retention: the journals and reports of ended runs last written more than `scheduler.keep_days` ago
are removed, at start and every hour, by the scheduler (the owner of runs); the gateway's run list
follows at its next directory sweep. Runs not ended are never removed, however old, and a run is
archived (`runwire_history.archive`, normally done by the gateway at its end) before its journal goes, so it
stays queryable in the history."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio

from runwire_history.archive import Archive, archivable
from shared.journal import JournalReader, journal_path, list_run_ids

from .runbook import RunBook

log = logging.getLogger(__name__)

RETENTION_INTERVAL = 3600.0  # seconds between passes
DAY = 86400.0


def remove_expired(journal_dir: Path, reports_dir: Path, keep_days: float, now: float,
                   archive: Archive | None = None) -> list[str]:
    """Remove the journal and report of every ended run whose journal was last written before
    now - keep_days (blocking: for a worker thread), once `archive` holds the run. Returns the run ids
    removed."""
    cutoff = now - keep_days * DAY
    removed: list[str] = []
    for run_id in list_run_ids(journal_dir):
        path = journal_path(journal_dir, run_id)
        try:
            if path.stat().st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue  # removed meanwhile (by hand, or a probe clean-up)
        last = JournalReader(path, run_id).last_event()
        if last is None or not last.is_terminal:
            continue  # not ended, or no readable line: never removed here
        if archive is not None and archivable(run_id) and not _archived(archive, run_id):
            continue
        try:
            path.unlink(missing_ok=True)
            (reports_dir / f"{run_id}.json").unlink(missing_ok=True)
        except OSError as e:
            log.warning("retention: cannot remove the files of run %s: %s (kept; tried again next pass)", run_id, e)
            continue
        removed.append(run_id)
    return removed


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
            removed = await anyio.to_thread.run_sync(
                remove_expired, self.journal_dir, self.reports_dir, self.keep_days, time.time(),
                Archive(self.archive_dir, self.journal_dir))
            for run_id in removed:
                rec = self.book.get(run_id)
                if rec is not None and rec.ended:
                    self.book.forget(rec)
            if removed:
                log.info("removed %d ended run(s) last written more than %g days ago (journals and reports "
                         "in %s), oldest %s", len(removed), self.keep_days, self.journal_dir, removed[0])
            await anyio.sleep(RETENTION_INTERVAL)
