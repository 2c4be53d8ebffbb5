"""The shared state of cluster mode on PostgreSQL: schedules' fire ledger, launches, leases with
their fencing token, the runner registry, alert deliveries and backfills. Several schedulers use one database at once:

- a slot fires once: one ledger row per (schedule, slot), the primary key decides who claimed it;
- a launch is claimed once: `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on or share
  a row;
- a lease expires by the database's clock (no skew between hosts), its `attempt` grows at each
  takeover and is the fencing token: writes made through `fenced(lease)` check it under a row lock,
  so a holder that was taken over (killed with -9, paused, partitioned) can change nothing more.

Every call that cannot reach the database raises ServiceUnavailable naming `cluster.state`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, Self
from urllib.parse import urlsplit

import anyio
import asyncpg
import msgspec

from shared.config import ClusterConfig
from shared.errors import LeaseLost, ServiceUnavailable
from shared.values import Params

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x72756E77  # pg_advisory_xact_lock key: one migrating scheduler at a time

# Append only: each entry is one schema version, applied once, in order, in one transaction.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE fire_ledger (
        schedule text NOT NULL,
        slot timestamptz NOT NULL,
        run_id text NOT NULL,
        claimed_by text NOT NULL,
        claimed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (schedule, slot)
    );
    CREATE TABLE launches (
        run_id text PRIMARY KEY,
        pipeline text NOT NULL,
        params jsonb NOT NULL DEFAULT '{}',
        queued_at timestamptz NOT NULL DEFAULT now(),
        claimed_by text,
        claimed_at timestamptz
    );
    CREATE INDEX launches_unclaimed ON launches (queued_at, run_id) WHERE claimed_by IS NULL;
    CREATE TABLE leases (
        name text PRIMARY KEY,
        holder text NOT NULL,
        attempt bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE TABLE runners (
        runner_id text PRIMARY KEY,
        publish text NOT NULL,
        control text NOT NULL,
        capacity integer NOT NULL CHECK (capacity >= 1),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        registered_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: the scheduler leader's endpoints on its lease; idempotency keys of launches; the runs the
    # leader created (so a standby that takes over knows them: phase, runner, attempt); schedules' state
    """
    ALTER TABLE leases ADD COLUMN dispatch text, ADD COLUMN control text, ADD COLUMN publish text;
    ALTER TABLE launches ADD COLUMN idempotency_key text, ADD COLUMN fingerprint text;
    CREATE UNIQUE INDEX launches_key ON launches (idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE TABLE runs (
        run_id text PRIMARY KEY,
        pipeline text NOT NULL,
        params jsonb NOT NULL DEFAULT '{}',
        trigger jsonb NOT NULL DEFAULT '{}',
        msg text NOT NULL DEFAULT '',
        runner text,
        attempt integer NOT NULL DEFAULT 0,
        outcome text,
        skip text,
        created_by text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        ended_at timestamptz
    );
    CREATE INDEX runs_active ON runs (created_at, run_id) WHERE outcome IS NULL;
    CREATE TABLE schedule_state (
        name text PRIMARY KEY,
        paused boolean,
        last_slot timestamptz,
        start_fired_at timestamptz
    );
    """,
    # 3: alert deliveries, shared by the schedulers (a takeover resumes the pending ones, makes none twice)
    """
    CREATE TABLE alert_deliveries (
        id text PRIMARY KEY,
        run_id text NOT NULL,
        alert text NOT NULL,
        payload text NOT NULL,
        attempts integer NOT NULL,
        next_at float8 NOT NULL,
        state text NOT NULL,
        updated_at float8 NOT NULL
    );
    """,
    # 4: backfills, shared by the schedulers (a takeover carries on with a backfill's runs not yet queued);
    # a schedule's slot runs found by (schedule, slot) of their trigger
    """
    CREATE TABLE backfills (
        id text PRIMARY KEY,
        schedule text NOT NULL,
        start_ text NOT NULL,
        end_ text NOT NULL,
        policy text NOT NULL,
        max_parallel integer NOT NULL,
        created_at text NOT NULL,
        made_at timestamptz NOT NULL DEFAULT now(),
        done boolean NOT NULL DEFAULT false
    );
    CREATE TABLE backfill_runs (
        backfill_id text NOT NULL REFERENCES backfills (id),
        pos integer NOT NULL,
        slot text NOT NULL,
        run_id text NOT NULL,
        rerun_of text,
        reason text NOT NULL,
        queued boolean NOT NULL DEFAULT false,
        PRIMARY KEY (backfill_id, pos)
    );
    CREATE INDEX runs_slot ON runs ((trigger->>'schedule'), (trigger->>'slot'));
    """,
)

_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
)
# a connection left in a state it cannot be used in (after a statement was cut off midway)
_BROKEN: tuple[type[BaseException], ...] = (asyncpg.exceptions._base.InternalClientError,)
# the server answers but will not let us in: no such database (yet), a role or password it refuses, no
# connection slot left, still starting up. The services keep serving and try again, saying why.
_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError,
    asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError,
)
_params_json = msgspec.json.Encoder()
_params_decoder = msgspec.json.Decoder(dict[str, Any])


class Launch(msgspec.Struct, frozen=True):
    run_id: str
    pipeline: str
    params: Params
    queued_at: datetime


class Lease(msgspec.Struct, frozen=True):
    name: str  # what is leased, e.g. "runner:<runner_id>"
    holder: str  # e.g. the scheduler's id
    attempt: int  # the fencing token: 1 at first, +1 at each takeover
    expires_at: datetime


class Endpoints(msgspec.Struct, frozen=True):
    """Where a lease's holder is reached (a scheduler leader: its dispatch ROUTER, control ROUTER, PUB)."""
    dispatch: str | None = None
    control: str | None = None
    publish: str | None = None


class Holder(msgspec.Struct, frozen=True):
    """A live lease as others see it: who holds it, its token, and where the holder is reached."""
    name: str
    holder: str
    attempt: int
    endpoints: Endpoints
    expires_in: float  # seconds, by the database's clock


class RunnerRecord(msgspec.Struct, frozen=True):
    runner_id: str
    publish: str  # its PUB endpoint
    control: str  # its control ROUTER endpoint
    capacity: int
    heartbeat_at: datetime
    heartbeat_age: float = 0.0  # seconds, by the database's clock


def describe_url(url: str) -> str:
    """host:port/db of a PostgreSQL URL, without user or password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"


class ClusterState:
    """A pool of connections to the cluster's database (an async context manager; closes the pool)."""

    def __init__(self, pool: asyncpg.Pool, where: str) -> None:
        self.pool = pool
        self.where = where

    @classmethod
    async def connect(cls, cluster: ClusterConfig, *, min_size: int = 1, max_size: int = 10,
                      timeout: float = 5.0) -> ClusterState:
        where = describe_url(cluster.state)
        try:
            pool = await asyncpg.create_pool(cluster.state, min_size=min_size, max_size=max_size, timeout=timeout,
                                             command_timeout=timeout, max_inactive_connection_lifetime=60.0)
        except _UNREACHABLE as e:
            raise _unavailable(where, e) from e
        except _REFUSED as e:
            raise _refused(where, e) from e
        return cls(pool, where)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self.pool.acquire() as conn:
                try:
                    yield conn
                except (anyio.get_cancelled_exc_class(), *_UNREACHABLE, *_BROKEN):
                    # a statement cut off midway (a cancelled task, a timeout, a server gone) can leave
                    # the connection mid-protocol: never hand it out again ("another operation is in
                    # progress" on its next use)
                    _discard(conn)
                    raise
        except _UNREACHABLE as e:
            raise _unavailable(self.where, e) from e
        except _BROKEN as e:
            raise _unavailable(self.where, e) from e
        except asyncpg.UndefinedTableError as e:
            # a database no scheduler or runner has migrated yet (they do at start): not ready, not broken
            raise ServiceUnavailable(f"cluster state {self.where} (key `cluster.state`): its tables are not "
                                     f"created yet (the first scheduler or runner to start creates them): {e}") from e
        except _REFUSED as e:
            raise _refused(self.where, e) from e
        except asyncpg.InterfaceError as e:
            if "closed" not in str(e):
                raise
            raise _unavailable(self.where, e) from e

    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection (for the queries of runwire_cluster's other modules); a database that
        cannot be reached raises ServiceUnavailable."""
        return self._conn()

    # ------------------------------------------------------------------------------ migrations

    async def migrate(self) -> int:
        """Bring the schema to the latest version (idempotent; concurrent callers take turns)."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS runwire_schema (version integer NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM runwire_schema") or 0
            for v, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(sql)
                await conn.execute("INSERT INTO runwire_schema (version) VALUES ($1)", v)
                log.info("cluster state %s: schema version %d applied", self.where, v)
            return len(MIGRATIONS)

    # ----------------------------------------------------------------------------- fire ledger

    async def claim_slot(self, schedule: str, slot: datetime, run_id: str, claimed_by: str) -> bool:
        """True for the one caller, across every scheduler, that fires this slot."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "INSERT INTO fire_ledger (schedule, slot, run_id, claimed_by) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (schedule, slot) DO NOTHING RETURNING 1", schedule, slot, run_id, claimed_by)
        return row is not None

    async def slot_run(self, schedule: str, slot: datetime) -> str | None:
        """The run id the slot fired as, if it fired."""
        async with self._conn() as conn:
            value: str | None = await conn.fetchval(
                "SELECT run_id FROM fire_ledger WHERE schedule = $1 AND slot = $2", schedule, slot)
        return value

    # -------------------------------------------------------------------------------- launches

    async def add_launch(self, run_id: str, pipeline: str, params: Params) -> bool:
        """Queue a launch; False if this run id was queued before (a retry)."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "INSERT INTO launches (run_id, pipeline, params) VALUES ($1, $2, $3::jsonb) "
                "ON CONFLICT (run_id) DO NOTHING RETURNING 1", run_id, pipeline, _params_json.encode(params).decode())
        return row is not None

    async def claim_launches(self, worker: str, limit: int = 10) -> list[Launch]:
        """Up to `limit` unclaimed launches, oldest first, now this worker's: no other claimer gets them."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                """
                WITH picked AS (
                    SELECT run_id FROM launches WHERE claimed_by IS NULL
                    ORDER BY queued_at, run_id LIMIT $2 FOR UPDATE SKIP LOCKED
                )
                UPDATE launches SET claimed_by = $1, claimed_at = now() FROM picked
                WHERE launches.run_id = picked.run_id
                RETURNING launches.run_id, pipeline, params, queued_at
                """, worker, limit)
        launches = [Launch(r["run_id"], r["pipeline"], _params_decoder.decode(r["params"]), r["queued_at"]) for r in rows]
        return sorted(launches, key=lambda x: (x.queued_at, x.run_id))

    # ---------------------------------------------------------------------------------- leases

    async def acquire_lease(self, name: str, holder: str, ttl: float,
                            endpoints: Endpoints | None = None) -> Lease | None:
        """The lease if it is free or expired (then taken over: attempt + 1); None while another
        holder's, or this holder's own earlier one, is live (a restarted holder waits for expiry:
        its old incarnation may still be acting). `endpoints`: where the holder is reached (a
        scheduler leader's sockets), recorded with the lease in the same statement, so a reader
        never sees a new holder with the old one's endpoints."""
        ends = endpoints or Endpoints()
        async with self._conn() as conn:
            row = await conn.fetchrow(
                """
                INSERT INTO leases (name, holder, attempt, expires_at, dispatch, control, publish)
                VALUES ($1, $2, 1, now() + make_interval(secs => $3), $4, $5, $6)
                ON CONFLICT (name) DO UPDATE
                    SET holder = EXCLUDED.holder, attempt = leases.attempt + 1, expires_at = EXCLUDED.expires_at,
                        dispatch = EXCLUDED.dispatch, control = EXCLUDED.control, publish = EXCLUDED.publish
                    WHERE leases.expires_at < now()
                RETURNING name, holder, attempt, expires_at
                """, name, holder, float(ttl), ends.dispatch, ends.control, ends.publish)
        return Lease(row["name"], row["holder"], row["attempt"], row["expires_at"]) if row else None

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend the lease; LeaseLost if its token is no longer current."""
        async with self._conn() as conn:
            expires = await conn.fetchval(
                "UPDATE leases SET expires_at = now() + make_interval(secs => $3) "
                "WHERE name = $1 AND attempt = $2 RETURNING expires_at", lease.name, lease.attempt, float(ttl))
            if expires is None:
                raise _lost(lease, await conn.fetchval("SELECT attempt FROM leases WHERE name = $1", lease.name))
        return Lease(lease.name, lease.holder, lease.attempt, expires)

    async def holder(self, name: str) -> Holder | None:
        """The live holder of a lease (None when it is free or expired)."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT holder, attempt, dispatch, control, publish, "
                "extract(epoch FROM expires_at - now())::float8 AS left_s "
                "FROM leases WHERE name = $1 AND expires_at > now()", name)
        if row is None:
            return None
        return Holder(name, row["holder"], row["attempt"], Endpoints(row["dispatch"], row["control"], row["publish"]),
                      row["left_s"])

    async def release_lease(self, lease: Lease) -> None:
        """Give the lease up at once (a clean stop), if it is still ours."""
        async with self._conn() as conn:
            await conn.execute("UPDATE leases SET expires_at = '-infinity' WHERE name = $1 AND attempt = $2",
                               lease.name, lease.attempt)

    @asynccontextmanager
    async def fenced(self, lease: Lease) -> AsyncIterator[asyncpg.Connection]:
        """A transaction in which the lease's token is checked and held (FOR SHARE: a takeover waits
        for it to end): writes made on the yielded connection are the current holder's, or none are."""
        async with self._conn() as conn, conn.transaction():
            attempt = await conn.fetchval("SELECT attempt FROM leases WHERE name = $1 FOR SHARE", lease.name)
            if attempt != lease.attempt:
                raise _lost(lease, attempt)
            yield conn

    # ------------------------------------------------------------------------- runner registry

    async def register_runner(self, runner_id: str, publish: str, control: str, capacity: int) -> None:
        async with self._conn() as conn:
            await conn.execute(
                """
                INSERT INTO runners (runner_id, publish, control, capacity) VALUES ($1, $2, $3, $4)
                ON CONFLICT (runner_id) DO UPDATE SET publish = EXCLUDED.publish, control = EXCLUDED.control,
                    capacity = EXCLUDED.capacity, heartbeat_at = now()
                """, runner_id, publish, control, capacity)

    async def runner_heartbeat(self, runner_id: str) -> bool:
        """False if the runner is not registered (removed as lost: it must register again)."""
        async with self._conn() as conn:
            row = await conn.fetchrow("UPDATE runners SET heartbeat_at = now() WHERE runner_id = $1 RETURNING 1", runner_id)
        return row is not None

    async def runners(self, alive_within: float | None = None) -> list[RunnerRecord]:
        """The registry, by id; with `alive_within`, only runners heard from in that many seconds."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                """
                SELECT runner_id, publish, control, capacity, heartbeat_at,
                       extract(epoch FROM now() - heartbeat_at)::float8 AS age
                FROM runners WHERE $1::float8 IS NULL OR heartbeat_at >= now() - make_interval(secs => $1)
                ORDER BY runner_id
                """, alive_within)
        return [RunnerRecord(r["runner_id"], r["publish"], r["control"], r["capacity"], r["heartbeat_at"], r["age"])
                for r in rows]

    async def remove_runner(self, runner_id: str) -> bool:
        async with self._conn() as conn:
            row = await conn.fetchrow("DELETE FROM runners WHERE runner_id = $1 RETURNING 1", runner_id)
        return row is not None


def _discard(conn: asyncpg.Connection) -> None:
    """Close a pooled connection at once, so the pool opens a fresh one next time."""
    try:
        conn.terminate()
    except asyncpg.InterfaceError as e:  # the pool let go of it already (its server connection was lost)
        log.debug("cluster state: a broken connection was released by the pool already: %s", e)


def _refused(where: str, e: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"cluster state {where} (key `cluster.state`) refuses the connection: "
                              f"{type(e).__name__}: {e}")


def _unavailable(where: str, e: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"cluster state: PostgreSQL at {where} (key `cluster.state`) cannot be reached: "
                              f"{type(e).__name__}: {e}")


def _lost(lease: Lease, current: int | None = None) -> LeaseLost:
    now = "it no longer exists" if current is None else f"it is at attempt {current}"
    return LeaseLost(f"lease {lease.name}: {lease.holder}'s attempt {lease.attempt} is no longer current ({now}): "
                     "another holder took it over; stop acting for it")
