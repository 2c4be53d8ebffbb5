"""Launches in cluster mode: a launch is a row in the database's `launches` table (a gateway inserts it,
or this scheduler's control socket does, for the CLI); the leader claims them (SKIP LOCKED, with their
run rows, fenced) and queues each as a run. The ends of runs reach the database through one task."""

from __future__ import annotations

import logging
import math

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runwire_cluster.runs import LeaderState, RunRow
from runwire_cluster.state import Lease
from shared.control import Launch
from shared.params import resolve_params
from shared.replies import LaunchResult

from .cluster_journaling import ClusterJournaling
from .launches import Launches
from .runs import RunRecord

log = logging.getLogger(__name__)

CLAIM_EVERY = 0.2  # seconds between looks at the launches table when it had none
CLAIM_BATCH = 20


class ClusterLaunches(Launches):
    """The control socket's Launch: into the launches table, like a gateway's."""

    leader: LeaderState

    async def launch(self, req: Launch) -> LaunchResult:
        params = resolve_params(self.settings.pipeline(req.pipeline), req.params)
        return await self.leader.queue_launch(req.pipeline, params, req.idempotency_key)


async def claim_launches(leader: LeaderState, lease: Lease, journaling: ClusterJournaling) -> None:
    """Claim launches as they come and queue each as a run (its row was made with the claim)."""
    while True:
        taken = await leader.take_launches(lease, CLAIM_BATCH)
        for launch, key in taken:
            trigger: dict[str, object] = {"trigger": "manual"}
            if key is not None:
                trigger["idempotency_key"] = key
            rec = await journaling.write_queued(RunRow(launch.run_id, launch.pipeline, dict(launch.params), trigger))
            log.info("run %s (%s) queued from the launches table%s", rec.run_id, rec.pipeline,
                     f" (idempotency key {key!r})" if key is not None else "")
        if len(taken) < CLAIM_BATCH:
            await anyio.sleep(CLAIM_EVERY)


async def record_ends(leader: LeaderState, lease: Lease, ends: MemoryObjectReceiveStream[RunRecord], *,
                      task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Mark ended runs ended in the database, in batches (fenced)."""
    async with ends:
        task_status.started()
        while True:
            batch = [await ends.receive()]
            while True:
                try:
                    batch.append(ends.receive_nowait())
                except anyio.WouldBlock:
                    break
            await leader.runs_ended(lease, [(rec.run_id, rec.outcome or "failure") for rec in batch])


def ends_stream() -> tuple[MemoryObjectSendStream[RunRecord], MemoryObjectReceiveStream[RunRecord]]:
    return anyio.create_memory_object_stream[RunRecord](math.inf)
