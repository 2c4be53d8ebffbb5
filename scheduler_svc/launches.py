"""Launches requested on the control socket: the commit of a run, bounded by the request's deadline, and
idempotency keys, so a client that retries a launch gets the first run, never a second.

A launch is committed when its `queued` event is durable. The deadline is checked before that and
right after: a launch whose deadline passed meanwhile is ended `cancelled` (the client has given up or
is about to, and will answer "not done"), and is never dispatched. A key is remembered (state file,
fsynced) before its run's journal is created, and written into the `queued` event's data as
`idempotency_key`: the journals stay the truth, and a key whose run never came to exist (the scheduler
stopped in between) or expired before it was acknowledged is free again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import msgspec

from shared.config import Settings
from shared.control import Launch, check_idempotency_key
from shared.errors import Conflict, JournalError, ServiceUnavailable
from shared.ids import new_run_id
from shared.journal import JournalReader, begin_run, journal_path
from shared.params import resolve_params
from shared.replies import LaunchResult

from .journaling import Journaling
from .runbook import RunBook
from .runs import RunRecord, record_from_queued
from .state import StateStore

log = logging.getLogger(__name__)

KEY_TTL = 86_400.0  # seconds a key answers with its first run
_PURGE_EVERY = 3_600.0
EXPIRED = "launch expired before it was acknowledged"

_canonical = msgspec.json.Encoder(order="sorted")


def fingerprint(pipeline: str, params: dict[str, Any]) -> str:
    """What a key was used for: a reuse of the key for another launch is refused."""
    return hashlib.sha256(_canonical.encode([pipeline, params])).hexdigest()


def is_expired(rec: RunRecord) -> bool:
    return rec.phase == "ended" and rec.outcome == "cancelled" and rec.msg.startswith(EXPIRED)


@dataclass
class KeyEntry:
    run_id: str
    fingerprint: str
    created_at: float  # unix time


class Launches:
    def __init__(self, book: RunBook, settings: Settings, state: StateStore, journaling: Journaling) -> None:
        self.book = book
        self.settings = settings
        self.journal_dir = settings.journal_dir
        self.state = state
        self.journaling = journaling
        self.keys: dict[str, KeyEntry] | None = None  # loaded on the first keyed launch
        self._locks: dict[str, anyio.Lock] = {}
        self._purged_at = 0.0
        self.now: Callable[[], float] = time.time  # what request deadlines are compared with (unix time)

    async def launch(self, req: Launch) -> LaunchResult:
        params = resolve_params(self.settings.pipeline(req.pipeline), req.params)
        if req.idempotency_key is None:
            return await self._commit(req, params, new_run_id(), None)
        key = check_idempotency_key(req.idempotency_key)
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:  # two requests with one key: the second answers the first's run
                return await self._keyed(req, params, key)
        finally:
            if not lock.locked():
                self._locks.pop(key, None)

    async def _keyed(self, req: Launch, params: dict[str, Any], key: str) -> LaunchResult:
        keys = await self._keys()
        fp = fingerprint(req.pipeline, params)
        now = time.time()
        entry = keys.get(key)
        if entry is not None and now - entry.created_at < KEY_TTL:
            rec = self.book.get(entry.run_id)
            if rec is not None and not is_expired(rec):
                if entry.fingerprint != fp:
                    raise Conflict(f"Idempotency-Key {key!r} was used for another launch (run {entry.run_id}, "
                                   "another pipeline or other parameters): send a new key for a new launch")
                log.info("launch of %s with idempotency key %r: run %s exists (%s); answered it, no new run",
                         req.pipeline, key, rec.run_id, rec.status)
                return LaunchResult(run_id=rec.run_id, status=rec.status, replayed=True)  # type: ignore[arg-type]
            log.info("idempotency key %r: its run %s %s; launching anew", key, entry.run_id,
                     "expired before it was acknowledged" if rec is not None else "was never queued")
        self._check_deadline(req, "before its key was remembered")
        run_id = new_run_id()
        await self.state.remember_key(key, run_id, fp, now)
        keys[key] = KeyEntry(run_id, fp, now)
        return await self._commit(req, params, run_id, key)

    def _check_deadline(self, req: Launch, when: str) -> None:
        if req.deadline and self.now() > req.deadline:
            log.warning("launch of %s (request %d): its deadline passed %s; not acted on", req.pipeline, req.id, when)
            raise ServiceUnavailable(f"launch of {req.pipeline}: its deadline passed {when}; not acted on")

    async def _commit(self, req: Launch, params: dict[str, Any], run_id: str, key: str | None) -> LaunchResult:
        trigger: dict[str, Any] = {"trigger": "manual"}
        if key is not None:
            trigger["idempotency_key"] = key
        self._check_deadline(req, "before it was queued")
        ev = await anyio.to_thread.run_sync(begin_run, self.journal_dir, run_id, self.settings.tz, req.pipeline,
                                            params, trigger)
        rec = record_from_queued(ev)
        self.book.record(rec)  # not in the queue yet: nothing dispatches it before the check below
        await self.journaling.publish(ev)
        if req.deadline and self.now() > req.deadline:
            reason = f"{EXPIRED}: the request's deadline passed while the run was being queued"
            log.warning("run %s (%s, request %d): %s; ending it cancelled, it will not run",
                        run_id, req.pipeline, req.id, reason)
            await self.journaling.end_run(rec, "cancelled", reason, {"reason": reason})
            raise ServiceUnavailable(f"launch of {req.pipeline}: {reason} (run {run_id} ended cancelled; it will not run)")
        self.book.enqueue(rec)
        log.info("run %s (%s) queued on request%s", rec.run_id, rec.pipeline,
                 f" (idempotency key {key!r})" if key is not None else "")
        return LaunchResult(run_id=rec.run_id, status="queued")

    # ------------------------------------------------------------------------------------ the keys

    async def _keys(self) -> dict[str, KeyEntry]:
        runs = self.book.runs
        now = time.time()
        if self.keys is None:
            keys = {key: KeyEntry(run_id, fp, created)
                    for key, run_id, fp, created in
                    await anyio.to_thread.run_sync(self.state.idempotency_keys, now - KEY_TTL)}
            # journals are the truth: a key in a `queued` event counts even when the state file lacks it
            # (removed, or rewound), and wins over a state entry whose run never came to exist
            day = time.strftime("%Y%m%d", time.gmtime(now - KEY_TTL))
            recent = [rec for run_id, rec in runs.items()
                      if rec.trigger == "manual" and run_id[:8] >= day and not is_expired(rec)]
            for key, rec, created in await anyio.to_thread.run_sync(self._keys_in_journals, recent):
                entry = keys.get(key)
                if created >= now - KEY_TTL and (entry is None or entry.run_id not in runs
                                                 or is_expired(runs[entry.run_id])):
                    keys[key] = KeyEntry(rec.run_id, fingerprint(rec.pipeline, rec.params), created)
            self.keys = keys
            log.info("idempotency keys of the last day: %d (state %s, journals %s)",
                     len(keys), self.state.path, self.journal_dir)
        if now - self._purged_at > _PURGE_EVERY:
            self._purged_at = now
            await self.state.forget_keys(now - KEY_TTL)
            for key in [k for k, e in self.keys.items() if now - e.created_at >= KEY_TTL]:
                del self.keys[key]
        return self.keys

    def _keys_in_journals(self, recs: list[RunRecord]) -> list[tuple[str, RunRecord, float]]:
        """(key, run, unix time queued) for each run whose `queued` event carries an idempotency key."""
        out: list[tuple[str, RunRecord, float]] = []
        for rec in recs:
            try:
                head = JournalReader(journal_path(self.journal_dir, rec.run_id), rec.run_id).read(0, 1)
            except (JournalError, OSError) as e:
                log.warning("run %s: cannot read its queued event for an idempotency key: %s", rec.run_id, e)
                continue
            data = head[0].data if head else None
            key = data.get("idempotency_key") if isinstance(data, dict) else None
            if isinstance(key, str):
                out.append((key, rec, datetime.fromisoformat(head[0].timestamp).timestamp()))
        return out
