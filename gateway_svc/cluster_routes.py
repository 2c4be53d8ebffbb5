"""The gateway's launch and control routing in cluster mode: a launch is a row in the cluster's
`launches` table (answered with its run id; 503 when the database is away: nothing was queued), and
every other control call goes to the control endpoint of the scheduler that leads now, read from the
database (its lease), so the gateway follows a takeover. The database is connected on first use, not at
start: a gateway serves streams while the database is away."""

from __future__ import annotations

import logging

import anyio
from aiohttp import web

from runwire_cluster.runs import SCHEDULER_LEASE, LeaderState
from runwire_cluster.state import ClusterState
from shared.config import ClusterConfig
from shared.errors import ServiceUnavailable
from shared.replies import LaunchResult
from shared.values import Params

log = logging.getLogger(__name__)

_CALL_TIMEOUT = 5.0  # seconds for one database round trip of a request


class ClusterRoutes:
    def __init__(self, cluster: ClusterConfig) -> None:
        self.cluster = cluster
        self._state: ClusterState | None = None
        self._lock = anyio.Lock()

    async def _leader_state(self) -> LeaderState:
        async with self._lock:
            if self._state is None:
                with anyio.fail_after(_CALL_TIMEOUT):
                    self._state = await ClusterState.connect(self.cluster, min_size=0, max_size=4, timeout=3.0)
            return LeaderState(self._state)

    async def launch(self, pipeline: str, params: Params, key: str | None) -> LaunchResult:
        try:
            leader = await self._leader_state()
            with anyio.fail_after(_CALL_TIMEOUT):
                return await leader.queue_launch(pipeline, params, key)
        except TimeoutError as e:
            raise ServiceUnavailable(f"cluster state ({self.cluster.state}): no answer within {_CALL_TIMEOUT:g}s; "
                                     "the launch was not queued") from e

    async def leader_control(self) -> str:
        """The leading scheduler's control endpoint; ServiceUnavailable when none leads now."""
        try:
            leader = await self._leader_state()
            with anyio.fail_after(_CALL_TIMEOUT):
                holder = await leader.state.holder(SCHEDULER_LEASE)
        except TimeoutError as e:
            raise ServiceUnavailable(f"cluster state ({self.cluster.state}): no answer within {_CALL_TIMEOUT:g}s") from e
        if holder is None or holder.endpoints.control is None:
            raise ServiceUnavailable(f"no scheduler leads the cluster now (lease {SCHEDULER_LEASE!r} is free or "
                                     "expired); a standby takes over within seconds")
        return holder.endpoints.control

    async def close(self, app: web.Application | None = None) -> None:
        if self._state is not None:
            await self._state.close()
            self._state = None
