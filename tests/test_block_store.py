"""Clean journal blocks kept across gateway restarts (gateway_svc.blockstore): the file format and what
a torn, damaged or foreign file costs (a decode, said, never a wrong frame), and a real gateway that,
restarted, replays a run it followed before without decoding it, forgets what a changed or removed
journal held, and stays exact."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import aiohttp
import anyio
import pytest

from gateway_svc.blockstore import HEADER, PERSIST_MIN, RECORD, BlockStore, encode
from gateway_svc.cleanblocks import CleanBlock, CleanBlocks, Learner
from gateway_svc.hub import BLOCKS_DIR
from gateway_svc.keys import HUB
from gateway_svc.runsource import REPLAY_CHUNK, JournalSource
from shared.journal import read_events
from tests.test_clean_blocks import _deliver, publish_long_run
from tests.test_gateway_helpers import FakePublisher, collect, journal_of, make_settings, running_gateway
from tests.test_replay_pieces import _events, _long_run, _stream


def _block(i: int, length: int = PERSIST_MIN) -> CleanBlock:
    return CleanBlock(i * length, length, 1 + 100 * i, 100, i % 7 == 6, bytes([i % 256]) * 32, i % 2 == 0)


def test_blocks_are_kept_and_loaded_as_they_were(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    blocks = [_block(i) for i in range(50)]
    store.append("r1", blocks[:1])  # makes the file
    store.append("r1", blocks[1:])
    store.append("r1", [_block(99, PERSIST_MIN - 1)])  # too small to be worth keeping
    assert store.load("r1") == blocks and store.load("r2") == [] and store.errors == 0
    assert store.path("r1").read_bytes().startswith(HEADER)


def test_threads_appending_to_a_new_file_make_one_header_and_lose_no_record(tmp_path: Path) -> None:
    for attempt in range(20):
        store = BlockStore(tmp_path / f"blocks{attempt}")
        go = threading.Barrier(4)

        def write(t: int, store: BlockStore = store, go: threading.Barrier = go) -> None:
            go.wait()
            for i in range(25):
                store.append("r", [_block(t * 25 + i)])

        threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(store.load("r")) == sorted(_block(i) for i in range(100))
        assert [p.name for p in store.directory.iterdir()] == ["r.blocks"]  # nothing left aside


def test_a_torn_damaged_or_foreign_file_is_skipped_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = BlockStore(tmp_path)
    blocks = [_block(i) for i in range(5)]
    store.append("r", blocks)
    data = bytearray(store.path("r").read_bytes())
    with caplog.at_level(logging.INFO, logger="gateway_svc.blockstore"):
        store.path("r").write_bytes(bytes(data) + encode(_block(5))[:20])  # a writer killed mid-record
        assert store.load("r") == blocks
        assert "torn record (20 bytes)" in caplog.text
        data[len(HEADER) + 2 * RECORD.size + 9] ^= 0x40  # a flipped bit in the third record's fields
        store.path("r").write_bytes(bytes(data))
        assert store.load("r") == blocks[:2] + blocks[3:]
        assert "1 of 5 record(s) damaged" in caplog.text
        store.path("r").write_bytes(b'{"not": "ours"}\n' + bytes(data))
        assert store.load("r") == []
        assert "does not start with" in caplog.text
        for garbage in (b"", HEADER[:5], random.Random(1).randbytes(10_000)):
            store.path("r").write_bytes(garbage)
            assert store.load("r") == []


def test_pruning_removes_the_files_of_runs_that_are_gone_and_leaves_others_alone(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    for run_id in ("kept", "gone"):
        store.append(run_id, [_block(1)])
    (tmp_path / "notes.txt").write_text("someone's")
    (tmp_path / ".gone.blocks.123.456").write_bytes(HEADER)  # written aside by a process killed before the link
    assert store.prune({"kept"}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.blocks", "notes.txt"]


def test_a_store_that_cannot_be_written_costs_decodes_is_said_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = BlockStore(tmp_path / "file" / "blocks")
    with caplog.at_level(logging.WARNING, logger="gateway_svc.blockstore"):
        store.append("r", [_block(1)])
        store.append("r", [_block(2)])
    assert store.errors == 2 and store.load("r") == []
    said = [r for r in caplog.records if r.name == "gateway_svc.blockstore"]
    assert len(said) == 1 and "cannot append" in said[0].getMessage()  # once, then at most once a minute


async def test_blocks_learned_before_a_restart_are_sent_as_they_are_after_it(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 4_000)
    events = read_events(tmp_path, run_id)
    before = CleanBlocks(store=BlockStore(tmp_path / "blocks"))
    _deliver(Learner(before, REPLAY_CHUNK), events, random.Random(7))
    kept = sum(1 for b in before.store.load(run_id) if b.length >= PERSIST_MIN) if before.store else 0
    assert kept >= 4
    after = CleanBlocks(store=BlockStore(tmp_path / "blocks"))  # a new process: nothing in memory
    warm = await _stream(path, run_id, after, 0, len(events))
    cold = await _stream(path, run_id, CleanBlocks(), 0, len(events))
    assert _events(warm[0]) == _events(cold[0]) and warm[1:] == cold[1:]
    assert after.loaded == kept and after.hits == kept and after.changed == 0


async def test_blocks_a_replay_checked_are_kept_and_a_changed_journal_is_said_and_forgotten(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_id, path = _long_run(tmp_path, 4_000)
    store_dir = tmp_path / "blocks"
    first = CleanBlocks(store=BlockStore(store_dir))
    cold = await _stream(path, run_id, first, 0, 4_002)
    assert first.hits == 0 and len(first) >= 4
    data = path.read_bytes()
    path.write_bytes(data.replace(b"line 10\"", b"LINE 10\"", 1))  # edited while the gateway was down
    second = CleanBlocks(store=BlockStore(store_dir))
    with caplog.at_level(logging.INFO, logger="gateway_svc.cleanblocks"):
        edited = await _stream(path, run_id, second, 0, 4_002)
    assert b"LINE 10" in _events(edited[0]) and edited[1:] == cold[1:]
    assert second.changed == 1 and second.hits == 0
    assert "changed at bytes 0-" in caplog.text
    third = CleanBlocks(store=BlockStore(store_dir))  # what the edit made stale is gone; the new reads are kept
    again = await _stream(path, run_id, third, 0, 4_002)
    assert _events(again[0]) == _events(edited[0]) and third.changed == 0 and third.hits == third.loaded >= 4


async def test_a_restarted_gateway_replays_a_run_it_followed_before_without_decoding_it(tmp_path: Path) -> None:
    """Real gateways, real sockets: a run followed live is learned and kept; a second gateway on the
    same home replays it from what was kept (counted in /metrics), exactly; a journal removed while
    no gateway ran takes its kept blocks with it at the next start."""
    settings, ports = make_settings(tmp_path)
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    store_dir = settings.state_dir / BLOCKS_DIR
    try:
        async with running_gateway(settings) as gw:
            run_ids = [await publish_long_run(pub, 4_000) for _ in range(2)]
            source = gw.app[HUB].source
            assert isinstance(source, JournalSource)
            with anyio.fail_after(20):
                while not all(source.clean.find(r, source.path(r).stat().st_size - 1) for r in run_ids):
                    await anyio.sleep(0.05)
        run_id, removed = run_ids
        assert (store_dir / f"{run_id}.blocks").exists() and (store_dir / f"{removed}.blocks").exists()
        journal_of(settings, removed)
        source.path(removed).unlink()
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            assert not (store_dir / f"{removed}.blocks").exists()
            got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=0")
            assert got.events == journal_of(settings, run_id) and got.close_code == 1000
            clean = gw.app[HUB].source.clean
            assert clean.loaded >= 3 and clean.hits == clean.loaded and clean.changed == 0
            async with http.get(f"{gw.base}/metrics") as resp:
                text = await resp.text()
            loaded = [ln for ln in text.splitlines() if ln.startswith("runwire_gateway_replay_blocks_loaded")]
            assert loaded and float(loaded[0].split()[-1]) == clean.loaded
    finally:
        pub.close()
