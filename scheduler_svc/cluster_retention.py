"""Cluster mode: retention of the leading scheduler's own journal directory. What it holds is what the
scheduler wrote itself (a run's `queued`, a skipped slot's events); a run's end is in the event stream
and in the run's row, not here, so `remove_expired` (which looks for a terminal line) would keep every
file forever. A file goes once it was last written more than `scheduler.keep_days` ago and its run's
row says the run ended; a run not ended, or one the database does not know, stays. At each term's
start and hourly, while this scheduler leads (a standby's directory waits for its next term)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio

from runwire_cluster.runs import LeaderState
from shared.journal.retention import DAY, remove_runs, written_before

log = logging.getLogger(__name__)

INTERVAL_S = 3600.0
_BATCH = 1000  # run ids asked of the database at once


async def local_retention(leader: LeaderState, journal_dir: Path, reports_dir: Path, keep_days: float) -> None:
    """A task of the term (keep_days 0: keeps every run)."""
    if keep_days <= 0:
        return
    while True:
        old = await anyio.to_thread.run_sync(written_before, journal_dir, time.time() - keep_days * DAY)
        removed: list[str] = []
        for i in range(0, len(old), _BATCH):
            ended = [row.run_id for row in await leader.runs(old[i:i + _BATCH]) if row.outcome is not None]
            removed += await anyio.to_thread.run_sync(remove_runs, journal_dir, reports_dir, ended)
        if removed:
            log.info("retention: removed %d run(s) ended in the cluster and last written here more than %g days ago "
                     "from %s (%d older ones not ended or unknown kept)", len(removed), keep_days, journal_dir,
                     len(old) - len(removed))
        await anyio.sleep(INTERVAL_S)
