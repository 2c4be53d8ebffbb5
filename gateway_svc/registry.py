"""Cluster mode: the gateway's SUB socket follows the runner registry (PostgreSQL `runners`). Every
POLL_INTERVAL it reads the runners heard from within `alive_within` seconds and connects to the PUB
endpoint of each new one, and disconnects from those that left (removed, or silent for longer);
the static `gateway.subscribe` list stays connected whatever the registry says.

A registry that cannot be reached keeps the last known set (the runs of those runners keep coming),
is logged (once per ERROR_LOG_EVERY seconds while it lasts) and shown in /healthz. An endpoint in the
registry that is not a tcp:// or ipc:// address ZeroMQ accepts is refused with a warning naming the
runner; the others are still followed.
"""

from __future__ import annotations

import logging
import time

import anyio
import asyncpg
import zmq

from runwire_cluster.runs import SCHEDULER_LEASE
from runwire_cluster.state import ClusterState, describe_url
from shared.config import Settings
from shared.errors import ServiceUnavailable
from shared.httpapi import RegistryHealth

from .hub import Hub
from .subscription import Subscription

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
ERROR_LOG_EVERY = 10.0


class RegistryFollower:
    def __init__(self, settings: Settings, hub: Hub, *, poll_interval: float = POLL_INTERVAL) -> None:
        assert settings.config.cluster is not None
        self.cluster = settings.config.cluster
        self.static = set(settings.config.gateway.subscribe)
        # a runner heartbeats every runner.heartbeat_interval; one silent for 3x the gateway's staleness
        # limit is let go (its runs' tails come from the event stream's sweep)
        self.alive_within = 3 * settings.config.gateway.runner_stale_after
        self.hub = hub
        self.poll_interval = poll_interval
        self.where = describe_url(self.cluster.state)
        self.state: ClusterState | None = None
        self.runners: dict[str, str] = {}  # runner id -> PUB endpoint we follow
        self.refused: dict[str, str] = {}  # runner id -> why its endpoint is not followed
        self.polls = 0
        self.last_ok: float | None = None  # monotonic time of the last successful poll
        self.error: str | None = None  # the last poll's failure (None: it succeeded)
        self.failing_since: float | None = None
        self._last_error_log = float("-inf")

    async def run(self, sub: Subscription) -> None:
        """Poll until cancelled (a task of the hub's group)."""
        try:
            while True:
                await self.poll(sub)
                await anyio.sleep(self.poll_interval)
        finally:
            if self.state is not None:
                with anyio.CancelScope(shield=True):
                    await self.state.close()

    async def poll(self, sub: Subscription) -> None:
        try:
            if self.state is None:
                # no connection floor: asyncpg would log a traceback per retry to keep one while the database is away
                self.state = await ClusterState.connect(self.cluster, min_size=0, max_size=2)
            runners = await self.state.runners(alive_within=self.alive_within)
            leader = await self.state.holder(SCHEDULER_LEASE)
        except (ServiceUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            self._failed(e)
            return
        self.polls += 1
        self.last_ok = time.monotonic()
        if self.failing_since is not None:
            log.warning("runner registry %s: reachable again after %.0fs; following %d runner(s)", self.where,
                        time.monotonic() - self.failing_since, len(runners))
        self.error = None
        self.failing_since = None
        publishers = [(r.runner_id, r.publish) for r in runners]
        if leader is not None and leader.endpoints.publish:
            # the leading scheduler's PUB (its `queued` events and the ends it writes): followed like a
            # runner's, and let go of at a takeover
            publishers.append((f"scheduler {leader.holder}", leader.endpoints.publish))
        self.apply(sub, publishers)

    def _failed(self, e: BaseException) -> None:
        now = time.monotonic()
        self.error = f"{type(e).__name__}: {e}"
        self.failing_since = self.failing_since or now
        if now - self._last_error_log >= ERROR_LOG_EVERY:
            self._last_error_log = now
            log.error("runner registry %s (key `cluster.state`): %s; still following the last known %d runner(s) "
                      "(%s); trying again every %gs", self.where, self.error, len(self.runners),
                      ", ".join(sorted(self.runners)) or "none", self.poll_interval)

    def apply(self, sub: Subscription, publishers: list[tuple[str, str]]) -> None:
        """Connect to the PUB endpoints (runners', by id, and the leading scheduler's) not followed yet;
        disconnect from those gone."""
        sock = sub.sock
        connected = self.hub.connected
        wanted: dict[str, str] = {}
        refused: dict[str, str] = {}
        for publisher_id, endpoint in publishers:
            if not endpoint.startswith(("tcp://", "ipc://")) or len(endpoint) > 1024:
                refused[publisher_id] = f"PUB endpoint {endpoint[:200]!r} is not a tcp:// or ipc:// address"
                continue
            wanted[publisher_id] = endpoint
        endpoints = set(wanted.values())
        for runner_id, endpoint in sorted(wanted.items()):
            if endpoint in connected:
                continue
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as e:
                refused[runner_id] = f"cannot connect SUB to its PUB endpoint {endpoint[:200]!r}: {e}"
                endpoints.discard(endpoint)
                continue
            connected.add(endpoint)
            log.info("runner %s joined the registry: subscribed to events and heartbeats on %s", runner_id, endpoint)
        for endpoint in sorted(connected - endpoints - self.static):
            try:
                sock.disconnect(endpoint)
            except zmq.ZMQError as e:  # not connected after all (a race with the socket's own bookkeeping)
                log.warning("runner registry: disconnecting from %s: %s", endpoint, e)
            connected.discard(endpoint)
            gone = [rid for rid, ep in self.runners.items() if ep == endpoint]
            log.info("runner %s left the registry (or is silent for over %gs): unsubscribed from %s",
                     ", ".join(gone) or "?", self.alive_within, endpoint)
        for runner_id, why in refused.items():
            if self.refused.get(runner_id) != why:
                log.warning("runner registry: runner %s: %s; not followed", runner_id[:200], why)
        self.refused = refused
        self.runners = {rid: ep for rid, ep in wanted.items() if ep in connected}

    def status(self) -> RegistryHealth:
        """For /healthz."""
        now = time.monotonic()
        if self.error is not None:
            detail = (f"runner registry {self.where} not reachable: {self.error}; following the last known "
                      f"{len(self.runners)} runner(s)")
        elif self.last_ok is None:
            detail = f"runner registry {self.where}: not read yet"
        else:
            detail = f"following {len(self.runners)} runner(s) from the registry {self.where}"
        return RegistryHealth(ok=self.error is None and self.last_ok is not None, detail=detail, where=self.where,
                              runners=dict(sorted(self.runners.items())), refused=dict(self.refused), polls=self.polls,
                              last_ok_age_s=round(now - self.last_ok, 3) if self.last_ok is not None else None)
