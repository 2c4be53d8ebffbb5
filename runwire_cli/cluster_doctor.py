"""`runwire doctor` in cluster mode (a config with `[cluster]`): the same checklist, asked of the
cluster's parts instead of one host's. The event stream answers on NATS with its replicas and leader;
the state database answers and is migrated; a scheduler holds the leader's lease and its control
socket answers (over CURVE with `[cluster.curve]`); every registered runner has heartbeated within
`scheduler.runner_lost_after` and its control socket answers; the gateway is healthy; and each
reachable runner's probe event travels runner -> journal -> JetStream -> ZeroMQ -> gateway ->
WebSocket (in the event stream before it is published, as every event). Journal directories are not
compared: each host has its own."""

from __future__ import annotations

import anyio

from runwire_cluster.events import EventStream, describe_nats
from runwire_cluster.runs import SCHEDULER_LEASE
from runwire_cluster.state import ClusterState, RunnerRecord, describe_url
from shared.errors import RunwireError

from .client import GatewayClient
from .doctor import Doctor

_CALL_S = 10.0  # each engine's answer, at most
_PROBE_PATH = "runner -> journal -> JetStream -> ZeroMQ -> gateway -> WebSocket"


class ClusterDoctor(Doctor):
    async def run(self) -> None:
        cluster = self.settings.config.cluster
        assert cluster is not None
        await self.check_config()
        await self.check_event_stream()
        where = describe_url(cluster.state)
        reachable: list[RunnerRecord] = []
        try:
            with anyio.fail_after(_CALL_S):
                state = await ClusterState.connect(cluster, min_size=1, max_size=1)
        except (RunwireError, TimeoutError) as e:
            self.add("cluster state", False, f"{where}: {e or 'no answer'}")
        else:
            async with state:
                reachable = await self.check_leader_and_runners(state, where)
        async with GatewayClient(self.gateway, self.settings.token, timeout=5.0) as client:
            gateway_up = await self.check_gateway(client)
            for r in reachable:
                name = f"probe event via runner {r.runner_id}"
                if gateway_up:
                    await self.check_probe(client, r.control, name, _PROBE_PATH)
                else:
                    self.add(name, False, "not sent: gateway down")

    async def check_event_stream(self) -> None:
        cluster = self.settings.config.cluster
        assert cluster is not None
        nats = describe_nats(cluster)
        try:
            with anyio.fail_after(_CALL_S):
                async with await EventStream.connect(cluster) as stream:
                    info = await stream.js.stream_info(stream.name)
        except (RunwireError, TimeoutError, OSError) as e:
            self.add("event stream", False, f"NATS {nats}: {e or 'no answer'}")
            return
        c = info.cluster
        leader = c.leader if c is not None else None
        replicas = 1 + len(c.replicas or []) if c is not None else 1
        if c is not None and not leader:
            self.add("event stream", False, f"stream {info.config.name} on NATS {nats} has no leader (no quorum?)")
            return
        self.add("event stream", True, f"stream {info.config.name} on NATS {nats}: {info.state.messages} messages, "
                 f"{replicas} replica(s), leader {leader or '-'}")

    async def check_leader_and_runners(self, state: ClusterState, where: str) -> list[RunnerRecord]:
        """The leader and the registered runners; returns the runners whose control socket answers."""
        try:
            with anyio.fail_after(_CALL_S):
                holder = await state.holder(SCHEDULER_LEASE)
                runners = await state.runners()
        except (RunwireError, TimeoutError) as e:
            self.add("cluster state", False, f"{where}: {e or 'no answer'}")
            return []
        self.add("cluster state", True, where)
        if holder is None or holder.endpoints.control is None:
            self.add("scheduler leads", False, f"no scheduler holds lease {SCHEDULER_LEASE!r}: launches wait in "
                     "the database and no slot fires until one does (is any scheduler running?)")
        else:
            self.add("scheduler leads", True, f"{holder.holder} (term {holder.attempt})")
            await self.check_service("scheduler", holder.endpoints.control)
        if not runners:
            self.add("runners registered", False, f"no runner in the registry of {where}: runs would wait queued")
            return []
        lost_after = self.settings.config.scheduler.runner_lost_after
        stale = [r for r in runners if r.heartbeat_age > lost_after]
        self.add("runners registered", not stale, ", ".join(
            f"{r.runner_id} (heartbeat {r.heartbeat_age:.1f}s ago{', stale' if r in stale else ''})" for r in runners))
        return [r for r in runners if await self.check_service(f"runner {r.runner_id}", r.control)]
