"""Writing the archive: each ended run's events as one Parquet file under
`<home>/archive/day=YYYY-MM-DD/pipeline=<name>/`, written to a temp name, fsynced, renamed, then
registered in the ledger (a run is archived entirely or not at all; a crash leaves at most an
unregistered file, which the next write of that run replaces or `sync` adopts). A partition's files are
merged into one (compaction) when they pile up and once their day is over, so a scan opens few files.
Every function here blocks: call it from a worker thread."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.events import Event
from shared.ids import PROBE_PREFIX
from shared.journal import JournalReader, fsync_path, journal_path, list_run_ids

from .ledger import LEDGER_NAME, FileEntry, Ledger, archive_lock
from .schema import SCHEMA, RunRows, day_of, run_table

log = logging.getLogger(__name__)

COMPACT_AT = 16  # files in one partition of today before they are merged
TMP_PREFIX = ".tmp-"
DAMAGED_DIR = "damaged"


def archivable(run_id: str) -> bool:
    return not run_id.startswith(PROBE_PREFIX)


def _partition_dir(day: str, pipeline: str) -> str:
    return f"day={day}/pipeline={quote(pipeline, safe='')}"


def _write_atomic(archive_dir: Path, name: str, table: pa.Table) -> None:
    final = archive_dir / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{final.name}"
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20)
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(final.parent)


def _today() -> str:
    return day_of(int(time.time() * 1_000_000))


@dataclass
class SyncReport:
    """What `Archive.sync` did."""

    archived: list[str] = field(default_factory=list)  # runs written from their journals
    adopted_files: int = 0  # complete files found outside the ledger (a crash, or a lost ledger)
    removed_files: int = 0  # superseded files and temp files left by a crash
    damaged_files: list[str] = field(default_factory=list)  # moved to damaged/
    lost_runs: list[str] = field(default_factory=list)  # in a damaged file, and no journal left
    compacted: int = 0  # partitions merged
    already: int = 0  # ended runs already archived

    def summary(self) -> str:
        parts = [f"{len(self.archived)} run(s) archived from journals", f"{self.already} already archived",
                 f"{self.adopted_files} file(s) adopted", f"{self.removed_files} leftover file(s) removed",
                 f"{self.compacted} partition(s) compacted"]
        if self.damaged_files:
            parts.append(f"{len(self.damaged_files)} damaged file(s) moved to {DAMAGED_DIR}/")
        if self.lost_runs:
            parts.append(f"{len(self.lost_runs)} run(s) lost (damaged file, journal gone): {', '.join(self.lost_runs[:5])}")
        return "; ".join(parts)


class Archive:
    """The archive in `archive_dir`, written from the journals in `journal_dir`; or, with None (cluster
    mode: a gateway host has no journals), only from the events handed to `archive_events`."""

    def __init__(self, archive_dir: Path, journal_dir: Path | None) -> None:
        self.dir = archive_dir
        self.journal_dir = journal_dir

    # ------------------------------------------------------------------------------ one run

    def archive_run(self, run_id: str, events: Sequence[Event] | None = None) -> bool:
        """Archive one ended run from `events` (all of them, in seq order) or else from its journal;
        False if it was archived already. Raises NotArchivable (not ended), FileNotFoundError (no
        journal) or an OSError/ArrowException."""
        with archive_lock(self.dir, exclusive=True), Ledger(self.dir) as ledger:
            if ledger.has_run(run_id):
                return False
            self._write_run(ledger, run_id, events)
            self._compact_due(ledger)
            return True

    def archived(self) -> set[str]:
        """The run ids the archive holds."""
        with archive_lock(self.dir, exclusive=False), Ledger(self.dir) as ledger:
            return ledger.run_ids()

    def _write_run(self, ledger: Ledger, run_id: str, events: Sequence[Event] | None = None) -> RunRows:
        if events is None:
            if self.journal_dir is None:
                raise FileNotFoundError(f"run {run_id}: no journals on this host, and no events given")
            path = journal_path(self.journal_dir, run_id)
            if not path.exists():
                raise FileNotFoundError(f"run {run_id}: no journal at {path}")
            events = JournalReader(path, run_id).read()
        rows = run_table(run_id, events)
        name = f"{_partition_dir(rows.day, rows.pipeline)}/run-{run_id}.parquet"
        _write_atomic(self.dir, name, rows.table)
        ledger.add_file(FileEntry(name, rows.day, rows.pipeline, 1, rows.table.num_rows, rows.run_us, rows.run_us),
                        [(run_id, rows.run_us, rows.status)])
        return rows

    # ------------------------------------------------------------------------------ compaction

    def _compact_due(self, ledger: Ledger) -> int:
        due = set(ledger.partitions_over(COMPACT_AT)) | set(ledger.partitions_over(1, before_day=_today()))
        for day, pipeline in sorted(due):
            self._compact(ledger, day, pipeline)
        return len(due)

    def _compact(self, ledger: Ledger, day: str, pipeline: str) -> None:
        files = ledger.partition_files(day, pipeline)
        if len(files) < 2:
            return
        table = pa.concat_tables([pq.read_table(self.dir / f.name, schema=SCHEMA) for f in files])
        table = table.sort_by([("run_ts", "ascending"), ("run_id", "ascending"), ("seq", "ascending")])
        name = f"{_partition_dir(day, pipeline)}/part-{uuid.uuid4().hex[:16]}.parquet"
        _write_atomic(self.dir, name, table)
        runs = self._runs_of(ledger, [f.name for f in files])
        ledger.add_file(FileEntry(name, day, pipeline, len(runs), table.num_rows,
                                  min(f.first_us for f in files), max(f.last_us for f in files)),
                        runs, replacing=[f.name for f in files])
        for f in files:  # superseded: the ledger names the new file now (a crash here leaves them for sync)
            (self.dir / f.name).unlink(missing_ok=True)

    @staticmethod
    def _runs_of(ledger: Ledger, names: list[str]) -> list[tuple[str, int, str]]:
        out: list[tuple[str, int, str]] = []
        for name in names:
            out.extend(ledger.db.execute("SELECT run_id, run_us, status FROM runs WHERE file = ?", (name,)))
        return out

    # ------------------------------------------------------------------------------ sync / rebuild

    def sync(self) -> SyncReport:
        """Make the archive whole (at the archiver's start, and `runwire archive rebuild`): a damaged
        ledger is set aside and rebuilt from the files; files the ledger names but that are missing or
        unreadable are forgotten (damaged ones moved to damaged/); complete files outside the ledger are
        adopted, or removed when the ledger has their runs already; temp files are removed; every ended
        journal not archived is archived; due partitions are compacted. Idempotent."""
        rep = SyncReport()
        with archive_lock(self.dir, exclusive=True):
            self._check_ledger()
            with Ledger(self.dir) as ledger:
                self._verify_files(ledger, rep)
                self._adopt_files(ledger, rep)
                if self.journal_dir is not None:
                    self._archive_journals(ledger, self.journal_dir, rep)
                rep.lost_runs = [r for r in rep.lost_runs if not ledger.has_run(r)]
                rep.compacted = self._compact_due(ledger)
        if rep.damaged_files or rep.lost_runs:
            log.error("archive %s: %s", self.dir, rep.summary())
        return rep

    def _archive_journals(self, ledger: Ledger, journal_dir: Path, rep: SyncReport) -> None:
        """Every ended journal not archived yet."""
        archived = ledger.run_ids()
        for run_id in list_run_ids(journal_dir):
            if not archivable(run_id):
                continue
            if run_id in archived:
                rep.already += 1
                continue
            last = JournalReader(journal_path(journal_dir, run_id), run_id).last_event()
            if last is None or not last.is_terminal:
                continue  # not ended: archived at its end
            self._write_run(ledger, run_id)
            rep.archived.append(run_id)

    def _check_ledger(self) -> None:
        path = self.dir / LEDGER_NAME
        if not path.exists():
            return
        try:
            with Ledger(self.dir) as ledger:
                ledger.check()
        except sqlite3.DatabaseError as e:
            aside = path.with_name(f"{LEDGER_NAME}.damaged-{int(time.time())}")
            log.error("archive ledger %s is damaged (%s): moved to %s, rebuilding it from the archive's files",
                      path, e, aside.name)
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                path.with_name(LEDGER_NAME + suffix).unlink(missing_ok=True)

    def _quarantine(self, name: str, why: str, rep: SyncReport) -> None:
        target = self.dir / DAMAGED_DIR / name.replace("/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.dir / name), target)
        rep.damaged_files.append(name)
        log.error("archive file %s is damaged (%s): moved to %s", self.dir / name, why, target)

    def _verify_files(self, ledger: Ledger, rep: SyncReport) -> None:
        for f in ledger.files():
            path = self.dir / f.name
            why = None
            if not path.exists():
                why = "missing"
            else:
                try:
                    if pq.read_metadata(path).num_rows != f.rows:
                        why = "row count differs from the ledger"
                except (OSError, pa.ArrowException) as e:
                    why = str(e)
            if why is None:
                continue
            if path.exists():
                self._quarantine(f.name, why, rep)
            else:
                log.error("archive file %s listed in the ledger is missing", path)
            rep.lost_runs.extend(ledger.drop_file(f.name))  # re-archived below where the journal is left

    def _adopt_files(self, ledger: Ledger, rep: SyncReport) -> None:
        known = {f.name for f in ledger.files()}
        found: list[tuple[int, str, pa.Table]] = []
        for path in sorted(self.dir.glob("day=*/pipeline=*/*")):
            name = path.relative_to(self.dir).as_posix()
            if path.name.startswith(TMP_PREFIX):
                path.unlink(missing_ok=True)  # a write a crash interrupted
                rep.removed_files += 1
                continue
            if name in known or not path.name.endswith(".parquet"):
                continue
            try:
                table = pq.read_table(path, schema=SCHEMA)
            except (OSError, pa.ArrowException) as e:
                self._quarantine(name, str(e), rep)
                continue
            found.append((table.num_rows, name, table))
        found.sort(key=lambda t: -t[0])  # merged files first: the single-run files they replaced are leftovers
        for _, name, table in found:
            have = ledger.run_ids()
            ids = pc.unique(table["run_id"]).to_pylist()
            new = [r for r in ids if r not in have]
            if not new:  # every run in it is archived already (e.g. a merge's leftover)
                (self.dir / name).unlink(missing_ok=True)
                rep.removed_files += 1
                continue
            if len(new) < len(ids):  # overlaps the ledger: keep only the runs it adds
                table = table.filter(pc.is_in(table["run_id"], value_set=pa.array(new)))
                (self.dir / name).unlink(missing_ok=True)
                name = name.rsplit("/", 1)[0] + f"/part-{uuid.uuid4().hex[:16]}.parquet"
                _write_atomic(self.dir, name, table)
            self._register_table(ledger, name, table)
            rep.adopted_files += 1

    @staticmethod
    def _register_table(ledger: Ledger, name: str, table: pa.Table) -> None:
        ids = table["run_id"].to_pylist()
        us = table["run_ts"].cast(pa.int64()).to_pylist()
        stages, kinds = table["stage"].to_pylist(), table["event"].to_pylist()
        runs: dict[str, list] = {}
        for rid, u, stage, kind in zip(ids, us, stages, kinds, strict=True):
            entry = runs.setdefault(rid, [u, ""])
            if stage == "pipeline" and kind in ("success", "failure", "cancelled"):
                entry[1] = kind
        first, last = min(us), max(us)
        ledger.add_file(FileEntry(name, day_of(first), table["pipeline"][0].as_py(), len(runs), table.num_rows, first, last),
                        [(rid, u, status) for rid, (u, status) in runs.items()])


ARCHIVE_DIRNAME = "archive"


def archive_dir_of(home: Path) -> Path:
    """`<home>/archive/` (CONTRACT.md)."""
    return home / ARCHIVE_DIRNAME
