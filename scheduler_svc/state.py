"""The scheduler's small durable state in `<home>/state/scheduler.sqlite3`: pause flags, the last slot
evaluated per schedule, the fire-at-start marker, run -> (runner, attempt) assignments, launch
idempotency keys -> run id for a day (each key is also in its run's `queued` event, which stays the truth),
backfills: each one's window and plan (slot -> run id, fixed when it is made) and which of its runs
are queued, so a restarted scheduler carries on with the rest and never makes a slot's run twice; and
alert deliveries (pending ones, and for a week those done: scheduler_svc/alerts.py).

Journals remain the truth for whether a run exists and how it ended; this holds only what journals do
not say. stdlib sqlite3 in WAL mode with synchronous=FULL: every commit is durable when it returns,
one row changes per update (an assignment per dispatch: rewriting a whole JSON file for each would
cost more as runs pile up), and a kill -9 mid-write leaves the previous committed state.
All writes go through one worker thread at a time (`anyio.to_thread` with a limiter of 1), in order.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import anyio

from shared.errors import RunwireError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    paused INTEGER,            -- NULL: never paused or resumed; the config's `enabled` decides
    last_slot TEXT,            -- ISO UTC of the newest slot evaluated (fired, skipped or passed)
    start_fired_at TEXT        -- ISO UTC of the last fire_at_start
);
CREATE TABLE IF NOT EXISTS assignments (
    run_id TEXT PRIMARY KEY,
    runner TEXT NOT NULL,
    attempt INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,      -- the run this key launched (or is launching: its journal may not exist yet)
    fingerprint TEXT NOT NULL, -- pipeline and parameters of that launch: a reuse with others is refused
    created_at REAL NOT NULL   -- unix time; keys are kept for a day
);
CREATE TABLE IF NOT EXISTS backfills (
    id TEXT PRIMARY KEY,
    schedule TEXT NOT NULL,
    start TEXT NOT NULL,       -- ISO UTC, the window's ends (inclusive)
    end_ TEXT NOT NULL,
    policy TEXT NOT NULL,
    max_parallel INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS backfill_runs (
    backfill_id TEXT NOT NULL,
    pos INTEGER NOT NULL,      -- slot order
    slot TEXT NOT NULL,
    run_id TEXT NOT NULL,      -- fixed by the plan: its journal is created exclusively, so it runs once
    rerun_of TEXT,
    reason TEXT NOT NULL,
    queued INTEGER NOT NULL DEFAULT 0,  -- 1 once its journal exists (the journal is the truth; this saves a look)
    PRIMARY KEY (backfill_id, pos)
);
CREATE TABLE IF NOT EXISTS alert_deliveries (
    id TEXT PRIMARY KEY,       -- <run_id>.<alert>.<kind>: one delivery per run, alert and kind, ever
    run_id TEXT NOT NULL,
    alert TEXT NOT NULL,
    payload TEXT NOT NULL,     -- the JSON body, as POSTed on every attempt
    attempts INTEGER NOT NULL, -- attempts begun (counted before each POST)
    next_at REAL NOT NULL,     -- unix time of the next attempt
    state TEXT NOT NULL,       -- pending | sent | failed (kept a week: a delivery is never made twice)
    updated_at REAL NOT NULL
);
"""


@dataclass
class BackfillRow:
    id: str
    schedule: str
    start: str
    end: str
    policy: str
    max_parallel: int
    created_at: str
    done: bool


@dataclass
class BackfillRunRow:
    pos: int
    slot: str
    run_id: str
    rerun_of: str | None
    reason: str
    queued: bool


class StateError(RunwireError):
    """The scheduler's state database could not be opened or written (scheduler-only, so kept here)."""

    code = "state_error"


