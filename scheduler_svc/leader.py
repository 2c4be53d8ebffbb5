"""Leadership among the schedulers of one cluster (cluster mode): a PostgreSQL lease named "scheduler",
its `attempt` the fencing token. The holder records its dispatch, control and PUB endpoints with the
lease (runners' DEALERs and gateways find the leader there), renews every RENEW_EVERY seconds, and stops
leading at once when it cannot be sure it still holds the lease:

- a renewal answered LeaseLost (another scheduler took it over): the term ends now;
- no renewal succeeded for LEADER_TTL - MARGIN seconds since the last good one was sent (the
  database is away or slow): the lease may have expired by the database's clock, so the term ends
  before a standby can take over. Every write the leader makes goes through `fenced(lease)` besides,
  so a leader that was paused past its lease changes nothing in the database.

A standby tries to acquire every ACQUIRE_EVERY seconds; it takes over once the lease has expired: at
most LEADER_TTL seconds after a leader was killed with -9. The lease's TTL is a constant, not a config
key: long enough that a busy leader renews in time, short enough that a takeover is quick.
"""

from __future__ import annotations

import logging
import time

import anyio

from runwire_cluster.runs import SCHEDULER_LEASE
from runwire_cluster.state import ClusterState, Endpoints, Lease
from shared.errors import ServiceUnavailable

log = logging.getLogger(__name__)

LEADER_TTL = 5.0  # seconds a lease lasts without a renewal
RENEW_EVERY = 1.0
MARGIN = 1.0  # seconds before the lease may expire that the leader stops leading
ACQUIRE_EVERY = 0.5
_CALL_TIMEOUT = 2.0  # seconds for one acquire or renew round trip


class LeadershipExpired(ServiceUnavailable):
    """The leader could not renew its lease in time: it stops leading (it may have lost it)."""


class Leadership:
    def __init__(self, state: ClusterState, holder: str, endpoints: Endpoints) -> None:
        self.state = state
        self.holder = holder
        self.endpoints = endpoints
        self.lease: Lease | None = None  # while leading
        self._valid_until = 0.0  # monotonic: until then the lease is surely ours

    async def acquire(self) -> Lease:
        """Wait until this scheduler holds the lease (a standby until then)."""
        said = ""
        while True:
            sent = time.monotonic()
            try:
                with anyio.fail_after(_CALL_TIMEOUT):
                    lease = await self.state.acquire_lease(SCHEDULER_LEASE, self.holder, LEADER_TTL, self.endpoints)
                if lease is not None:
                    self._valid_until = sent + LEADER_TTL - MARGIN
                    self.lease = lease
                    log.info("leading: lease %r attempt %d taken by %s (TTL %gs); dispatch %s, control %s, publish %s",
                             SCHEDULER_LEASE, lease.attempt, self.holder, LEADER_TTL, self.endpoints.dispatch,
                             self.endpoints.control, self.endpoints.publish)
                    return lease
                holder = await self.state.holder(SCHEDULER_LEASE)
                now = f"standby: {holder.holder} leads (attempt {holder.attempt})" if holder else "standby"
            except (ServiceUnavailable, TimeoutError) as e:
                now = f"standby: the cluster state does not answer ({e or 'timeout'}); trying again"
            if now != said:
                log.info("%s", now)
                said = now
            await anyio.sleep(ACQUIRE_EVERY)

    async def keep(self, lease: Lease) -> None:
        """Renew until the lease is lost (LeaseLost) or cannot be renewed in time (LeadershipExpired);
        runs beside the term's tasks, so either ends the term at once."""
        while True:
            await anyio.sleep(max(0.0, min(RENEW_EVERY, self._valid_until - time.monotonic())))
            sent = time.monotonic()
            if sent >= self._valid_until:
                raise LeadershipExpired(f"lease {SCHEDULER_LEASE!r} attempt {lease.attempt}: not renewed for "
                                        f"{LEADER_TTL - MARGIN:g}s: it may expire; stopping leading")
            try:
                with anyio.fail_after(min(_CALL_TIMEOUT, max(0.1, self._valid_until - sent))):
                    lease = await self.state.renew_lease(lease, LEADER_TTL)
            except (ServiceUnavailable, TimeoutError) as e:
                log.warning("lease %r attempt %d: renewal failed (%s); still leading for %.1fs at most",
                            SCHEDULER_LEASE, lease.attempt, e or "timeout", max(0.0, self._valid_until - time.monotonic()))
                continue
            self._valid_until = sent + LEADER_TTL - MARGIN
            self.lease = lease

    def check(self) -> None:
        """Before an act the database does not fence (an append to the event stream, a dispatch): the
        lease is surely still ours, or LeadershipExpired (a leader resumed after a pause past its
        lease learns it here, before its renewal tells it)."""
        if self.lease is None or time.monotonic() >= self._valid_until:
            raise LeadershipExpired(f"lease {SCHEDULER_LEASE!r}: not renewed in time: this scheduler may no "
                                    "longer lead; not acting")

    async def release(self, lease: Lease) -> None:
        """A clean stop: give the lease up so a standby takes over at once (best effort, bounded)."""
        with anyio.move_on_after(_CALL_TIMEOUT, shield=True):
            try:
                await self.state.release_lease(lease)
                log.info("lease %r attempt %d released", SCHEDULER_LEASE, lease.attempt)
            except ServiceUnavailable as e:
                log.warning("lease %r attempt %d: not released (%s); it expires in %gs", SCHEDULER_LEASE,
                            lease.attempt, e, LEADER_TTL)
