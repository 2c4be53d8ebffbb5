"""Where journals live and what is counted about them: paths, listing, removal, fsync of a path, and
the process-wide repair counts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict

from ..ids import check_run_id, is_valid_run_id

log = logging.getLogger("shared.journal")  # one logger for the package: its users filter on it

JOURNAL_PREFIX = "pipeline_"
JOURNAL_SUFFIX = ".jsonl"
CHUNK_BYTES = 1 << 20
BISECT_WINDOW = 64 * 1024  # how far readers look for a line boundary at once

Durability = Literal["flush", "fsync"]


@dataclass
class JournalStats:
    """Process-wide counts of what readers and writers had to repair or skip (exported as metrics)."""

    torn_lines_repaired: int = 0
    corrupt_lines_skipped: int = 0
    _warned: set[tuple[str, int]] = field(default_factory=set)


stats = JournalStats()


class RepairCounts(TypedDict):
    """The journal repair counts a heartbeat carries (shared.wire.Heartbeat's fields of the same names)."""

    journal_torn_repaired: int
    journal_corrupt_skipped: int


def stats_fields() -> RepairCounts:
    """This process's journal repair counts, as a heartbeat carries them."""
    return {"journal_torn_repaired": stats.torn_lines_repaired, "journal_corrupt_skipped": stats.corrupt_lines_skipped}


def journal_path(journal_dir: Path, run_id: str) -> Path:
    """The journal file of a run; the run id is checked, so no request can name another path."""
    return journal_dir / f"{JOURNAL_PREFIX}{check_run_id(run_id)}{JOURNAL_SUFFIX}"


def run_id_from_path(path: Path) -> str | None:
    name = path.name
    if not (name.startswith(JOURNAL_PREFIX) and name.endswith(JOURNAL_SUFFIX)):
        return None
    return name[len(JOURNAL_PREFIX) : -len(JOURNAL_SUFFIX)] or None


def list_run_ids(journal_dir: Path) -> list[str]:
    """Run ids of every journal in the directory, sorted (time-sortable ids sort oldest first)."""
    ids = []
    try:
        entries = os.scandir(journal_dir)
    except FileNotFoundError:
        return []
    with entries:
        for entry in entries:
            rid = run_id_from_path(Path(entry.name))
            if rid is not None and is_valid_run_id(rid):
                ids.append(rid)
    ids.sort()
    return ids


def remove_older_journals(journal_dir: Path, prefix: str, keep: int) -> list[str]:
    """Delete the journals of runs whose id starts with `prefix`, all but the newest `keep` (ids sort by
    creation time). For runs that exist only to be looked at once, such as doctor's probes. Returns the
    run ids removed."""
    ids = [rid for rid in list_run_ids(journal_dir) if rid.startswith(prefix)]
    removed = ids[: max(0, len(ids) - keep)]
    for rid in removed:
        try:
            journal_path(journal_dir, rid).unlink()
        except FileNotFoundError:
            continue  # another process removed it first: the outcome is the same
    return removed


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory: so a new entry in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
