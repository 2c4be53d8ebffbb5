"""The gateways' read-only views of the event stream (runwire_cluster/reader.py) on a real 3-node
JetStream cluster: a run's events after any seq (the chunk holding it found by bisection) equal the
plain replay's, with another run's chunks interleaved in the stream; the run list and the first and
last chunk of each run; the stream's identity is the same answer on every server."""

from __future__ import annotations

import itertools
from contextlib import aclosing

import pytest

from runwire_cluster.events import EventStream
from runwire_cluster.reader import WALK_BY_GETS, chunks_after, first_and_last, identity, run_counts, subject_run_id
from shared.config import ClusterConfig
from shared.events import Event
from tests.cluster_fixtures import NatsCluster, nats_cluster  # noqa: F401  (the fixture)
from tests.test_cluster_events import make_events

_runs = itertools.count(1)


def new_run_id(tag: str) -> str:
    return f"20260101T000000Z-{tag}.{next(_runs)}"


def config(cluster: NatsCluster, servers: list[str] | None = None) -> ClusterConfig:
    return ClusterConfig(nats=servers or cluster.urls, state="postgresql://unused/db", stream_max_age="1h",
                         stream_replicas=3)


async def collect(stream: EventStream, run_id: str, after: int) -> tuple[list[Event], int]:
    out: list[Event] = []
    chunks = 0
    async with aclosing(chunks_after(stream, run_id, after)) as gen:
        async for chunk in gen:
            out.extend(chunk)
            chunks += 1
    return out, chunks


def test_subjects_map_back_to_run_ids() -> None:
    assert subject_run_id("runwire.ev.a~~b-c") == "a..b-c"
    assert subject_run_id("runwire.ev.") is None
    assert subject_run_id("other.a") is None
    assert subject_run_id("runwire.ev.a b") is None  # not a valid run id


@pytest.mark.timeout(120)
async def test_events_after_any_seq_are_exactly_the_rest(nats_cluster: NatsCluster) -> None:  # noqa: F811
    await nats_cluster.ready()
    run_id, other = new_run_id("read"), new_run_id("other")
    events = make_events(run_id, 1, 2000)
    noise = make_events(other, 1, 2000)
    async with await EventStream.connect(config(nats_cluster)) as stream:
        await stream.ensure()
        w, wo = await stream.writer(run_id, new=True), await stream.writer(other, new=True)
        # chunks of varied sizes (1 to 37 events), the other run's between them
        i = 0
        for size in itertools.cycle([1, 5, 37, 2, 13]):
            if i >= len(events):
                break
            await w.append(events[i:i + size])
            await wo.append(noise[i:i + size])
            i += size
        for after in [0, 1, 2, 5, 6, 7, 43, 44, 45, 999, 1000, 1500, 1998, 1999, 2000, 2500]:
            got, _ = await collect(stream, run_id, after)
            assert got == events[after:], f"after {after}"
        # a long read goes on through a consumer, a short one does not need to
        _, chunks = await collect(stream, run_id, 0)
        assert chunks > WALK_BY_GETS
        assert (await collect(stream, new_run_id("absent"), 0)) == ([], 0)
        counts = await run_counts(stream)
        assert counts[run_id] == counts[other] > 100
        head, tail = await first_and_last(stream, run_id)
        assert head == events[:1] and tail[-1] == events[-1]
        assert await first_and_last(stream, new_run_id("absent")) == ([], [])
        name, created = await identity(stream)
    # every server names the stream alike: a cursor from a gateway on one is exact on another
    for url in nats_cluster.urls:
        async with await EventStream.connect(config(nats_cluster, [url])) as one:
            assert await identity(one) == (name, created) and created
