"""The archive on real files: crash leftovers (a temp file torn by a kill, a file renamed but never
registered, a ledger lost or damaged, a damaged Parquet file) never duplicate or lose a run; sync is
idempotent; compaction keeps every run once; retention archives before it removes; the history route's
400s name the parameter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pyarrow.parquet as pq
import pytest

from runwire_history import archive as archive_mod
from runwire_history.analytics import Query, history
from runwire_history.archive import Archive, _write_atomic
from runwire_history.ledger import Ledger
from runwire_history.schema import run_table
from scheduler_svc.retention import unarchived
from shared.ids import new_run_id
from shared.journal import JournalReader, JournalWriter, begin_run, journal_path, remove_expired
from tests.test_gateway_helpers import make_settings, running_gateway

TZ = ZoneInfo("UTC")


def ended_run(journal_dir: Path, pipeline: str = "p", outcome: str = "success", items: tuple[str, ...] = ("X",)) -> str:
    run_id = new_run_id()
    begin_run(journal_dir, run_id, TZ, pipeline, {}, {"trigger": "manual"})
    with JournalWriter.open(journal_dir, run_id, TZ) as w:
        w.append("pipeline", "start", "started")
        w.append("s", "start", "s started")
        for item in items:
            w.append("s", "start", "", {"item": item})
            w.append("s", "log", "hello", {"item": item, "stream": "stdout"})
            w.append("s", "log", "retrying", {"item": item, "attempt": 2, "failed_attempt": 1})
            w.append("s", "failure" if outcome == "failure" else "success", "", {"item": item})
        w.append("s", "metric", "counters", {"elapsed_s": 0.25, "files": 3})
        w.append("s", outcome, "s ended")
        w.append("pipeline", outcome, "done")
    return run_id


def archived_rows(archive_dir: Path) -> list[tuple[str, int]]:
    """(run_id, seq) of every row in the files the ledger names."""
    with Ledger(archive_dir) as ledger:
        names = [f.name for f in ledger.files()]
    rows: list[tuple[str, int]] = []
    for name in names:
        t = pq.read_table(archive_dir / name, columns=["run_id", "seq"])
        rows += list(zip(t["run_id"].to_pylist(), t["seq"].to_pylist(), strict=True))
    return rows


def journal_rows(journal_dir: Path, run_ids: list[str]) -> list[tuple[str, int]]:
    return [(r, e.seq) for r in run_ids for e in JournalReader(journal_path(journal_dir, r), r).read()]


def test_every_field_is_kept(tmp_path: Path) -> None:
    journals = tmp_path / "events"
    journals.mkdir()
    rid = ended_run(journals)
    events = JournalReader(journal_path(journals, rid), rid).read()
    t = run_table(rid, events).table.to_pylist()
    assert [(r["seq"], r["timestamp"], r["stage"], r["event"], r["msg"]) for r in t] == \
        [(e.seq, e.timestamp, e.stage, e.event, e.msg) for e in events]
    import json
    assert [json.loads(r["data"]) if r["data"] else None for r in t] == [e.data for e in events]
    assert {r["pipeline"] for r in t} == {"p"}
    assert [r["attempt"] for r in t if r["attempt"] is not None] == [2]
    assert [r["elapsed_s"] for r in t if r["elapsed_s"] is not None] == [0.25]
    assert [r["item"] for r in t if r["item"]] == ["X"] * 4
    ends = [r for r in t if r["duration_s"] is not None]
    assert [(r["stage"], r["item"]) for r in ends] == [("s", "X"), ("s", None), ("pipeline", None)]


def test_crash_leftovers_are_ignored_and_each_run_is_archived_once(tmp_path: Path) -> None:
    journals, archive_dir = tmp_path / "events", tmp_path / "archive"
    journals.mkdir()
    a, b, c = (ended_run(journals) for _ in range(3))
    running = new_run_id()
    begin_run(journals, running, TZ, "p", {}, {"trigger": "manual"})  # not ended: not archived
    arch = Archive(archive_dir, journals)
    assert arch.archive_run(a) is True and arch.archive_run(a) is False
    part = next(archive_dir.glob("day=*/pipeline=p"))
    # a kill mid-write leaves a torn temp file; a kill after the rename, before the ledger's commit, a
    # complete file the ledger does not name
    (part / f".tmp-0123abcd-run-{b}.parquet").write_bytes(b"PAR1\x00\x00torn")
    rows = run_table(c, JournalReader(journal_path(journals, c), c).read())
    _write_atomic(archive_dir, f"{part.relative_to(archive_dir)}/run-{c}.parquet", rows.table)
    assert Ledger(archive_dir).has_run(c) is False
    # the history reads the ledger's files only: the leftovers are not counted
    assert history(archive_dir, Query("p", "1d"))["summary"]["runs"] == 1

    rep = arch.sync()
    assert sorted(rep.archived) == [b] and rep.adopted_files == 1 and rep.removed_files == 1
    assert sorted(archived_rows(archive_dir)) == sorted(journal_rows(journals, [a, b, c]))
    assert not list(archive_dir.rglob(".tmp-*"))
    assert history(archive_dir, Query("p", "1d"))["summary"]["runs"] == 3

    files_before = sorted(p.name for p in archive_dir.rglob("*.parquet"))
    again = arch.sync()
    assert (again.archived, again.adopted_files, again.removed_files, again.already) == ([], 0, 0, 3)
    assert sorted(p.name for p in archive_dir.rglob("*.parquet")) == files_before

    # the ledger lost, then damaged: rebuilt from the files, nothing twice
    for suffix in ("", "-wal", "-shm"):
        (archive_dir / f"ledger.sqlite3{suffix}").unlink(missing_ok=True)
    assert arch.sync().adopted_files == len(files_before)
    assert sorted(archived_rows(archive_dir)) == sorted(journal_rows(journals, [a, b, c]))
    for suffix in ("-wal", "-shm"):
        (archive_dir / f"ledger.sqlite3{suffix}").unlink(missing_ok=True)
    (archive_dir / "ledger.sqlite3").write_bytes(b"this is not a database" * 100)
    arch.sync()
    assert list(archive_dir.glob("ledger.sqlite3.damaged-*"))
    assert sorted(archived_rows(archive_dir)) == sorted(journal_rows(journals, [a, b, c]))

    # a damaged Parquet file: set aside, its run archived again from the journal
    with Ledger(archive_dir) as ledger:
        name = next(f.name for f in ledger.files() if f.name.endswith(f"run-{a}.parquet"))
    (archive_dir / name).write_bytes((archive_dir / name).read_bytes()[:50])
    rep = arch.sync()
    assert rep.damaged_files == [name] and rep.archived == [a] and rep.lost_runs == []
    assert sorted(archived_rows(archive_dir)) == sorted(journal_rows(journals, [a, b, c]))


def test_a_writer_killed_mid_archive_leaves_no_partial_run(tmp_path: Path) -> None:
    """A real process archiving many runs, SIGKILLed at a random point: after a sync every run is in
    the archive exactly once."""
    journals, archive_dir = tmp_path / "events", tmp_path / "archive"
    journals.mkdir()
    ids = [ended_run(journals, items=("A", "B", "C")) for _ in range(80)]
    code = ("import sys; from pathlib import Path; from runwire_history.archive import Archive\n"
            "a = Archive(Path(sys.argv[1]), Path(sys.argv[2]))\n"
            "print('go', flush=True)\n"
            "for rid in sys.argv[3:]: a.archive_run(rid)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(archive_dir), str(journals), *ids],
                            stdout=subprocess.PIPE, env={**os.environ})
    assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
    deadline = time.monotonic() + 30
    while len(list(archive_dir.rglob("*.parquet"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    Archive(archive_dir, journals).sync()
    rows = archived_rows(archive_dir)
    assert len(rows) == len(set(rows)) and sorted(rows) == sorted(journal_rows(journals, ids))


def test_compaction_merges_a_partition_and_keeps_each_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journals, archive_dir = tmp_path / "events", tmp_path / "archive"
    journals.mkdir()
    arch = Archive(archive_dir, journals)
    ids = []
    for i in range(archive_mod.COMPACT_AT + 3):
        ids.append(ended_run(journals, outcome="failure" if i % 4 == 0 else "success"))
        arch.archive_run(ids[-1])
    with Ledger(archive_dir) as ledger:
        files = ledger.files()
    assert len(files) < archive_mod.COMPACT_AT and sum(f.runs for f in files) == len(ids)
    assert len(list(archive_dir.rglob("*.parquet"))) == len(files)  # superseded files removed
    assert sorted(archived_rows(archive_dir)) == sorted(journal_rows(journals, ids))
    s = history(archive_dir, Query("p", "1d"))["summary"]
    assert (s["runs"], s["failure"]) == (len(ids), 5)
    singles = {p: p.read_bytes() for p in archive_dir.rglob("run-*.parquet")}
    assert singles
    # once the day is over, the partition is merged into one file
    monkeypatch.setattr(archive_mod, "_today", lambda: "9999-12-31")
    arch.sync()
    with Ledger(archive_dir) as ledger:
        assert len(ledger.files()) == 1
    assert sorted(archived_rows(archive_dir)) == sorted(journal_rows(journals, ids))
    # a crash after the merge's commit, before the merged files were removed: they are leftovers
    for path, data in singles.items():
        path.write_bytes(data)
    assert arch.sync().removed_files == len(singles)
    assert not list(archive_dir.rglob("run-*.parquet"))
    # the same with the ledger lost too: the merged file wins, the single-run files are dropped
    for path, data in singles.items():
        path.write_bytes(data)
    for suffix in ("", "-wal", "-shm"):
        (archive_dir / f"ledger.sqlite3{suffix}").unlink(missing_ok=True)
    rep = arch.sync()
    assert (rep.adopted_files, rep.removed_files, rep.archived) == (1, len(singles), [])
    rows = archived_rows(archive_dir)
    assert len(rows) == len(set(rows)) and sorted(rows) == sorted(journal_rows(journals, ids))


def test_retention_archives_before_removing_and_keeps_what_it_cannot_archive(tmp_path: Path) -> None:
    journals, reports = tmp_path / "events", tmp_path / "reports"
    journals.mkdir()
    old = ended_run(journals)
    then = time.time() - 40 * 86400
    os.utime(journal_path(journals, old), (then, then))
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the archive directory should be")
    assert remove_expired(journals, reports, 30, time.time(), unarchived(Archive(blocked, journals))) == []
    assert journal_path(journals, old).exists()  # not archived: kept
    archive_dir = tmp_path / "archive"
    assert remove_expired(journals, reports, 30, time.time(), unarchived(Archive(archive_dir, journals))) == [old]
    assert not journal_path(journals, old).exists()
    assert history(archive_dir, Query("p", "365d"))["summary"]["runs"] == 1


async def test_history_route_answers_and_names_bad_parameters(tmp_path: Path) -> None:
    settings, _ = make_settings(tmp_path)
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.base + "/api/history?pipeline=sleepy") as resp:
            assert resp.status == 200
            body = await resp.json()
            assert body["summary"]["runs"] == 0 and body["since"] == "7d"
        cases = {
            "": "'pipeline'",
            "?since=7d": "'pipeline'",
            "?pipeline=nope": "'pipeline'",
            "?pipeline=sleepy&since=7x": "'since'",
            "?pipeline=sleepy&since=%EF%BC%97d": "'since'",  # a fullwidth digit
            "?pipeline=sleepy&since=0d": "'since'",
            "?pipeline=sleepy&since=99999999d": "'since'",
            "?pipeline=sleepy&stage=a%2Fb": "'stage'",
        }
        for query, named in cases.items():
            async with http.get(gw.base + "/api/history" + query) as resp:
                body = await resp.json()
                assert resp.status == 400, (query, body)
                assert named in body["error"]["message"], (query, body)
