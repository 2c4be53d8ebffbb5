"""The archive's ledger, `<home>/archive/ledger.sqlite3`: which Parquet files make up the archive and
which run each archived run is in. A file not in the ledger is not part of the archive (a crash left it
between its rename and the ledger's commit); readers list files from here, never from the directory.
Writers (the gateway's archiver, the scheduler's retention, `runwire archive rebuild`) hold the
exclusive `flock` on `<home>/archive/.lock`; readers a shared one, so a compaction never removes a file
under a scan."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LEDGER_NAME = "ledger.sqlite3"
LOCK_NAME = ".lock"

_DDL = """
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,      -- path under the archive directory
    day TEXT NOT NULL,          -- YYYY-MM-DD (UTC) of its runs' queued time
    pipeline TEXT NOT NULL,
    runs INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    first_us INTEGER NOT NULL,  -- min and max queued time of its runs
    last_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    file TEXT NOT NULL REFERENCES files(name),
    pipeline TEXT NOT NULL,
    run_us INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_file ON runs(file);
CREATE INDEX IF NOT EXISTS files_by_pipeline ON files(pipeline, last_us);
"""


@dataclass(frozen=True)
class FileEntry:
    name: str
    day: str
    pipeline: str
    runs: int
    rows: int
    first_us: int
    last_us: int


@contextlib.contextmanager
def archive_lock(archive_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """The archive's lock (blocking: call in a worker thread)."""
    archive_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(archive_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


class Ledger:
    """One connection to the ledger; use as a context manager (closes it)."""

    def __init__(self, archive_dir: Path, *, create: bool = True) -> None:
        self.path = archive_dir / LEDGER_NAME
        if not create and not self.path.exists():
            self.db = sqlite3.connect(":memory:")  # an absent archive reads as an empty one
        else:
            self.db = sqlite3.connect(self.path, timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_DDL)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def check(self) -> None:
        """Raise sqlite3.DatabaseError when the ledger file is damaged."""
        row = self.db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"{self.path}: quick_check says {row!r}")

    def has_run(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None

    def run_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT run_id FROM runs")}

    def files(self, *, pipeline: str | None = None, since_us: int | None = None) -> list[FileEntry]:
        sql = "SELECT name, day, pipeline, runs, rows, first_us, last_us FROM files"
        args: list[str | int] = []
        where = []
        if pipeline is not None:
            where.append("pipeline = ?")
            args.append(pipeline)
        if since_us is not None:
            where.append("last_us >= ?")
            args.append(since_us)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [FileEntry(*r) for r in self.db.execute(sql + " ORDER BY first_us, name", args)]

    def pipelines(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT pipeline FROM files ORDER BY pipeline")]

    def partitions_over(self, limit: int, before_day: str | None = None) -> list[tuple[str, str]]:
        """(day, pipeline) partitions with more than `limit` files (only days before `before_day`)."""
        sql = "SELECT day, pipeline FROM files"
        args: list[object] = []
        if before_day is not None:
            sql += " WHERE day < ?"
            args.append(before_day)
        sql += " GROUP BY day, pipeline HAVING count(*) > ?"
        args.append(limit)
        return [(r[0], r[1]) for r in self.db.execute(sql, args)]

    def partition_files(self, day: str, pipeline: str) -> list[FileEntry]:
        rows = self.db.execute("SELECT name, day, pipeline, runs, rows, first_us, last_us FROM files "
                               "WHERE day = ? AND pipeline = ? ORDER BY first_us, name", (day, pipeline))
        return [FileEntry(*r) for r in rows]

    def add_file(self, entry: FileEntry, runs: list[tuple[str, int, str]], *, replacing: Sequence[str] = ()) -> None:
        """Register a file and its runs (run_id, queued us, status), dropping the files it replaces, in
        one transaction: after a crash the ledger names either the old files or the new one."""
        with self.db:
            for name in replacing:
                self.db.execute("DELETE FROM runs WHERE file = ?", (name,))
                self.db.execute("DELETE FROM files WHERE name = ?", (name,))
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (entry.name, entry.day, entry.pipeline, entry.runs, entry.rows, entry.first_us, entry.last_us))
            self.db.executemany("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",
                                [(rid, entry.name, entry.pipeline, us, status) for rid, us, status in runs])

    def drop_file(self, name: str) -> list[str]:
        """Forget a file (missing or damaged); returns the run ids that were in it."""
        with self.db:
            lost = [r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE file = ?", (name,))]
            self.db.execute("DELETE FROM runs WHERE file = ?", (name,))
            self.db.execute("DELETE FROM files WHERE name = ?", (name,))
        return lost
