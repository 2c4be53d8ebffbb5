"""The runner's scheduler link in cluster mode: its DEALER connects to the dispatch ROUTER of the
scheduler that leads now, read from the cluster's database (the endpoints recorded with lease
"scheduler"), and moves to the new leader's on a takeover (disconnect the old endpoint, connect the
new: a DEALER connected to both would share its messages between them). While no scheduler leads, or
the database is away, it stays where it is: the heartbeat loop's RunnerStatus reaches the next leader
within a heartbeat of the move. (Single-host mode connects the configured endpoint, in service.py.)"""

from __future__ import annotations

import logging

import anyio
import zmq.asyncio
from anyio.abc import TaskStatus

from runwire_cluster.runs import SCHEDULER_LEASE
from runwire_cluster.state import ClusterState
from shared.config import Settings
from shared.curve import load_keys, secure_client
from shared.errors import ServiceUnavailable

log = logging.getLogger(__name__)

FOLLOW_EVERY = 0.5  # seconds between looks at who leads


async def follow_leader(sock: zmq.asyncio.Socket, settings: Settings, *,
                        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    cluster = settings.config.cluster
    assert cluster is not None
    secure_client(sock, load_keys(settings))
    task_status.started()  # the runner does not wait for the database to start serving
    state: ClusterState | None = None
    current: str | None = None
    said = ""
    try:
        while True:
            try:
                if state is None:
                    state = await ClusterState.connect(cluster, min_size=0, max_size=1, timeout=3.0)
                with anyio.fail_after(5.0):
                    holder = await state.holder(SCHEDULER_LEASE)
                endpoint = holder.endpoints.dispatch if holder is not None else None
                if holder is not None and endpoint is not None and endpoint != current:
                    if current is not None:
                        sock.disconnect(current)
                    sock.connect(endpoint)
                    log.info("scheduler leader %s (lease attempt %d): DEALER connected to its dispatch %s%s",
                             holder.holder, holder.attempt, endpoint, f" (was {current})" if current else "")
                    current = endpoint
                now = "" if holder is not None else "no scheduler leads the cluster now; waiting for one"
            except (ServiceUnavailable, TimeoutError) as e:
                now = f"cannot read the scheduler leader from cluster.state ({e or 'timeout'}); keeping {current}"
            if now and now != said:
                log.warning("dispatch: %s", now)
            said = now
            await anyio.sleep(FOLLOW_EVERY)
    finally:
        if state is not None:
            with anyio.CancelScope(shield=True):
                await state.close()
