"""The journal's batch path (`JournalWriter.append_many`, `RunJournal.emit_many`): gapless seqs in one
write, all or nothing, whole lines for a concurrent reader, and a batch that meets a fence neither
kept nor published. Real files, a real fence (shared/fence.py), a real PUB socket and SUB on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import msgspec
import pytest
import zmq

from runner_svc.publish import Publisher, RunJournal
from shared.errors import JournalError, JournalFenced, RunEnded
from shared.events import json_decoder, msgpack_decoder
from shared.fence import fenced_writer
from shared.journal import JournalWriter, journal_path, read_events
from shared.wire import Heartbeat

UTC = ZoneInfo("UTC")
RUN = "batch-run"


def writes_so_far() -> int:
    """write(2) calls of this process so far (Linux /proc/self/io `syscw`)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


def new_writer(tmp_path: Path, durability: str = "flush") -> JournalWriter:
    w = JournalWriter.create(tmp_path / "events", RUN, UTC, durability=durability)  # type: ignore[arg-type]
    w.append("pipeline", "queued", "queued by the test")
    return w


def metrics(n: int, start: int = 0) -> list[tuple[str, str, str, dict]]:
    return [("load", "metric", "tick", {"i": i}) for i in range(start, start + n)]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts write(2) calls with /proc/self/io")
def test_a_batch_is_gapless_and_one_write(tmp_path: Path) -> None:
    with new_writer(tmp_path) as w:
        before = writes_so_far()
        for i in range(3):
            w.append("load", "metric", "single", {"i": i})
        assert writes_so_far() - before == 3  # the measure sees each write

        before = writes_so_far()
        events = w.append_many(metrics(1000))
        assert writes_so_far() - before == 1
        assert [e.seq for e in events] == list(range(5, 1005))
        assert len({e.timestamp for e in events}) == 1  # journaled at one instant
        assert w.last_seq == 1004
        assert w.append("load", "log", "after").seq == 1005
    on_disk = read_events(tmp_path / "events", RUN)
    assert [e.seq for e in on_disk] == list(range(1, 1006))
    assert [e.data["i"] for e in on_disk[4:1004]] == list(range(1000))
    assert on_disk[4:1004] == events


def test_a_refused_draft_writes_none_of_its_batch(tmp_path: Path) -> None:
    with new_writer(tmp_path) as w:
        path = journal_path(tmp_path / "events", RUN)
        size = path.stat().st_size
        with pytest.raises(JournalError, match="invalid stage name 'bad/name'"):
            w.append_many([*metrics(5), ("bad/name", "log", "x", None), *metrics(5, 5)])
        with pytest.raises(JournalError, match="cannot be encoded: .*; none of its batch of 3 appended"):
            w.append_many([*metrics(1), ("load", "metric", "x", {"o": object()}), *metrics(1, 1)])
        with pytest.raises(RunEnded, match="follows the terminal event"):
            w.append_many([("pipeline", "success", "done", None), *metrics(2)])
        assert path.stat().st_size == size and w.last_seq == 1 and not w.ended
        assert w.append_many([]) == []
        w.append_many([*metrics(2), ("pipeline", "success", "done", None)])
        assert w.ended and w.last_seq == 4
        with pytest.raises(RunEnded):
            w.append_many(metrics(1))
    assert [e.seq for e in read_events(tmp_path / "events", RUN)] == [1, 2, 3, 4]


def test_a_concurrent_reader_sees_whole_lines_and_no_gap(tmp_path: Path) -> None:
    """A reader racing the writer (raw bytes, as any tool would read them): every line up to the last
    newline is a whole event and the seqs run without a gap; only the bytes after the last newline may
    be a line still being written. (A batch larger than a page may become visible in parts: the kernel
    grows the file page by page; a reader never needs more than whole lines.)"""
    batches, size = 200, 300
    with new_writer(tmp_path) as w:
        path = journal_path(tmp_path / "events", RUN)
        done = threading.Event()
        seen: list[int] = []
        errors: list[str] = []

        def read_all() -> None:
            while True:
                finished = done.is_set()
                data = path.read_bytes()
                complete = data[: data.rfind(b"\n") + 1]
                seqs = []
                for line in complete.splitlines():
                    try:
                        seqs.append(json_decoder.decode(line).seq)
                    except msgspec.DecodeError as e:
                        errors.append(f"torn line {line[:80]!r}: {e}")
                        return
                if seqs != list(range(1, len(seqs) + 1)):
                    errors.append(f"a gap: {len(seqs)} lines, last seq {seqs[-1]}")
                    return
                seen.append(len(seqs))
                if finished:
                    return

        reader = threading.Thread(target=read_all)
        reader.start()
        try:
            pad = "x" * 40
            for b in range(batches):
                w.append_many([("load", "metric", pad, {"i": b * size + i}) for i in range(size)])
        finally:
            done.set()
            reader.join(30)
    assert not errors, errors
    assert len(seen) > 1 and seen == sorted(seen)
    assert seen[-1] == 1 + batches * size


