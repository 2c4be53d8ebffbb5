"""Clean journal blocks (gateway_svc.cleanblocks): which blocks count as clean, the bounded memory of
them, and the Learner, which makes them from what the hub delivers: a run followed live from seq 1 is
replayed from its lines as they are, from its first replay on; a line the hub never saw (a torn one)
makes the guess wrong, which the digest catches, and the replay is exact all the same."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import aiohttp
import anyio
import msgspec
import pytest

from gateway_svc.batch import batch_of
from gateway_svc.cleanblocks import CleanBlocks, Learner, check
from gateway_svc.keys import HUB
from gateway_svc.runsource import REPLAY_CHUNK, JournalSource
from shared.events import Event
from shared.journal import JournalReader, read_events
from tests.test_gateway_helpers import FakePublisher, collect, journal_of, make_settings, running_gateway
from tests.test_replay_pieces import _events, _long_run, _stream


def _decoded(block: bytes) -> list[Event]:
    return msgspec.json.Decoder(Event).decode_lines(block)


def test_a_block_is_clean_only_if_its_lines_are_what_the_gateway_would_send(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 20)
    block = path.read_bytes()
    assert check(block, 0, _decoded(block)) is not None
    ends = block.split(b"\n")

    def variant(i: int, line: bytes) -> bytes:
        lines = list(ends)
        lines[i] = line
        return b"\n".join(lines)

    spaced = variant(3, ends[3].replace(b'","', b'", "'))  # valid JSON, not as msgspec writes it
    unknown = variant(3, ends[3][:-1] + b',"extra":1}')  # a field the schema does not know (ignored on decode)
    gap = variant(3, ends[3].replace(b'"seq":4,', b'"seq":40,'))
    end_inside = variant(3, msgspec.json.encode(Event(run_id, 4, "2026-12-04T00:00:00.000000+00:00", "pipeline", "failure")))
    blank = block.replace(b"\n", b"\n\n", 1)
    for bad in (spaced, unknown, gap, end_inside, blank):
        assert check(bad, 0, _decoded(bad)) is None
    foreign = variant(3, ends[3].replace(run_id.encode(), b"run-of-someone-else"))
    events = JournalReader(path, run_id).decode(foreign, 0)  # the foreign line skipped
    assert check(foreign, 0, events) is None


def test_the_memory_of_clean_blocks_is_bounded_least_recently_used_run_first(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 10)
    block = path.read_bytes()
    known = check(block, 0, _decoded(block))
    assert known is not None
    clean = CleanBlocks(max_blocks=2)
    clean.add("a", known)
    clean.add("b", known)
    assert clean.find("a", 0) == known  # a is now the most recently used
    clean.add("c", known)
    assert clean.find("b", 0) is None and clean.find("a", 0) == known and clean.find("c", 0) == known
    assert len(clean) == 2
    clean.add("c", known._replace(offset=known.length))  # a and c fill the memory: a goes
    assert clean.find("a", 0) is None and clean.find("c", known.length) is not None and len(clean) == 2
    clean.add("c", known._replace(offset=2 * known.length))  # one run filling the memory alone: not added
    assert clean.find("c", 2 * known.length) is None and len(clean) == 2
    assert clean.find("c", known.length - 1) == known  # inside the block, not past it
    clean.add("d", known._replace(offset=1))  # overlapping blocks of one run: the first one stays
    clean.add("d", known)
    assert clean.find("d", 1) == known._replace(offset=1) and clean.find("d", 0) is None


async def publish_long_run(pub: FakePublisher, n: int) -> str:
    """A run of n log lines journaled and published (journal, then PUB), paced so the hub keeps up."""
    run_id = pub.begin()
    pub.emit(run_id, "pipeline", "start", "s")
    for i in range(n):
        pub.emit(run_id, "nap", "log", f"line {i}", {"i": i, "pad": "p" * 50})
        if i % 100 == 0:
            await anyio.sleep(0.001)
    pub.emit(run_id, "pipeline", "success", "done")
    return run_id


def _deliver(learner: Learner, events: list[Event], rng: random.Random) -> None:
    """Hand the events to the learner in batches of random sizes, as the fan-out would."""
    i = 0
    while i < len(events):
        n = rng.choice([1, 1, 3, 17, 200, 5_000])
        learner.feed(batch_of(events[i:i + n]))
        i += n


async def test_a_run_delivered_from_seq_1_is_learned_and_replayed_from_its_lines_as_they_are(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 4_000)
    events = read_events(tmp_path, run_id)
    clean = CleanBlocks()
    learner = Learner(clean, REPLAY_CHUNK)
    _deliver(learner, events, random.Random(3))
    blocks = len(clean)
    assert blocks >= 4 and len(learner) == 0  # the run ended: nothing left being learned
    cold = await _stream(path, run_id, CleanBlocks(), 0, len(events))
    warm = await _stream(path, run_id, clean, 0, len(events))
    assert _events(warm[0]) == _events(cold[0]) and warm[1:] == cold[1:] and warm[2]
    assert clean.hits == blocks and clean.changed == 0  # every block sent without decoding
    resumed = await _stream(path, run_id, clean, 1_234, len(events))
    assert _events(resumed[0]) == _events((await _stream(path, run_id, CleanBlocks(), 1_234, len(events)))[0])


async def test_a_line_the_hub_never_saw_moves_the_places_learned_and_the_replay_stays_exact(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_id, path = _long_run(tmp_path, 4_000)
    lines = path.read_bytes().split(b"\n")
    lines.insert(1_000, b'{"run_id":"' + run_id.encode() + b'","seq":10')  # a torn line, repaired by a newline
    path.write_bytes(b"\n".join(lines))
    events = read_events(tmp_path, run_id)
    assert len(events) == 4_002
    clean = CleanBlocks()
    _deliver(Learner(clean, REPLAY_CHUNK), events, random.Random(5))
    with caplog.at_level(logging.INFO, logger="gateway_svc.cleanblocks"):
        warm = await _stream(path, run_id, clean, 0, len(events))
    cold = await _stream(path, run_id, CleanBlocks(), 0, len(events))
    assert _events(warm[0]) == _events(cold[0]) and warm[1:] == cold[1:] == ([], True)
    assert clean.hits >= 1 and clean.changed == 1  # the blocks before the torn line, then the miss
    said = [r for r in caplog.records if r.name == "gateway_svc.cleanblocks"]
    assert len(said) == 1 and said[0].levelno == logging.INFO and "does not hold" in said[0].getMessage()


def test_nothing_is_learned_of_a_run_followed_from_its_middle_or_past_a_hole(tmp_path: Path) -> None:
    run_id, _ = _long_run(tmp_path, 3_000)
    events = read_events(tmp_path, run_id)
    clean = CleanBlocks()
    learner = Learner(clean, REPLAY_CHUNK)
    learner.feed(batch_of(events[500:]))  # the gateway started while the run was under way
    assert len(clean) == 0
    clean2 = CleanBlocks()
    learner2 = Learner(clean2, REPLAY_CHUNK)
    learner2.feed(batch_of(events[:1_500]))
    before = len(clean2)
    learner2.feed(batch_of(events[1_501:]))  # seq 1,502 next: 1,501 was never delivered
    assert len(clean2) == before and len(learner2) == 0
    assert all(b.first_seq + b.n - 1 <= 1_500 for b in (clean2.find(run_id, o) for o in range(0, 200_000, 1000)) if b)


async def test_a_gateway_replays_a_run_it_followed_live_without_decoding_it(tmp_path: Path) -> None:
    """Real gateway, real sockets: a run journaled and published (FakePublisher: journal, then PUB) is
    followed by the hub from its `queued`; its first replay sends every block as it is, counted in
    /metrics, and is the journal exactly, from seq 0 and from the middle."""
    settings, ports = make_settings(tmp_path)
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            run_id = await publish_long_run(pub, 5_000)
            journal = journal_of(settings, run_id)
            source = gw.app[HUB].source
            assert isinstance(source, JournalSource)
            with anyio.fail_after(20):
                while source.clean.find(run_id, source.path(run_id).stat().st_size - 1) is None:
                    await anyio.sleep(0.05)  # the run's last block is learned when the hub delivers its end
            blocks = len(source.clean)
            assert blocks >= 4
            got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=0")
            assert got.events == journal and got.close_code == 1000
            assert source.clean.hits == blocks and source.clean.changed == 0
            got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=2345")
            assert got.events == journal[2_345:]
            async with http.get(f"{gw.base}/metrics") as resp:
                text = await resp.text()
            sent = [ln for ln in text.splitlines() if ln.startswith("runwire_gateway_replay_blocks_sent_as_they_are")]
            assert sent and float(sent[0].split()[-1]) >= blocks + 1
    finally:
        pub.close()



async def test_a_journal_removed_after_its_blocks_were_remembered_is_said_gone_not_changed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_id, path = _long_run(tmp_path, 2_000)
    clean = CleanBlocks()
    await _stream(path, run_id, clean, 0, 2_002)
    assert len(clean) >= 2
    path.unlink()  # retention, or by hand
    with caplog.at_level(logging.INFO, logger="gateway_svc.cleanblocks"):
        frames, holes, terminal = await _stream(path, run_id, clean, 0, 2_002)
    assert frames == [] and holes == [(1, 2_002)] and not terminal  # nothing from memory: a hole, said
    said = [r for r in caplog.records if r.name == "gateway_svc.cleanblocks"]
    assert len(said) == 1 and said[0].levelno == logging.INFO and "is gone" in said[0].getMessage()
    assert len(clean) == 0


async def test_runs_delivered_in_the_same_batches_are_each_learned_from_their_own_lines(tmp_path: Path) -> None:
    (a, path_a), (b, path_b) = _long_run(tmp_path, 3_000), _long_run(tmp_path, 2_000)
    ev_a, ev_b = read_events(tmp_path, a), read_events(tmp_path, b)
    clean = CleanBlocks()
    learner = Learner(clean, REPLAY_CHUNK)
    rng = random.Random(11)
    i = j = 0
    while i < len(ev_a) or j < len(ev_b):  # batches holding some of each run, as the fan-out makes them
        n, m = rng.choice([0, 1, 40, 300]), rng.choice([0, 1, 40, 300])
        part_a, part_b = ev_a[i:i + n], ev_b[j:j + m]
        i, j = i + n, j + m
        mixed = []
        while part_a or part_b:  # the runs interleaved in the batch, each in its own order
            side = part_a if part_a and (not part_b or rng.random() < 0.5) else part_b
            mixed.append(side.pop(0))
        if mixed:
            learner.feed(batch_of(mixed))
    assert len(learner) == 0
    for run_id, path, events in ((a, path_a, ev_a), (b, path_b, ev_b)):
        before = clean.hits
        warm = await _stream(path, run_id, clean, 0, len(events))
        cold = await _stream(path, run_id, CleanBlocks(), 0, len(events))
        assert _events(warm[0]) == _events(cold[0]) and warm[1:] == cold[1:]
        assert clean.hits > before and clean.changed == 0  # its blocks were sent as they are
