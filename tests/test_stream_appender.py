"""The runner's appender to the event stream on a real 3-node JetStream cluster: appends cut off by
a cancel at any point (before the request, in flight, after the ack) and then continued with more
events leave every event in the stream exactly once, in order; the cut-off chunk is resent as it was
first tried (no duplicate message ids that differ only in their end)."""

from __future__ import annotations

import anyio
import pytest

from runner_svc.streamed import StreamAppender
from runwire_cluster.events import EventStream, chunk_range
from shared.config import ClusterConfig
from shared.events import Event
from shared.ids import new_run_id
from tests.cluster_fixtures import NatsCluster, nats_cluster  # noqa: F401  (the fixture)


def make(run_id: str, first: int, count: int) -> list[Event]:
    return [Event(run_id=run_id, seq=s, timestamp="2026-01-01T00:00:00.000000+00:00", stage="s", event="log",
                  msg=f"line {s}") for s in range(first, first + count)]


@pytest.mark.timeout(120)
async def test_appends_cut_off_anywhere_then_continued_leave_each_event_once(nats_cluster: NatsCluster) -> None:  # noqa: F811
    cfg = ClusterConfig(nats=nats_cluster.urls, state="postgresql://unused/db", stream_max_age="1h")
    run_id = new_run_id("cut")
    async with await EventStream.connect(cfg) as stream:
        await stream.ensure()
        appender = StreamAppender(await stream.writer(run_id, new=True, writer_id="runner.t"))
        pending: list[Event] = []  # what RunJournal keeps queued until acknowledged
        next_seq = 1
        cut = 0
        for i in range(120):
            pending += make(run_id, next_seq, 1 + i % 4)
            next_seq = pending[-1].seq + 1
            before = appender.writer.last_seq
            with anyio.move_on_after((i % 12) * 0.0004) as scope:  # 0 s: cut before anything is sent
                await appender.append(pending)
            if scope.cancelled_caught:
                cut += 1
            acked = appender.writer.last_seq
            assert acked >= before
            pending = [ev for ev in pending if ev.seq > acked]
        await appender.append(pending)  # the rest, uncut
        assert cut > 10  # the cancels did land (at various points)
        back = await stream.read(run_id)
        assert back == make(run_id, 1, next_seq - 1)
        # and the chunks never overlap: each seq in exactly one message
        sub = await stream.js.subscribe(f"runwire.ev.{run_id.replace('.', '~')}", stream=stream.name,
                                        ordered_consumer=True)
        try:
            spans = []
            while not spans or spans[-1][1] < next_seq - 1:
                msg = await sub.next_msg(timeout=10)
                span = chunk_range((msg.headers or {}).get("Nats-Msg-Id"))
                assert span is not None
                spans.append(span)
        finally:
            await sub.unsubscribe()
        assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:], strict=False)), spans
