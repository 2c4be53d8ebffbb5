"""Runners as the scheduler sees them: their messages on scheduler.dispatch (status, accepted, rejected,
finished), what is sent to them, and the monitor that declares a silent runner, or an unreported run, lost.
Silence is measured on the monitor's `JudgeClock` (`silence.py`), never on the wall: a scheduler that was
itself stopped does not count its own pause against the runners it could not hear meanwhile.

Fencing: every run message names its attempt; one that is not about the attempt the book has active on
that runner (`RunBook.owned_by`) is stale: it changes nothing, and a runner still holding such a run is
told to release it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import msgspec
import zmq
import zmq.asyncio

from shared.dispatch import (
    FromRunner,
    ReleaseRun,
    RunAccepted,
    RunFinished,
    RunnerStatus,
    RunRejected,
    encode as encode_dispatch,
    from_runner_decoder,
)
from shared.events import Event, now_timestamp
from shared.journal import JournalReader, journal_path
from shared.values import DECODE_ERRORS

from .journaling import EndSender
from .runbook import RunBook, RunnerInfo
from .runs import RunRecord
from .silence import JudgeClock, verdict

log = logging.getLogger(__name__)

MAX_REJECTIONS = 5  # dispatch attempts refused by runners before the run fails
_STALL_WARN = 1.0  # seconds of a late monitor tick worth a warning (shorter ones: a busy host, logged at debug)


class RunnerTracker:
    def __init__(self, book: RunBook, ends: EndSender, journal_dir: Path, tz: ZoneInfo, lost_after: float,
                 where: str = "scheduler.dispatch") -> None:
        self.book = book
        self.ends = ends
        self.journal_dir = journal_dir
        self.tz = tz
        self.where = where
        self.lost_after = lost_after
        self.tick = min(0.25, self.lost_after / 8)
        # a tick that comes late counts as at most two: a stall of the scheduler is not runner silence
        self.clock = JudgeClock(max_step=2 * self.tick)
        self._deferred: set[str] = set()  # runners whose verdict waits for unread input (logged once each)
        self.dispatch_sock: zmq.asyncio.Socket | None = None  # bound, and closed, by Scheduler.run
        self.dispatch_dropped = 0
        # a run's last event, as its journal has it (cluster mode: its event stream)
        self.same_host = True  # runners share this journal directory (not so in cluster mode)
        self.last_event: Callable[[str], Awaitable[Event | None]] = self._journal_last_event

    async def send(self, runner: RunnerInfo, msg: msgspec.Struct) -> bool:
        assert self.dispatch_sock is not None
        if runner.routing is None:
            return False
        try:
            await self.dispatch_sock.send_multipart([runner.routing, encode_dispatch(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH (gone; ROUTER_MANDATORY) or EAGAIN (its queue is full)
            self.dispatch_dropped += 1
            log.warning("scheduler.dispatch: %s to runner %s not sent: %s", type(msg).__name__, runner.runner_id, e)
            return False

    def _last_event(self, run_id: str) -> Event | None:
        return JournalReader(journal_path(self.journal_dir, run_id), run_id).last_event()

    async def _journal_last_event(self, run_id: str) -> Event | None:
        return await anyio.to_thread.run_sync(self._last_event, run_id)

    # ------------------------------------------------------------------------------------ runner messages

    async def receive(self) -> None:
        assert self.dispatch_sock is not None
        while True:
            frames = await self.dispatch_sock.recv_multipart()
            if len(frames) != 2:
                self.dispatch_dropped += 1
                log.warning("%s: dropped a message of %d frames (expected routing id + payload)", self.where, len(frames))
                continue
            routing, payload = frames
            try:
                msg = from_runner_decoder.decode(payload)
            except DECODE_ERRORS as e:
                self.dispatch_dropped += 1
                log.warning("%s: dropped a bad message from %r: %s", self.where, routing[:64], e)
                continue
            if routing != msg.runner_id.encode():  # runners connect with their id as routing id
                self.dispatch_dropped += 1
                log.warning("%s: dropped a %s naming runner %r from connection %r: a runner speaks only for itself",
                            self.where, type(msg).__name__, msg.runner_id[:64], routing[:64])
                continue
            await self.handle(routing, msg)

    async def handle(self, routing: bytes, msg: FromRunner) -> None:
        """One message from the runner connected as `routing` (checked to be its id)."""
        match msg:
            case RunnerStatus():
                await self._on_status(routing, msg)
            case RunAccepted():
                await self._on_accepted(msg)
            case RunRejected():
                self._on_rejected(msg)
            case RunFinished():
                await self._on_finished(msg)

    def _runner_of(self, runner_id: str) -> RunnerInfo:
        return self.book.runner(runner_id, last_seen=self.clock.now())

    async def _release(self, runner: RunnerInfo, run_id: str, attempt: int, reason: str) -> None:
        log.warning("runner %s reports run %s attempt %d, which %s: sending ReleaseRun", runner.runner_id, run_id, attempt, reason)
        await self.send(runner, ReleaseRun(run_id=run_id, attempt=attempt, reason=reason))

    async def _on_status(self, routing: bytes, msg: RunnerStatus) -> None:
        book = self.book
        r = self._runner_of(msg.runner_id)
        fresh = not r.connected or (r.status is not None and r.status.pid != msg.pid)
        if r.lost:
            log.warning("runner %s speaks again after being declared lost; its old runs stay ended", msg.runner_id)
        r.routing, r.status, r.last_seen, r.lost = routing, msg, self.clock.now(), False
        if fresh:
            log.info("runner %s connected: pid %d, capacity %d, journal dir %s, config %s, publishes on %s",
                     msg.runner_id, msg.pid, msg.capacity, msg.journal_dir, msg.config_path, msg.publish)
            if self.same_host and Path(msg.journal_dir) != self.journal_dir:
                log.error("runner %s writes journals in %s but the scheduler reads %s: runs will look lost "
                          "(use one config for all services)", msg.runner_id, msg.journal_dir, self.journal_dir)
        for run_id, attempt in msg.runs.items():
            rec = book.get(run_id)
            if rec is None:
                continue  # not a scheduler run (e.g. the doctor's probe)
            if rec.phase == "ended" or rec.phase == "ending":
                await self._release(r, run_id, attempt, f"has ended ({rec.outcome or 'ending'}: {rec.msg})")
            elif rec.phase == "queued" and attempt >= rec.attempt:
                book.adopt(rec, r, attempt)  # the runner has it (dispatched before a scheduler restart)
                log.info("run %s adopted: runner %s owns it (attempt %d)", run_id, r.runner_id, attempt)
            elif not book.owned_by(rec, r.runner_id, attempt):
                await self._release(r, run_id, attempt, f"is attempt {rec.attempt} on runner {rec.runner}")
            else:
                if rec.phase != "running" or rec.recovered:
                    log.info("run %s re-adopted: runner %s still runs attempt %d", run_id, r.runner_id, attempt)
                book.accept(rec)
        now = self.clock.now()
        for rec in book.runs_of(r):
            if rec.run_id not in msg.runs and rec.phase in ("dispatched", "running") and rec.unreported_since is None:
                rec.unreported_since = now
        book.changed()

    async def _on_accepted(self, msg: RunAccepted) -> None:
        rec = self.book.get(msg.run_id)
        r = self._runner_of(msg.runner_id)
        if not self.book.owned_by(rec, msg.runner_id, msg.attempt):
            await self._release(r, msg.run_id, msg.attempt, "the scheduler no longer assigns to it")
            return
        assert rec is not None
        self.book.accept(rec, started_at=now_timestamp(self.tz))
        log.info("run %s accepted by runner %s (attempt %d)", rec.run_id, msg.runner_id, msg.attempt)

    def _on_rejected(self, msg: RunRejected) -> None:
        rec = self.book.get(msg.run_id)
        if not self.book.owned_by(rec, msg.runner_id, msg.attempt):
            log.warning("late RunRejected for run %s attempt %d from %s ignored", msg.run_id, msg.attempt, msg.runner_id)
            return
        assert rec is not None
        rec.rejections += 1
        log.warning("run %s attempt %d rejected by runner %s: %s", rec.run_id, msg.attempt, msg.runner_id, msg.reason)
        if rec.cancel_requested:
            self.ends.end(rec, "cancelled", rec.msg or "cancelled on request")
        elif rec.rejections >= MAX_REJECTIONS:
            self.ends.end(rec, "failure", f"rejected by runners {rec.rejections} times; last: {msg.reason}",
                          {"attempts": rec.attempt})
        else:
            self.book.requeue(rec, f"runner {msg.runner_id}: {msg.reason}",
                              delay=min(0.2 * 2 ** (rec.rejections - 1), 5.0))

    async def _on_finished(self, msg: RunFinished) -> None:
        rec = self.book.get(msg.run_id)
        if not self.book.owned_by(rec, msg.runner_id, msg.attempt):
            log.warning("late RunFinished for run %s attempt %d from %s ignored", msg.run_id, msg.attempt, msg.runner_id)
            return
        assert rec is not None
        last = await self.last_event(rec.run_id)
        if not self.book.owned_by(rec, msg.runner_id, msg.attempt):  # ended meanwhile (runner declared lost)
            log.warning("RunFinished for run %s attempt %d from %s: the run was taken back meanwhile (%s)",
                        msg.run_id, msg.attempt, msg.runner_id, rec.phase)
            return
        if last is not None and last.is_terminal:
            self.book.finish(rec, last, last.event)
        else:
            log.error("run %s: runner %s says %s but its journal has no terminal event", rec.run_id, msg.runner_id, msg.outcome)
            self.book.finish(rec, None, msg.outcome)
        log.info("run %s finished on runner %s: %s", rec.run_id, msg.runner_id, rec.outcome)

    # ------------------------------------------------------------------------------------ runner lost

    async def monitor(self) -> None:
        self.clock.tick()  # judging starts: times recorded at start (real time) compare from here
        while True:
            await anyio.sleep(self.tick)
            uncounted = self.clock.tick()
            if uncounted > 0:
                log.log(logging.WARNING if uncounted >= _STALL_WARN else logging.DEBUG,
                        "runner monitor: tick %.2f s late (the scheduler was stopped or starved); %.2f s not "
                        "counted as runner silence", uncounted + self.clock.max_step - self.tick, uncounted)
            await self.judge()
            if any(r.not_before for r in self.book.queue.values()):
                self.book.changed()

    def unread_input(self) -> bool:
        """Messages wait on scheduler.dispatch, not yet read: one of them may be the heartbeat."""
        if self.dispatch_sock is None:
            return False
        return bool(int(self.dispatch_sock.get(zmq.EVENTS)) & zmq.POLLIN)

    async def judge(self) -> None:
        """One round of the monitor: declare silent runners lost, reconcile runs no runner reports."""
        now = self.clock.now()
        unread: bool | None = None  # asked of the socket only when someone is past the limit
        for r in list(self.book.runners.values()):
            if r.lost:
                continue
            silence = now - r.last_seen
            if silence <= self.lost_after:
                self._deferred.discard(r.runner_id)
                continue
            if unread is None:
                unread = self.unread_input()
            v = verdict(silence, self.lost_after, unread)
            if v.deferred:
                if r.runner_id not in self._deferred:
                    self._deferred.add(r.runner_id)
                    log.info("runner %s: no heartbeat read for %.1f s, but scheduler.dispatch has unread "
                             "messages: reading them before judging", r.runner_id, silence)
            elif v.lost:
                self._deferred.discard(r.runner_id)
                self._declare_lost(r, silence)
        unreported: list[tuple[RunRecord, int, float]] = []
        for rec in list(self.book.active.values()):
            if rec.unreported_since is not None and now - rec.unreported_since > self.lost_after:
                if unread is None:
                    unread = self.unread_input()
                v = verdict(now - rec.unreported_since, self.lost_after, unread)
                if v.lost:
                    unreported.append((rec, rec.attempt, now - rec.unreported_since))
                else:
                    log.debug("run %s: unreported by %s for %.1f s; reading unread runner messages first",
                              rec.run_id, rec.runner, now - rec.unreported_since)
        for rec, attempt, silence in unreported:
            await self._reconcile_unreported(rec, attempt, silence)

    def _declare_lost(self, r: RunnerInfo, silence: float) -> None:
        r.lost = True
        runs = self.book.runs_of(r)
        log.error("runner %s lost: no heartbeat for %.1f s (runner_lost_after %g s); failing its %d run(s): %s",
                  r.runner_id, silence, self.lost_after, len(runs), ", ".join(rec.run_id for rec in runs) or "none")
        for rec in runs:
            self.ends.end(rec, "failure", f"runner lost: no heartbeat from {r.runner_id} for {silence:.0f} s",
                          {"runner": r.runner_id, "attempt": rec.attempt})
        self.book.changed()

    async def _reconcile_unreported(self, rec: RunRecord, attempt: int, silence: float) -> None:
        """Its runner is alive but has not listed the run for runner_lost_after: ask the journal."""
        last = await self.last_event(rec.run_id)
        if rec.run_id not in self.book.active or rec.attempt != attempt or rec.unreported_since is None:
            return  # reported, ended or taken back while the journal was read
        if last is not None and last.is_terminal:
            self.book.finish(rec, last, last.event)
            log.warning("run %s ended in its journal (%s) without a RunFinished from %s", rec.run_id, last.event, rec.runner)
        elif last is not None and last.seq == 1:
            log.warning("run %s: runner %s never started attempt %d (not reported for %.0f s); queued again",
                        rec.run_id, rec.runner, rec.attempt, silence)
            self.book.requeue(rec, f"runner {rec.runner} never started attempt {rec.attempt}")
        else:
            self.ends.end(rec, "failure", f"runner lost: {rec.runner} stopped reporting this run for {silence:.0f} s",
                          {"runner": rec.runner, "attempt": rec.attempt})
