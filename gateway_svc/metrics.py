"""The gateway's counts and their Prometheus exposition (a registry owned by the app, not the global one).

Hot paths bump plain integers on `GatewayStats`; a collector turns them into metrics at scrape time, so
counting costs nothing per event. The one timing, how long offering a batch to every client takes (the
gateway's saturation signal: near the tick interval it cannot keep up), is a prometheus_client
Histogram observed once per batch.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import gcpauses, journal
from shared.wire import Heartbeat

CONNECTION_KINDS = ("ws_run", "ws_all", "sse")
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


def _fanout_histogram() -> Histogram:
    return Histogram("runwire_gateway_fanout_seconds", "Time to offer one batch of events to every client concerned "
                     "(written or queued)", buckets=FANOUT_BUCKETS, registry=None)


@dataclass
class GatewayStats:
    events_in: int = 0  # events received from the publishers
    heartbeats_in: int = 0
    bad_messages: int = 0  # undecodable or malformed ZeroMQ messages
    duplicates_dropped: int = 0  # events with seq <= the run's delivered seq
    gaps_filled: int = 0  # gaps (and lost tails) filled from the journal, once per run for all clients
    gap_events_filled: int = 0
    lost_tails_filled: int = 0  # of those, found by a heartbeat or the journal sweep
    gap_events_unfilled: int = 0  # missing events the journal did not have either (loud in the log)
    journal_gaps: int = 0  # distinct holes (missing seqs) found in journals; each told to the clients it concerns
    events_out: int = 0  # events sent to clients, counted per client
    frames_out: int = 0
    frames_direct: int = 0  # of those, written by the hub straight to a caught-up client's connection
    replay_events: int = 0  # events sent from the journal in replays and catch-ups
    slow_consumer_closes: int = 0
    replay_overflows: int = 0  # live buffers dropped during a replay (the client caught up from the journal)
    unrecovered_resumes: int = 0  # hello recovered=false
    runs_discovered: int = 0  # runs learnt of after start (events, heartbeats, directory scan)
    connections_total: Counter[str] = field(default_factory=Counter)
    connections_open: Counter[str] = field(default_factory=Counter)
    fanout_seconds: Histogram = field(default_factory=_fanout_histogram)


_COUNTERS = (
    ("events_in", "Events received from the publishers"),
    ("heartbeats_in", "Heartbeats received from the publishers"),
    ("bad_messages", "ZeroMQ messages that could not be decoded"),
    ("duplicates_dropped", "Events dropped because their seq was already delivered"),
    ("gaps_filled", "Seq gaps and lost tails filled from the journal"),
    ("gap_events_filled", "Events delivered from the journal to fill gaps"),
    ("lost_tails_filled", "Lost tails noticed by a heartbeat or the journal sweep and filled"),
    ("gap_events_unfilled", "Missing events that the journal did not hold either"),
    ("journal_gaps", "Distinct holes (missing seqs, e.g. corrupt lines) found in journals; reported to clients as journal_gap"),
    ("events_out", "Events sent to clients (each client counted)"),
    ("frames_out", "Frames sent to clients"),
    ("frames_direct", "Frames written straight to a caught-up client's connection (the others went through its queue)"),
    ("replay_events", "Events sent to clients from the journal (replay and catch-up)"),
    ("slow_consumer_closes", "Clients closed with 4008 slow consumer"),
    ("replay_overflows", "Live buffers dropped during a replay; the client caught up from the journal instead"),
    ("unrecovered_resumes", "Resumes answered with recovered=false"),
    ("runs_discovered", "Runs learnt of after start"),
)


class _StatsCollector(Collector):
    def __init__(
        self,
        stats: GatewayStats,
        gauges: Callable[[], dict[str, float]],
        heartbeats: Callable[[], Iterable[Heartbeat]],
        counters: Callable[[], dict[str, tuple[str, float]]],
    ) -> None:
        self.stats = stats
        self.gauges = gauges
        self.heartbeats = heartbeats
        self.counters = counters  # counters kept elsewhere: {name: (doc, value)}

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, doc in _COUNTERS:
            yield CounterMetricFamily(f"runwire_gateway_{name}", doc, value=getattr(s, name))
        for name, (doc, value) in self.counters().items():
            yield CounterMetricFamily(f"runwire_gateway_{name}", doc, value=value)
        total = CounterMetricFamily("runwire_gateway_connections", "Client connections accepted", labels=["kind"])
        opened = GaugeMetricFamily("runwire_gateway_connections_open", "Client connections open now", labels=["kind"])
        for kind in CONNECTION_KINDS:
            total.add_metric([kind], s.connections_total[kind])
            opened.add_metric([kind], s.connections_open[kind])
        yield total
        yield opened
        yield from s.fanout_seconds.collect()
        # journal repairs happen where journals are written and read: in each publisher (from its last
        # heartbeat) and in the gateway itself
        torn = CounterMetricFamily("runwire_journal_torn_lines_repaired", "Torn last lines repaired in journals",
                                   labels=["process"])
        corrupt = CounterMetricFamily("runwire_journal_corrupt_lines_skipped", "Corrupt journal lines skipped",
                                      labels=["process"])
        torn.add_metric(["gateway"], journal.stats.torn_lines_repaired)
        corrupt.add_metric(["gateway"], journal.stats.corrupt_lines_skipped)
        for hb in self.heartbeats():
            torn.add_metric([hb.runner_id], hb.journal_torn_repaired)
            corrupt.add_metric([hb.runner_id], hb.journal_corrupt_skipped)
        yield torn
        yield corrupt
        frozen = GaugeMetricFamily("runwire_gc_frozen_objects", "Objects held since start, frozen out of the garbage collector's scans")
        frozen.add_metric([], gc.get_freeze_count())
        yield frozen
        longest = GaugeMetricFamily("runwire_gc_longest_pause_seconds", "The longest garbage collection pause since start, by generation",
                                    labels=["generation"])
        runs = CounterMetricFamily("runwire_gc_collections", "Garbage collections since start, by generation", labels=["generation"])
        for gen in range(3):
            longest.add_metric([str(gen)], gcpauses.PAUSES.longest[gen])
            runs.add_metric([str(gen)], gcpauses.PAUSES.collections[gen])
        yield longest
        yield runs
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"runwire_gateway_{name}", name.replace("_", " "), value=value)


def make_registry(
    stats: GatewayStats,
    gauges: Callable[[], dict[str, float]],
    heartbeats: Callable[[], Iterable[Heartbeat]] = tuple,
    counters: Callable[[], dict[str, tuple[str, float]]] = dict,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, gauges, heartbeats, counters))
    return registry
