"""Retention of a journal directory: ended runs last written more than `keep_days` ago lose their
journal and report. The scheduler runs it on one host (after archiving each run,
scheduler_svc/retention.py); in cluster mode each runner host runs it on its own journals
(runner_svc/clusterlink.py), and the leading scheduler on its host's, whose journals hold only what it
wrote itself (`queued`): there the cluster's database says which runs ended (scheduler_svc/cluster.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .files import journal_path, list_run_ids, log
from .reader import JournalReader

DAY = 86400.0


def remove_expired(journal_dir: Path, reports_dir: Path, keep_days: float, now: float,
                   keep: Callable[[str], bool] | None = None) -> list[str]:
    """Retention: remove the journal and report of every ended run whose journal was last written
    before now - keep_days (blocking: for a worker thread), unless `keep(run_id)` says to keep it this
    pass (the scheduler's: not archived yet). Runs not ended are never removed, however old. Returns
    the run ids removed."""
    ended = []
    for run_id in written_before(journal_dir, now - keep_days * DAY):
        last = JournalReader(journal_path(journal_dir, run_id), run_id).last_event()
        if last is None or not last.is_terminal:
            continue  # not ended, or no readable line: never removed here
        if keep is not None and keep(run_id):
            continue
        ended.append(run_id)
    return remove_runs(journal_dir, reports_dir, ended)


def written_before(journal_dir: Path, cutoff: float) -> list[str]:
    """The runs whose journal was last written before `cutoff` (unix time; blocking)."""
    out = []
    for run_id in list_run_ids(journal_dir):
        try:
            if journal_path(journal_dir, run_id).stat().st_mtime < cutoff:
                out.append(run_id)
        except FileNotFoundError:
            continue  # removed meanwhile (by hand, or a probe clean-up)
    return out


def remove_runs(journal_dir: Path, reports_dir: Path, run_ids: list[str]) -> list[str]:
    """Remove these runs' journals and reports (blocking); returns the ones removed."""
    removed: list[str] = []
    for run_id in run_ids:
        try:
            journal_path(journal_dir, run_id).unlink(missing_ok=True)
            (reports_dir / f"{run_id}.json").unlink(missing_ok=True)
        except OSError as e:
            log.warning("retention: cannot remove the files of run %s: %s (kept; tried again next pass)", run_id, e)
            continue
        removed.append(run_id)
    return removed
