"""What the scheduler leader keeps in PostgreSQL beyond the ledger and the leases: the runs it created
(so a standby that takes over knows each one's runner and attempt), launches with their idempotency
keys, and the schedules' state (paused, bookmark).

Every write of the leader is made through `ClusterState.fenced(lease)`: a leader that was taken over
(killed, paused, cut off) changes nothing more, it gets LeaseLost. A run row is created in the same
transaction as what decided the run (a slot's ledger row, a launch's claim): a leader killed right
after it leaves a row whose `queued` event may be missing from the event stream, and the next leader
writes it (a slot is never lost, a launch never dropped).

`add_launch_keyed` is what a gateway (or the leader's control socket) calls to queue a launch: a key
used again within KEY_TTL answers the first launch's run, with the same pipeline and parameters only.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from shared.control import check_idempotency_key
from shared.errors import Conflict
from shared.ids import new_run_id
from shared.replies import LaunchResult
from shared.values import Params

from .state import ClusterState, Launch, Lease

SCHEDULER_LEASE = "scheduler"  # the lease the leading scheduler holds
log = logging.getLogger(__name__)

KEY_TTL = 86_400.0  # seconds a launch's idempotency key answers with its first run

_json = msgspec.json.Encoder()
_canonical = msgspec.json.Encoder(order="sorted")
_object = msgspec.json.Decoder(dict[str, Any])


def fingerprint(pipeline: str, params: Params) -> str:
    """What a key was used for: a reuse of the key for another launch is refused."""
    return hashlib.sha256(_canonical.encode([pipeline, params])).hexdigest()


class RunRow(msgspec.Struct):
    run_id: str
    pipeline: str
    params: dict[str, Any]
    trigger: dict[str, Any]  # the `queued` event's trigger fields (trigger, schedule, slot, idempotency_key...)
    msg: str = ""  # the `queued` event's msg ("" = the journal's default)
    runner: str | None = None
    attempt: int = 0  # 0 = never dispatched
    outcome: str | None = None  # None while active
    skip: str | None = None  # a slot decided "skip": why (its run is recorded skipped, never dispatched)


class KeyedLaunch(msgspec.Struct, frozen=True):
    run_id: str
    status: str  # queued | running | success | failure | cancelled
    replayed: bool


def _status(outcome: str | None, attempt: int | None) -> str:
    return outcome or ("running" if attempt else "queued")


def _row(r: asyncpg.Record) -> RunRow:
    return RunRow(r["run_id"], r["pipeline"], _object.decode(r["params"]), _object.decode(r["trigger"]), r["msg"],
                  r["runner"], r["attempt"], r["outcome"], r["skip"])


async def _insert_run(conn: asyncpg.Connection, row: RunRow, holder: str) -> bool:
    found = await conn.fetchrow(
        "INSERT INTO runs (run_id, pipeline, params, trigger, msg, skip, created_by) "
        "VALUES ($1, $2, $3::jsonb, $4::jsonb, $5, $6, $7) ON CONFLICT (run_id) DO NOTHING RETURNING 1",
        row.run_id, row.pipeline, _json.encode(row.params).decode(), _json.encode(row.trigger).decode(), row.msg,
        row.skip, holder)
    return found is not None


class LeaderState:
    """The leader's queries, on a ClusterState."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    # ------------------------------------------------------------------------------- launches

    async def add_launch_keyed(self, run_id: str, pipeline: str, params: Params, key: str | None) -> KeyedLaunch:
        """Queue a launch as `run_id`; with a key seen within KEY_TTL, the first launch's run instead
        (Conflict when that one had another pipeline or other parameters)."""
        if key is None:
            await self.state.add_launch(run_id, pipeline, params)
            return KeyedLaunch(run_id, "queued", False)
        fp = fingerprint(pipeline, params)
        async with self.state.connection() as conn, conn.transaction():
            # a key older than KEY_TTL is free again: its old launch keeps its run, loses the key
            await conn.execute("UPDATE launches SET idempotency_key = NULL WHERE idempotency_key = $1 "
                               "AND queued_at < now() - make_interval(secs => $2)", key, KEY_TTL)
            added = await conn.fetchrow(
                "INSERT INTO launches (run_id, pipeline, params, idempotency_key, fingerprint) "
                "VALUES ($1, $2, $3::jsonb, $4, $5) "
                "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING 1",
                run_id, pipeline, _json.encode(params).decode(), key, fp)
            if added is not None:
                return KeyedLaunch(run_id, "queued", False)
            first = await conn.fetchrow(
                "SELECT l.run_id, l.fingerprint, r.outcome, r.attempt FROM launches l "
                "LEFT JOIN runs r ON r.run_id = l.run_id WHERE l.idempotency_key = $1", key)
        if first is None:  # taken and freed between our statements: a caller's retry settles it
            raise Conflict(f"Idempotency-Key {key!r} is being used by a concurrent launch; try again")
        if first["fingerprint"] != fp:
            raise Conflict(f"Idempotency-Key {key!r} was used for another launch (run {first['run_id']}, another "
                           "pipeline or other parameters): send a new key for a new launch")
        return KeyedLaunch(first["run_id"], _status(first["outcome"], first["attempt"]), True)

    async def queue_launch(self, pipeline: str, params: Params, key: str | None) -> LaunchResult:
        """A launch queued as a new run (a gateway's POST, or a scheduler's control socket), or with a
        key seen before, the first launch's run; ServiceUnavailable when the database is away."""
        if key is not None:
            check_idempotency_key(key)
        got = await self.add_launch_keyed(new_run_id(), pipeline, params, key)
        if got.replayed:
            log.info("launch of %s with idempotency key %r: run %s exists (%s); answered it, no new run",
                     pipeline, key, got.run_id, got.status)
        else:
            log.info("launch of %s queued as run %s in the cluster's launches", pipeline, got.run_id)
        return LaunchResult(run_id=got.run_id, status=got.status, replayed=got.replayed)  # type: ignore[arg-type]

    async def take_launches(self, lease: Lease, limit: int = 20) -> list[tuple[Launch, str | None]]:
        """Claim up to `limit` launches (oldest first, SKIP LOCKED) and create their run rows, in one
        fenced transaction; each with its idempotency key."""
        async with self.state.fenced(lease) as conn:
            rows = await conn.fetch(
                """
                WITH picked AS (
                    SELECT run_id FROM launches WHERE claimed_by IS NULL
                    ORDER BY queued_at, run_id LIMIT $2 FOR UPDATE SKIP LOCKED
                )
                UPDATE launches SET claimed_by = $1, claimed_at = now() FROM picked
                WHERE launches.run_id = picked.run_id
                RETURNING launches.run_id, pipeline, params, queued_at, idempotency_key
                """, lease.holder, limit)
            out = []
            for r in sorted(rows, key=lambda r: (r["queued_at"], r["run_id"])):
                launch = Launch(r["run_id"], r["pipeline"], _object.decode(r["params"]), r["queued_at"])
                key = r["idempotency_key"]
                trigger: dict[str, Any] = {"trigger": "manual"}
                if key is not None:
                    trigger["idempotency_key"] = key
                await _insert_run(conn, RunRow(launch.run_id, launch.pipeline, dict(launch.params), trigger), lease.holder)
                out.append((launch, key))
        return out

    # ---------------------------------------------------------------------------------- runs

    async def claim_slot_run(self, lease: Lease, schedule: str, slot: datetime, row: RunRow) -> str | None:
        """Claim the slot for `row` and create the row, in one fenced transaction. None when this
        caller fires it; else who claimed it before (and as which run)."""
        async with self.state.fenced(lease) as conn:
            won = await conn.fetchrow(
                "INSERT INTO fire_ledger (schedule, slot, run_id, claimed_by) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (schedule, slot) DO NOTHING RETURNING 1", schedule, slot, row.run_id, lease.holder)
            if won is None:
                before = await conn.fetchrow("SELECT run_id, claimed_by FROM fire_ledger WHERE schedule = $1 AND slot = $2",
                                             schedule, slot)
                return f"{before['claimed_by']} as run {before['run_id']}" if before else "another scheduler"
            await _insert_run(conn, row, lease.holder)
        return None

    async def add_run(self, lease: Lease, row: RunRow) -> bool:
        """A run row (a re-run, a backfill's run); False if it was there."""
        async with self.state.fenced(lease) as conn:
            return await _insert_run(conn, row, lease.holder)

    async def run_dispatched(self, lease: Lease, run_id: str, runner: str, attempt: int) -> None:
        async with self.state.fenced(lease) as conn:
            await conn.execute("UPDATE runs SET runner = $2, attempt = $3 WHERE run_id = $1", run_id, runner, attempt)

    async def runs_ended(self, lease: Lease, ends: list[tuple[str, str]]) -> None:
        """(run id, outcome) of runs that ended."""
        async with self.state.fenced(lease) as conn:
            await conn.executemany("UPDATE runs SET outcome = $2, ended_at = now() WHERE run_id = $1 AND outcome IS NULL",
                                   ends)

    async def active_runs(self) -> list[RunRow]:
        """The runs not ended, oldest first."""
        async with self.state.connection() as conn:
            rows = await conn.fetch("SELECT * FROM runs WHERE outcome IS NULL ORDER BY created_at, run_id")
        return [_row(r) for r in rows]

    async def run(self, run_id: str) -> RunRow | None:
        async with self.state.connection() as conn:
            r = await conn.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
        return _row(r) if r is not None else None

    async def runs(self, run_ids: list[str]) -> list[RunRow]:
        """The rows of these runs that exist."""
        async with self.state.connection() as conn:
            rows = await conn.fetch("SELECT * FROM runs WHERE run_id = ANY($1::text[])", run_ids)
        return [_row(r) for r in rows]

    async def slot_runs(self, schedule: str, slots: list[str]) -> list[RunRow]:
        """Every run of these slots (ISO UTC) of a schedule, whoever made it (the schedule, a backfill),
        by the `schedule` and `slot` of its trigger."""
        async with self.state.connection() as conn:
            rows = await conn.fetch("SELECT * FROM runs WHERE trigger->>'schedule' = $1 AND trigger->>'slot' = ANY($2::text[])",
                                    schedule, slots)
        return [_row(r) for r in rows]

    # ------------------------------------------------------------------------------ schedules

    async def schedule_states(self) -> dict[str, tuple[bool | None, datetime | None, datetime | None]]:
        """name -> (paused, bookmark: the latest of its last evaluated slot and its ledger's newest slot,
        start fired at)."""
        async with self.state.connection() as conn:
            rows = await conn.fetch(
                """
                SELECT coalesce(s.name, l.schedule) AS name, s.paused, s.start_fired_at,
                       greatest(s.last_slot, l.slot) AS last_slot
                FROM schedule_state s
                FULL JOIN (SELECT schedule, max(slot) AS slot FROM fire_ledger GROUP BY schedule) l ON l.schedule = s.name
                """)
        return {r["name"]: (r["paused"], r["last_slot"], r["start_fired_at"]) for r in rows}

    async def set_schedule(self, lease: Lease, name: str, *, paused: bool | None = None,
                           last_slot: datetime | None = None, start_fired_at: datetime | None = None) -> None:
        """Change the fields given (None: unchanged)."""
        async with self.state.fenced(lease) as conn:
            await conn.execute(
                """
                INSERT INTO schedule_state (name, paused, last_slot, start_fired_at) VALUES ($1, $2, $3, $4)
                ON CONFLICT (name) DO UPDATE SET paused = coalesce($2, schedule_state.paused),
                    last_slot = coalesce($3, schedule_state.last_slot),
                    start_fired_at = coalesce($4, schedule_state.start_fired_at)
                """, name, paused, last_slot, start_fired_at)
