"""Cluster mode: alert deliveries in the cluster's database instead of this host's state, so a
scheduler that takes over resumes the deliveries the last leader left pending and knows every one
already made (a run's alert is made once whichever scheduler sees its end). Same rows and rules as
state.AlertStore. The database away while a delivery is stored is a StateError, which alerts.py logs
and survives; at the term's start (load) it is ServiceUnavailable, and the term steps down."""

from __future__ import annotations

import asyncpg

from runwire_cluster.state import ClusterState
from shared.errors import ServiceUnavailable

from .state import AlertDelivery, StateError


class ClusterAlertStore:
    def __init__(self, state: ClusterState) -> None:
        self._state = state

    async def load(self, done_since: float) -> tuple[list[AlertDelivery], set[str]]:
        try:
            async with self._state.connection() as conn:
                await conn.execute("DELETE FROM alert_deliveries WHERE state != 'pending' AND updated_at < $1", done_since)
                rows = await conn.fetch("SELECT id, run_id, alert, payload, attempts, next_at, state FROM alert_deliveries")
        except asyncpg.PostgresError as e:  # ServiceUnavailable passes: the term steps down and tries again
            raise StateError(f"cluster state {self._state.where}: alert deliveries: {e}") from e
        pending = [AlertDelivery(*r) for r in rows if r["state"] == "pending"]
        return pending, {r["id"] for r in rows}

    async def add(self, d: AlertDelivery, now: float) -> None:
        await self._write("INSERT INTO alert_deliveries (id, run_id, alert, payload, attempts, next_at, state, updated_at) "
                          "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                          d.id, d.run_id, d.alert, d.payload, d.attempts, d.next_at, d.state, now)

    async def update(self, d: AlertDelivery, now: float) -> None:
        await self._write("UPDATE alert_deliveries SET attempts = $2, next_at = $3, state = $4, updated_at = $5 "
                          "WHERE id = $1", d.id, d.attempts, d.next_at, d.state, now)

    async def _write(self, sql: str, *args: object) -> None:
        try:
            async with self._state.connection() as conn:
                await conn.execute(sql, *args)
        except (ServiceUnavailable, asyncpg.PostgresError) as e:
            raise StateError(f"cluster state {self._state.where}: alert delivery: {e}") from e