@dataclass
class ScheduleState:
    paused: bool | None = None
    last_slot: str | None = None
    start_fired_at: str | None = None


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StateError(f"scheduler state {path}: cannot open: {e} (remove it to start afresh; "
                             "journals keep every run)") from e
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reading (at start, on the event loop: small)

    def schedules(self) -> dict[str, ScheduleState]:
        rows = self._db.execute("SELECT name, paused, last_slot, start_fired_at FROM schedules").fetchall()
        return {n: ScheduleState(None if p is None else bool(p), s, f) for n, p, s, f in rows}

    def assignments(self) -> dict[str, tuple[str, int]]:
        rows = self._db.execute("SELECT run_id, runner, attempt FROM assignments").fetchall()
        return {r: (runner, attempt) for r, runner, attempt in rows}

    def idempotency_keys(self, since: float) -> list[tuple[str, str, str, float]]:
        """(key, run_id, fingerprint, created_at) of keys created after `since` (unix time)."""
        with self._lock:  # writes run in a worker thread on the same connection
            return self._db.execute("SELECT key, run_id, fingerprint, created_at FROM idempotency_keys "
                                    "WHERE created_at >= ?", (since,)).fetchall()

    # -- writing

    def _exec(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            try:
                self._db.execute(sql, args)
            except sqlite3.Error as e:
                raise StateError(f"scheduler state {self.path}: write failed: {e}") from e

    async def _write(self, sql: str, *args: object) -> None:
        await anyio.to_thread.run_sync(self._exec, sql, args, limiter=self._limiter)

    async def set_paused(self, name: str, paused: bool) -> None:
        await self._write("INSERT INTO schedules(name, paused) VALUES (?, ?) "
                          "ON CONFLICT(name) DO UPDATE SET paused = excluded.paused", name, int(paused))

    async def set_last_slot(self, name: str, slot_iso: str) -> None:
        await self._write("INSERT INTO schedules(name, last_slot) VALUES (?, ?) "
                          "ON CONFLICT(name) DO UPDATE SET last_slot = excluded.last_slot", name, slot_iso)

    async def set_start_fired(self, name: str, at_iso: str) -> None:
        await self._write("INSERT INTO schedules(name, start_fired_at) VALUES (?, ?) "
                          "ON CONFLICT(name) DO UPDATE SET start_fired_at = excluded.start_fired_at", name, at_iso)

    async def assign(self, run_id: str, runner: str, attempt: int) -> None:
        await self._write("INSERT OR REPLACE INTO assignments(run_id, runner, attempt) VALUES (?, ?, ?)",
                          run_id, runner, attempt)

    async def remember_key(self, key: str, run_id: str, fingerprint: str, created_at: float) -> None:
        await self._write("INSERT OR REPLACE INTO idempotency_keys(key, run_id, fingerprint, created_at) "
                          "VALUES (?, ?, ?, ?)", key, run_id, fingerprint, created_at)

    async def forget_keys(self, before: float) -> None:
        await self._write("DELETE FROM idempotency_keys WHERE created_at < ?", before)

    # -- backfills

    async def load_backfills(self) -> list[tuple[BackfillRow, list[BackfillRunRow]]]:
        """Every backfill with its runs, oldest first (at start: they are few)."""
        return await anyio.to_thread.run_sync(self._backfills_sync, limiter=self._limiter)

    def _backfills_sync(self) -> list[tuple[BackfillRow, list[BackfillRunRow]]]:
        with self._lock:
            heads = self._db.execute("SELECT id, schedule, start, end_, policy, max_parallel, created_at, done "
                                     "FROM backfills ORDER BY created_at, id").fetchall()
            out = []
            for row in heads:
                runs = self._db.execute("SELECT pos, slot, run_id, rerun_of, reason, queued FROM backfill_runs "
                                        "WHERE backfill_id = ? ORDER BY pos", (row[0],)).fetchall()
                id_, schedule, start, end, policy, max_parallel, created_at, done = row
                head = BackfillRow(id_, schedule, start, end, policy, max_parallel, created_at, bool(done))
                out.append((head, [BackfillRunRow(pos, slot, run_id, rerun_of, reason, bool(queued))
                                   for pos, slot, run_id, rerun_of, reason, queued in runs]))
            return out

    def _add_backfill_sync(self, head: BackfillRow, runs: list[BackfillRunRow]) -> None:
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.execute("INSERT INTO backfills(id, schedule, start, end_, policy, max_parallel, created_at, "
                                     "done) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                                     (head.id, head.schedule, head.start, head.end, head.policy, head.max_parallel,
                                      head.created_at))
                    self._db.executemany("INSERT INTO backfill_runs(backfill_id, pos, slot, run_id, rerun_of, reason) "
                                         "VALUES (?, ?, ?, ?, ?, ?)",
                                         [(head.id, r.pos, r.slot, r.run_id, r.rerun_of, r.reason) for r in runs])
            except sqlite3.Error as e:
                raise StateError(f"scheduler state {self.path}: cannot record backfill {head.id}: {e}") from e

    async def add_backfill(self, head: BackfillRow, runs: list[BackfillRunRow]) -> None:
        """The backfill and its whole plan, in one transaction: after a crash it is there entirely or not at all."""
        await anyio.to_thread.run_sync(self._add_backfill_sync, head, runs, limiter=self._limiter)

    async def backfill_run_queued(self, backfill_id: str, pos: int) -> None:
        await self._write("UPDATE backfill_runs SET queued = 1 WHERE backfill_id = ? AND pos = ?", backfill_id, pos)

    async def backfill_done(self, backfill_id: str) -> None:
        await self._write("UPDATE backfills SET done = 1 WHERE id = ?", backfill_id)

    def forget_sync(self, run_ids: list[str]) -> None:
        """Drop assignments of ended runs (at start, in one transaction)."""
        if not run_ids:
            return
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM assignments WHERE run_id = ?", [(r,) for r in run_ids])


@dataclass
class AlertDelivery:
    id: str
    run_id: str
    alert: str
    payload: str
    attempts: int
    next_at: float  # unix time
    state: str = "pending"


class AlertStore:
    """The alert deliveries' rows, on the state's connection and its one writer thread."""

    def __init__(self, state: StateStore) -> None:
        self._state = state

    async def load(self, done_since: float) -> tuple[list[AlertDelivery], set[str]]:
        """(pending deliveries, ids of every delivery known); rows done before `done_since` are dropped.
        At start, and small: on the loop."""
        st = self._state
        with st._lock:
            try:
                st._db.execute("DELETE FROM alert_deliveries WHERE state != 'pending' AND updated_at < ?", (done_since,))
                rows = st._db.execute("SELECT id, run_id, alert, payload, attempts, next_at, state "
                                      "FROM alert_deliveries").fetchall()
            except sqlite3.Error as e:
                raise StateError(f"scheduler state {st.path}: alert deliveries: {e}") from e
        pending = [AlertDelivery(*row) for row in rows if row[6] == "pending"]
        return pending, {row[0] for row in rows}

    async def add(self, d: AlertDelivery, now: float) -> None:
        await self._state._write("INSERT OR IGNORE INTO alert_deliveries(id, run_id, alert, payload, attempts, next_at, "
                                 "state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 d.id, d.run_id, d.alert, d.payload, d.attempts, d.next_at, d.state, now)

    async def update(self, d: AlertDelivery, now: float) -> None:
        await self._state._write("UPDATE alert_deliveries SET attempts = ?, next_at = ?, state = ?, updated_at = ? "
                                 "WHERE id = ?", d.attempts, d.next_at, d.state, now, d.id)
