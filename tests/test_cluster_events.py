"""The event stream on a real 3-node JetStream cluster: each event exactly once and in order, retries
deduplicated, stale writers fenced, and a kill -9 of the stream's leader mid-append loses nothing."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from runwire_cluster.events import EventStream, chunk_msg_id, chunk_range, decode_chunk, run_subject
from shared.config import ClusterConfig
from shared.errors import JournalError, JournalFenced
from shared.events import Event, event_to_json_line
from tests.cluster_fixtures import NatsCluster, nats_cluster  # noqa: F401  (the fixture)

_runs = itertools.count(1)


def new_run_id(tag: str) -> str:
    return f"20260101T000000Z-{tag}.{next(_runs)}"  # a dot too: it must survive the subject mapping


def make_events(run_id: str, first: int, count: int) -> list[Event]:
    return [Event(run_id=run_id, seq=s, timestamp="2026-01-01T00:00:00.000000+00:00", stage="extract",
                  event="log", msg=f"line {s} " + "x" * (s % 50)) for s in range(first, first + count)]


@asynccontextmanager
async def event_stream(cluster: NatsCluster) -> AsyncIterator[EventStream]:
    cfg = ClusterConfig(nats=cluster.urls, state="postgresql://unused/db", stream_max_age="1h", stream_replicas=3)
    async with await EventStream.connect(cfg) as stream:
        await stream.ensure()
        yield stream


def test_subjects_and_chunks() -> None:
    assert run_subject("a..b-c") == "runwire.ev.a~~b-c"
    assert chunk_msg_id("r.1", 1, 100) == "r.1:1-100"
    evs = make_events("r", 1, 3)
    assert decode_chunk("r", b"".join(event_to_json_line(e) for e in evs)) == evs
    with pytest.raises(JournalError, match="not the next event"):
        decode_chunk("r", b"".join(event_to_json_line(e) for e in [evs[0], evs[2]]))
    with pytest.raises(JournalError, match="not an event"):
        decode_chunk("r", b'{"run_id": "r"}\n')


@pytest.mark.timeout(180)
async def test_100k_events_in_chunks_are_read_back_exactly_once(nats_cluster: NatsCluster) -> None:  # noqa: F811
    run_id = new_run_id("bulk")
    events = make_events(run_id, 1, 100_000)
    async with event_stream(nats_cluster) as stream:
        w = await stream.writer(run_id, new=True)
        for i in range(0, len(events), 100):
            await w.append(events[i:i + 100])
        assert w.last_seq == 100_000
        back = await stream.read(run_id)
        assert len(back) == len(events) and back == events
        # after a seq in the middle of a chunk: exactly the rest
        assert await stream.read(run_id, after_seq=50_050) == events[50_050:]
        assert await stream.read(run_id, after_seq=100_000) == []
        # a writer that resumes (a restarted runner) knows where the run is
        again = await stream.writer(run_id)
        assert (again.fence, again.last_seq) == (w.fence, 100_000)


async def test_a_retried_chunk_is_not_duplicated(nats_cluster: NatsCluster) -> None:  # noqa: F811
    run_id = new_run_id("retry")
    events = make_events(run_id, 1, 30)
    async with event_stream(nats_cluster) as stream:
        w = await stream.writer(run_id, new=True)
        await w.append(events[:10])
        # the same chunk again, from where the writer stood before it (its ack was "lost")
        retry = await stream.writer(run_id, new=True)
        await retry.append(events[:10])
        assert retry.duplicates == 1 and retry.fence == w.fence
        await w.append(events[10:30])
        assert await stream.read(run_id) == events
        with pytest.raises(JournalError, match="must be consecutive"):
            await w.append(make_events(run_id, 35, 2))


async def test_a_stale_writer_is_fenced(nats_cluster: NatsCluster) -> None:  # noqa: F811
    run_id = new_run_id("fence")
    events = make_events(run_id, 1, 10)
    async with event_stream(nats_cluster) as stream:
        runner = await stream.writer(run_id, new=True)
        await runner.append(events)
        # the scheduler declares the runner lost and ends the run through the fence
        scheduler = await stream.writer(run_id)
        end = Event(run_id=run_id, seq=11, timestamp="2026-01-01T00:00:01.000000+00:00", stage="pipeline",
                    event="failure", msg="runner lost")
        await scheduler.append([end])
        late = make_events(run_id, 11, 5)
        with pytest.raises(JournalFenced, match=f"run {run_id}: another writer appended"):
            await runner.append(late)
        with pytest.raises(JournalFenced):
            await (await stream.writer(run_id, new=True)).append(make_events(run_id, 1, 1))
        assert await stream.read(run_id) == [*events, end]


async def test_writers_with_distinct_ids_are_fenced_even_on_the_same_seqs(nats_cluster: NatsCluster) -> None:  # noqa: F811
    """The server drops a message whose id it has seen before checking the fence: a runner's chunk of
    exactly the seqs the scheduler just wrote must not pass as a duplicate of it."""
    run_id = new_run_id("ids")
    events = make_events(run_id, 1, 3)
    async with event_stream(nats_cluster) as stream:
        runner = await stream.writer(run_id, new=True, writer_id="runner.r1")
        await runner.append(events)
        scheduler = await stream.writer(run_id, writer_id="scheduler.s1")
        end = Event(run_id=run_id, seq=4, timestamp="2026-01-01T00:00:01.000000+00:00", stage="pipeline",
                    event="failure", msg="runner lost")
        await scheduler.append([end])
        with pytest.raises(JournalFenced):
            await runner.append(make_events(run_id, 4, 1))  # the same seq 4: another id, so fenced
        assert runner.duplicates == 0
        assert await stream.read(run_id) == [*events, end]
        # the runner's own retry (the same writer id) is still a duplicate, not a fence
        again = await stream.writer(run_id, new=True, writer_id="runner.r1")
        await again.append(events)
        assert again.duplicates == 1
    assert chunk_range(chunk_msg_id(run_id, 4, 9, "runner.r1")) == (4, 9)
    assert chunk_range("r.1:1-100") == (1, 100)
    with pytest.raises(ValueError, match="writer id"):
        await EventStream.writer(stream, run_id, new=True, writer_id="a@b")


@pytest.mark.timeout(180)
async def test_kill_9_of_the_stream_leader_during_appends_loses_and_duplicates_nothing(
        nats_cluster: NatsCluster) -> None:  # noqa: F811
    run_id = new_run_id("leader")
    events = make_events(run_id, 1, 20_000)
    async with event_stream(nats_cluster) as stream:
        w = await stream.writer(run_id, new=True, retry_for=60.0)
        seq_at_kill = 0

        async def append_all() -> None:
            for i in range(0, len(events), 100):
                await w.append(events[i:i + 100])
                await anyio.sleep(0.002)  # spread the appends over the kill

        async def kill_leader() -> None:
            nonlocal seq_at_kill
            while w.last_seq < 3_000:
                await anyio.sleep(0.01)
            info = await stream.js.stream_info(stream.name)
            assert info.cluster is not None and info.cluster.leader
            leader = nats_cluster.node(info.cluster.leader)
            seq_at_kill = w.last_seq
            leader.kill9()
            await anyio.sleep(2.0)
            leader.start()

        async with anyio.create_task_group() as tg:
            tg.start_soon(append_all)
            tg.start_soon(kill_leader)
        assert 3_000 <= seq_at_kill < 20_000  # the leader died while appends were going on
        assert w.retries >= 1  # appends paused (no leader) and went on
        assert w.last_seq == 20_000
        back = await stream.read(run_id)
        assert [e.seq for e in back] == list(range(1, 20_001)) and back == events
    # the restarted node catches up before the module's other tests (3 replicas again)
    await nats_cluster.ready()
