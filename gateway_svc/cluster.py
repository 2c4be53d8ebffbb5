"""The gateway in cluster mode (loaded only with `[cluster]`): no journals on this host. At start it
connects to the event stream (trying again, loudly, until NATS answers: a gateway must not serve
without its source), names the cluster for cursors, and loads the run index from the stream; the
hub then reads gaps, tails and replays from the stream (streamsource.py), its SUB socket follows
the runner registry (registry.py), and the archiver reads the runs it archives from the stream."""

from __future__ import annotations

import logging
import time

from runwire_cluster.events import EventStream
from runwire_cluster.reader import identity
from shared.config import Settings
from shared.httpapi import EventStreamHealth, RegistryHealth

from .archiver import Archiver
from .cursor import cluster_tag
from .hub import Hub
from .registry import RegistryFollower
from .streamsource import StreamSource, load_index

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 2.0
# how long a read is tried again while JetStream has no leader: fills run under the sequencer's lock,
# so a gateway gives up sooner than a writer (30 s) and leaves the event for a later fill
READ_RETRY_S = 5.0
STREAM_SWEEP_INTERVAL = 2.0  # seconds between the event stream's sweeps (a cheap request when idle)


class ClusterGateway:
    """An async context manager: entering connects the stream and prepares the hub; leaving closes."""

    def __init__(self, settings: Settings, hub: Hub, archiver: Archiver) -> None:
        assert settings.config.cluster is not None
        self.settings = settings
        self.cluster = settings.config.cluster
        self.hub = hub
        self.archiver = archiver
        self.stream: EventStream | None = None
        self.follower = RegistryFollower(settings, hub)
        hub.follow = self.follower.run
        hub.sweep_interval = STREAM_SWEEP_INTERVAL

    async def __aenter__(self) -> ClusterGateway:
        self.stream = await self._connect()
        try:
            name, created = await identity(self.stream)
            hub = self.hub
            source = StreamSource(self.stream)
            hub.source = hub.sequencer.source = source
            hub.tag = cluster_tag(name, created)
            started = time.monotonic()
            count = await load_index(self.stream, hub.index)
            hub.stats.journal_gaps += sum(len(e.gaps) for e in hub.index.runs.values())
            log.info("cluster: event stream %s (created %s) on NATS %s; indexed %d run(s) from it in %.2fs",
                     name, created, ", ".join(self.cluster.nats), count, time.monotonic() - started)
            log.info("cluster: following the runner registry %s", self.follower.where)
            index = hub.index
            self.archiver.from_stream(self.stream.read, lambda: [e.run_id for e in list(index.runs.values()) if e.ended])
        except BaseException:
            await self.stream.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.stream is not None:
            await self.stream.close()

    async def _connect(self) -> EventStream:
        stream = await EventStream.open_ready(self.cluster, who="gateway", waiting="replays and gap fills wait",
                                              retry_every=CONNECT_RETRY_S)
        stream.retry_for = READ_RETRY_S
        return stream

    def health(self) -> tuple[EventStreamHealth, RegistryHealth]:
        """The /healthz checks of cluster mode: the event stream's connection, and the registry."""
        nc = self.stream.nc if self.stream is not None else None
        connected = nc is not None and nc.is_connected
        where = nc.connected_url.netloc if nc is not None and nc.connected_url is not None else None
        stream = EventStreamHealth(
            ok=connected, servers=list(self.cluster.nats), connected_to=where,
            detail=(f"event stream {self.stream.name if self.stream else '?'} on NATS {where}" if connected
                    else f"NATS not connected (servers {', '.join(self.cluster.nats)}); replays and gap fills wait"))
        return stream, self.follower.status()
