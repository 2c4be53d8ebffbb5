"""The journal on real files: gapless seqs, torn and corrupt lines, a reader racing a writer, resume."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from shared.errors import InvalidRunId, JournalError, RunEnded
from shared.ids import new_run_id
from shared.journal import JournalReader, JournalWriter, begin_run, journal_path, list_run_ids, stats

TZ = ZoneInfo("America/Chicago")


def _queued(tmp_path: Path) -> str:
    rid = new_run_id()
    begin_run(tmp_path, rid, TZ, "p", {"x": 1}, {"trigger": "manual"})
    return rid


def test_seqs_are_gapless_and_terminal_is_last(tmp_path: Path) -> None:
    rid = _queued(tmp_path)
    with JournalWriter.open(tmp_path, rid, TZ) as w:
        w.append("pipeline", "start")
        for i in range(5):
            w.append("s", "log", f"line {i}")
        w.append("pipeline", "success", "done")
        with pytest.raises(RunEnded):
            w.append("s", "log", "after the end")
    events = JournalReader(journal_path(tmp_path, rid)).read()
    assert [e.seq for e in events] == list(range(1, 9))
    assert events[0].event == "queued" and events[0].data["params"] == {"x": 1}
    assert events[-1].is_terminal
    assert events[0].timestamp.endswith(("-06:00", "-05:00"))


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    rid = _queued(tmp_path)
    with JournalWriter.open(tmp_path, rid, TZ):
        with pytest.raises(JournalError, match="held by another writer"):
            JournalWriter.open(tmp_path, rid, TZ)
    with pytest.raises(JournalError, match="already exists"):
        begin_run(tmp_path, rid, TZ, "p", {}, {"trigger": "manual"})


def test_run_ids_are_checked_before_any_path_is_made(tmp_path: Path) -> None:
    for bad in ("../etc/passwd", "a/b", "", ".hidden", "x" * 200, "a b"):
        with pytest.raises(InvalidRunId):
            journal_path(tmp_path, bad)


def test_torn_last_line_is_repaired_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rid = _queued(tmp_path)
    with JournalWriter.open(tmp_path, rid, TZ) as w:
        w.append("pipeline", "start")
    path = journal_path(tmp_path, rid)
    with open(path, "ab") as f:
        f.write(b'{"run_id":"' + rid.encode() + b'","seq":3,"timest')  # a crash mid-write
    # a reader never returns the incomplete line
    assert [e.seq for e in JournalReader(path).read()] == [1, 2]
    before = stats.torn_lines_repaired
    with caplog.at_level(logging.WARNING), JournalWriter.open(tmp_path, rid, TZ) as w:
        assert w.last_seq == 2
        w.append("pipeline", "failure", "runner crashed")
    assert stats.torn_lines_repaired == before + 1
    assert "repaired a torn last line" in caplog.text and str(path) in caplog.text
    assert [e.seq for e in JournalReader(path).read()] == [1, 2, 3]
    assert path.read_bytes().endswith(b"\n")


def test_corrupt_line_in_the_middle_is_skipped_counted_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rid = _queued(tmp_path)
    path = journal_path(tmp_path, rid)
    with JournalWriter.open(tmp_path, rid, TZ) as w:
        w.append("pipeline", "start")
    with open(path, "ab") as f:
        f.write(b"this is not json\n")
    with JournalWriter.open(tmp_path, rid, TZ) as w:
        assert w.last_seq == 2
        w.append("s", "log", "after the bad line")
    before = stats.corrupt_lines_skipped
    with caplog.at_level(logging.WARNING):
        events = JournalReader(path).read()
    assert [e.seq for e in events] == [1, 2, 3]
    assert stats.corrupt_lines_skipped == before + 1
    assert f"journal {path}: skipped corrupt line at byte" in caplog.text


def test_line_of_another_run_is_corrupt(tmp_path: Path) -> None:
    rid, other = _queued(tmp_path), _queued(tmp_path)
    line = journal_path(tmp_path, other).read_bytes()
    with open(journal_path(tmp_path, rid), "ab") as f:
        f.write(line)
    assert [e.run_id for e in JournalReader(journal_path(tmp_path, rid)).read()] == [rid]


def test_resume_from_any_seq_in_a_long_journal(tmp_path: Path) -> None:
    rid = _queued(tmp_path)
    with JournalWriter.open(tmp_path, rid, TZ) as w:
        for i in range(50_000):
            w.append("s", "log", f"event {i}", {"i": i})
    reader = JournalReader(journal_path(tmp_path, rid))
    for after in (0, 1, 2, 1234, 25_000, 49_999, 50_000, 50_001, 60_000):
        got = reader.read(after_seq=after, limit=3)
        expected = [s for s in range(after + 1, min(after + 4, 50_002))]
        assert [e.seq for e in got] == expected, after


def test_resume_is_exact_past_foreign_and_overlong_lines(tmp_path: Path) -> None:
    """The bisect that finds a resume offset steps over lines that are not this run's events: a line of
    another run with a low seq (found by the fuzz suite: it sent the bisect past our seq 2), garbage, and
    a line longer than the bisect's 64 KiB window."""
    rid, other = _queued(tmp_path), _queued(tmp_path)
    with JournalWriter.open(tmp_path, other, TZ) as w:
        w.append("s", "log", "of another run")
    foreign = journal_path(tmp_path, other).read_bytes().splitlines(keepends=True)
    path = journal_path(tmp_path, rid)
    with JournalWriter.open(tmp_path, rid, TZ) as w:
        for i in range(1, 400):
            w.append("s", "log", f"event {i} " + "." * 2000)  # long lines of ours: the bisect mostly lands in one
            with open(path, "ab") as f:  # hostile lines between our events, never from our writer
                f.write(foreign[0] + (b"\x00garbage{{\n" + b"x" * 100_000 + b"\n" if i % 97 == 0 else b""))
    size = path.stat().st_size
    assert size > 4 * 64 * 1024  # big enough that the reader bisects
    reader = JournalReader(path)
    seqs = [e.seq for e in reader.read()]
    assert seqs == list(range(1, 401))
    for after in (1, 2, 97, 98, 99, 200, 291, 292, 399, 400):
        assert [e.seq for e in reader.read(after_seq=after, limit=3)] == seqs[after:after + 3], after


