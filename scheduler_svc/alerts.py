"""Alerts (`[alerts.<name>]`): webhooks POSTed when runs fail, are cancelled, run long, are skipped slots
or lose their runner. One task in the scheduler's group; the run book tells it of each end
(`RunBook.on_end`, which only queues), and it looks at the active runs' start times for long runs.
What to send is decided in `alert_rules.py`.

Deliveries are durable: each is stored in the scheduler's state (`AlertStore`) before its first attempt,
its attempt count before each POST, and its end (sent, or failed after its retries) after; a scheduler
restarted, even after kill -9, carries on with the pending ones. A delivery whose success was recorded is
never made again (its row is kept a week); one interrupted between the answer and the record is made
again: at least once, with the delivery's id in the body (`id`) and in `X-Runwire-Alert-Id`, so a
receiver can drop the repeat. Every attempt is appended to `<home>/alerts/<run_id>.jsonl`
(shared/alertlog.py), where the gateway reads it for the run page. Nothing here blocks or ends a run.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import aiohttp
import anyio
import anyio.abc
import msgspec

from shared.alertlog import AlertAttempt, append_attempt
from shared.errors import JournalError
from shared.journal import read_events
from shared.runstate import fold

from .alert_rules import (
    Rule,
    RunFacts,
    choose,
    delivery_id,
    end_kinds,
    needs_journal,
    payload_of,
)
from .runbook import RunBook
from .runs import RunRecord
from .state import AlertDelivery, StateError

log = logging.getLogger(__name__)

KEEP_DONE = 7 * 86_400.0  # seconds a sent or failed delivery is remembered (never made twice)
CATCH_UP = 86_400.0  # at start: ends found in the journals this recent are checked for a lost alert
MAX_POSTS = 8  # webhook requests in flight at once

_encode = msgspec.json.Encoder().encode


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


class AlertRecords(Protocol):
    """Where deliveries are kept: this host's state (state.AlertStore), or in cluster mode the
    cluster's database (cluster_alerts.py), so a takeover resumes and never repeats them. Failures
    raise StateError."""

    async def load(self, done_since: float) -> tuple[list[AlertDelivery], set[str]]: ...

    async def add(self, d: AlertDelivery, now: float) -> None: ...

    async def update(self, d: AlertDelivery, now: float) -> None: ...


class Alerts:
    def __init__(self, rules: list[Rule], store: AlertRecords, book: RunBook, journal_dir: Path, home: Path,
                 link_base: str) -> None:
        self.rules = {r.name: r for r in rules}
        self.store = store
        self.book = book
        self.journal_dir = journal_dir
        self.home = home
        self.link_base = link_base
        self._known: set[str] = set()  # ids of every delivery made or pending (from the state, then here)
        self._ends_out, self._ends_in = anyio.create_memory_object_stream[RunRecord](math.inf)
        self._limiter = anyio.CapacityLimiter(MAX_POSTS)
        self._session: aiohttp.ClientSession | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------------------------ input

    def notice(self, rec: RunRecord) -> None:
        """A run ended (RunBook.on_end): queued for the alerts task, never blocking the caller."""
        if not self.rules:
            return
        try:
            self._ends_out.send_nowait(rec)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.warning("run %s ended (%s) while the scheduler stops: its alerts are checked at the next start",
                        rec.run_id, rec.outcome)

    def catch_up(self, recs: list[RunRecord], now: float) -> None:
        """At start: runs the journals show ended (while the scheduler was down, or just before it
        stopped) whose alerts may not have been stored; those already made are recognised by id."""
        for rec in recs:
            try:
                ended = datetime.fromisoformat(rec.ended_at or "").timestamp()
            except ValueError:
                continue
            if now - ended <= CATCH_UP:
                self.notice(rec)

    # ------------------------------------------------------------------------------------ the task

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self._ends_out.close()  # ends from here on are logged by notice(), and checked at the next start

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        pending, self._known = await self.store.load(time.time() - KEEP_DONE)  # at start, small
        async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg, self._ends_in:
            self._session, self._tg = session, tg
            for d in pending:
                rule = self.rules.get(d.alert)
                if rule is None:
                    log.warning("alert delivery %s: alert %r is no longer configured; dropped after %d attempt(s)",
                                d.id, d.alert, d.attempts)
                    d.state = "failed"
                    await self._save(d)
                    continue
                log.info("alert delivery %s resumed after %d attempt(s)", d.id, d.attempts)
                tg.start_soon(self._deliver, rule, d)
            if not self.rules:
                task_status.started()
                return  # no alert configured: nothing to watch (notice() queues nothing)
            if any(r.long_run_after is not None for r in self.rules.values()):
                tg.start_soon(self._watch_long_runs)
            task_status.started()
            async for rec in self._ends_in:
                tg.start_soon(self._on_end, rec)

    async def _on_end(self, rec: RunRecord) -> None:
        rules = [r for r in self.rules.values() if r.wants(rec.pipeline)]
        if not rules or rec.outcome == "success":
            return
        facts = RunFacts.of(rec)
        if needs_journal(rec):
            facts = await anyio.to_thread.run_sync(self._facts_from_journal, rec)
        for rule, kind in choose(rules, rec.pipeline, end_kinds(rec, facts)):
            await self._create(rule, kind, facts)

    def _facts_from_journal(self, rec: RunRecord) -> RunFacts:
        try:
            events = read_events(self.journal_dir, rec.run_id)
        except (JournalError, OSError) as e:
            log.error("run %s: journal unreadable for its alert (%s): sent without its failed stages", rec.run_id, e)
            return RunFacts.of(rec)
        state = fold(rec.run_id, events)
        skipped = any(e.stage == "pipeline" and e.event == "skipped" for e in events)
        failed = [s.name for s in state.stages.values() if s.status == "failure"]
        return RunFacts.of(rec, failed_stages=failed, skipped=skipped)

    async def _watch_long_runs(self) -> None:
        rules = [r for r in self.rules.values() if r.long_run_after is not None]
        tick = min(1.0, min(r.long_run_after or 1.0 for r in rules) / 4)
        while True:
            await anyio.sleep(tick)
            now = datetime.now(timezone.utc)
            for rec in list(self.book.active.values()):
                if rec.phase != "running" or rec.started_at is None:
                    continue
                try:
                    running_for = (now - datetime.fromisoformat(rec.started_at)).total_seconds()
                except ValueError:
                    continue
                for rule in rules:
                    assert rule.long_run_after is not None
                    if (running_for >= rule.long_run_after and rule.wants(rec.pipeline)
                            and delivery_id(rec.run_id, rule.name, "long_run") not in self._known):
                        await self._create(rule, "long_run", RunFacts.of(rec), running_for)

    # ------------------------------------------------------------------------------------ delivery

    async def _create(self, rule: Rule, kind: str, facts: RunFacts, running_for: float | None = None) -> None:
        did = delivery_id(facts.run_id, rule.name, kind)
        if did in self._known:
            return  # made (or being made) already: a run's alert is sent once
        self._known.add(did)
        body = payload_of(rule, kind, facts, self.link_base, _utc_now(), running_for)
        d = AlertDelivery(id=did, run_id=facts.run_id, alert=rule.name, payload=_encode(body).decode(),
                          attempts=0, next_at=time.time())
        try:
            await self.store.add(d, time.time())
        except StateError as e:
            log.error("alert delivery %s could not be stored (%s): sending it anyway; a restart forgets it", did, e)
        log.info("alert %s: %s of run %s (%s) to send", rule.name, kind, facts.run_id, facts.pipeline)
        assert self._tg is not None
        self._tg.start_soon(self._deliver, rule, d)

    async def _deliver(self, rule: Rule, d: AlertDelivery) -> None:
        while d.state == "pending":
            delay = d.next_at - time.time()
            if delay > 0:
                await anyio.sleep(delay)
            d.attempts += 1
            await self._save(d)  # counted before the POST: after a crash the next attempt is numbered on
            status, error = await self._post(rule, d)
            if error is None:
                d.state = "sent"
            elif d.attempts >= rule.attempts:
                d.state = "failed"
            else:
                d.next_at = time.time() + rule.backoff(d.attempts)
            outcome = {"sent": "sent", "failed": "failed"}.get(d.state, "retrying")
            await self._record(d, status, error, outcome)
            await self._save(d)
            if d.state == "sent":
                log.info("alert delivery %s sent (%s, attempt %d)", d.id, status, d.attempts)
            elif d.state == "failed":
                log.error("alert delivery %s failed after %d attempt(s): %s", d.id, d.attempts, error)
            else:
                log.warning("alert delivery %s attempt %d failed: %s; next in %.1f s", d.id, d.attempts, error,
                            d.next_at - time.time())

    async def _post(self, rule: Rule, d: AlertDelivery) -> tuple[int | None, str | None]:
        """(HTTP status, error): error None for a 2xx."""
        assert self._session is not None
        headers = {**rule.cfg.headers, "Content-Type": "application/json", "X-Runwire-Alert-Id": d.id,
                   "X-Runwire-Alert-Attempt": str(d.attempts)}
        try:
            async with self._limiter:
                async with self._session.post(rule.cfg.url, data=d.payload.encode(), headers=headers,
                                              allow_redirects=False,
                                              timeout=aiohttp.ClientTimeout(total=rule.cfg.timeout)) as resp:
                    if 200 <= resp.status < 300:
                        return resp.status, None
                    body = (await resp.content.read(200)).decode("utf-8", "replace").strip()
                    return resp.status, f"HTTP {resp.status}" + (f": {body}" if body else "")
        except TimeoutError:
            return None, f"no answer within {rule.cfg.timeout:g} s"
        except aiohttp.ClientError as e:
            return None, f"{type(e).__name__}: {e}"

    async def _save(self, d: AlertDelivery) -> None:
        try:
            await self.store.update(d, time.time())
        except StateError as e:
            log.error("alert delivery %s: state not recorded (%s); a restart may repeat or lose it", d.id, e)

    async def _record(self, d: AlertDelivery, status: int | None, error: str | None, outcome: str) -> None:
        kind = d.id.removeprefix(f"{d.run_id}.{d.alert}.")
        attempt = AlertAttempt(id=d.id, alert=d.alert, kind=kind, attempt=d.attempts, time=_utc_now(),
                               status=status, error=error, outcome=outcome)  # type: ignore[arg-type]
        try:
            await anyio.to_thread.run_sync(append_attempt, self.home, d.run_id, attempt)
        except OSError as e:
            log.error("alert delivery %s: attempt %d not recorded in %s/alerts: %s", d.id, d.attempts, self.home, e)