# ------------------------------------------------------------------- publication: RunJournal.emit_many


class Wire:
    """A real PUB socket (the runner's Publisher) and a SUB connected to it, on loopback."""

    def __init__(self) -> None:
        self.ctx: zmq.Context = zmq.Context()
        self.publisher = Publisher.bind(self.ctx, "tcp://127.0.0.1:0", send_hwm=1_000_000)
        endpoint = self.publisher.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        self._connect()

    def _marker(self, n: int) -> Heartbeat:
        return Heartbeat(runner_id=f"marker-{n}", timestamp="", journal_dir="", config_path="")

    def _connect(self) -> None:
        """PUB drops until the subscription arrives: send markers until one comes through."""
        end = time.monotonic() + 10
        while time.monotonic() < end:
            self.publisher.publish_heartbeat(self._marker(0))
            if self.sub.poll(50):
                while self.sub.poll(50):
                    self.sub.recv_multipart()
                return
        raise AssertionError("the SUB never connected")

    def received(self) -> list[tuple[bytes, dict]]:
        """Every event message up to a marker sent now (PUB keeps order per subscriber)."""
        self.publisher.publish_heartbeat(self._marker(1))
        got = []
        while True:
            assert self.sub.poll(10_000), "the marker never arrived"
            topic, payload = self.sub.recv_multipart()
            if topic == b"hb/marker-1":
                return got
            got.append((topic, msgspec.to_builtins(msgpack_decoder.decode(payload))))

    def close(self) -> None:
        self.sub.close(linger=0)
        self.publisher.close()
        self.ctx.term()


@pytest.fixture
def wire() -> Wire:
    w = Wire()
    yield w  # type: ignore[misc]
    w.close()


async def test_a_batch_is_published_whole_in_seq_order_after_its_write(tmp_path: Path, wire: Wire) -> None:
    journal = RunJournal(new_writer(tmp_path), wire.publisher)
    try:
        events = await journal.emit_many(metrics(500))
        assert [e.seq for e in events] == list(range(2, 502)) and journal.published_seq == 501
        got = wire.received()
        assert [p["seq"] for _, p in got] == list(range(2, 502))
        assert [p["data"]["i"] for _, p in got] == list(range(500))
        assert {t for t, _ in got} == {f"ev/{RUN}/load/metric".encode()}
        assert [msgspec.to_builtins(e) for e in read_events(tmp_path / "events", RUN)[1:]] == [p for _, p in got]
    finally:
        journal.close()


async def test_batches_in_fsync_mode_are_published_in_seq_order(tmp_path: Path, wire: Wire) -> None:
    journal = RunJournal(new_writer(tmp_path, durability="fsync"), wire.publisher)
    try:
        async with anyio.create_task_group() as tg:
            for b in range(4):
                tg.start_soon(journal.emit_many, metrics(100, b * 100))
        assert journal.published_seq == 401
        assert [p["seq"] for _, p in wire.received()] == list(range(2, 402))
    finally:
        journal.close()


async def test_a_fenced_batch_is_neither_published_nor_acknowledged(tmp_path: Path, wire: Wire) -> None:
    journal_dir = tmp_path / "events"
    journal = RunJournal(new_writer(tmp_path), wire.publisher)
    why: list[str] = []
    journal.on_fenced = why.append
    try:
        kept = await journal.emit_many(metrics(10))
        assert [e.seq for e in kept] == list(range(2, 12))
        # the scheduler fences the runner off (as for a runner it declared lost) and, in the window
        # before it writes the run's end, the fenced runner writes a batch
        with fenced_writer(journal_dir, RUN, UTC) as fencer:
            late = await journal.emit_many(metrics(50, 10))
            assert late == []  # not acknowledged: the caller learns that nothing of it exists
            fencer.append("pipeline", "failure", "runner lost")
        assert why and "fenced" in why[0] and journal.fenced and journal.released
        assert journal.published_seq == 11  # what heartbeats report: the batch is not there
        assert await journal.emit("load", "log", "after the fence") is None
        got = wire.received()
        assert [p["seq"] for _, p in got] == list(range(2, 12))  # none of the fenced batch
        on_disk = read_events(journal_dir, RUN)
        assert [(e.seq, e.event) for e in on_disk[-2:]] == [(11, "metric"), (12, "failure")]
        assert all(e.data is None or e.data.get("i", 0) < 10 for e in on_disk)
        with pytest.raises(JournalFenced):
            journal.writer.append_many(metrics(1))
    finally:
        journal.close()