def test_reader_concurrent_with_writer_sees_each_event_once_in_order(tmp_path: Path) -> None:
    rid = _queued(tmp_path)
    n = 20_000
    done = threading.Event()

    def write() -> None:
        with JournalWriter.open(tmp_path, rid, TZ) as w:
            for i in range(n):
                w.append("s", "log", "x" * (i % 300))
            w.append("pipeline", "success")
        done.set()

    t = threading.Thread(target=write)
    t.start()
    reader = JournalReader(journal_path(tmp_path, rid))
    seen: list[int] = []
    offset = 0
    while True:
        finished = done.is_set()
        events, nxt = reader.read_chunk(offset, max_bytes=4096)
        seen.extend(e.seq for e in events)
        offset = nxt
        if finished and not events:
            break
    t.join()
    assert seen == list(range(1, n + 3))


def test_fsync_group_commit(tmp_path: Path) -> None:
    import anyio

    rid = _queued(tmp_path)

    async def main() -> None:
        w = JournalWriter.open(tmp_path, rid, TZ, durability="fsync", group_commit_ms=2)
        try:
            evs = [w.append("s", "log", str(i)) for i in range(100)]
            async with anyio.create_task_group() as tg:
                for ev in evs:
                    tg.start_soon(w.wait_durable, ev.seq)
            assert w._synced_seq == 101
        finally:
            w.close()

    anyio.run(main)


def test_list_run_ids_is_sorted_and_ignores_other_files(tmp_path: Path) -> None:
    ids = [_queued(tmp_path) for _ in range(3)]
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "pipeline_bad name.jsonl").write_text("x")
    assert list_run_ids(tmp_path) == sorted(ids)
