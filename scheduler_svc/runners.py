"""Runners as the scheduler sees them: their messages on scheduler.dispatch (status, accepted, rejected,
finished), what is sent to them, and the monitor that declares a silent runner, or an unreported run, lost.
Silence is measured on the monitor's `JudgeClock` (`silence.py`), never on the wall: a scheduler that was
itself stopped does not count its own pause against the runners it could not hear meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import zmq
import zmq.asyncio

from shared.dispatch import (
    ReleaseRun, RunAccepted, RunFinished, RunnerStatus, RunRejected, from_runner_decoder,
)
from shared.dispatch import encode as encode_dispatch
from shared.events import now_timestamp
from shared.journal import JournalReader, journal_path

from .runs import ACTIVE_PHASES, RunRecord
from .silence import JudgeClock, verdict
from shared.values import DECODE_ERRORS

if TYPE_CHECKING:
    from .service import Scheduler

log = logging.getLogger(__name__)

MAX_REJECTIONS = 5  # dispatch attempts refused by runners before the run fails
_STALL_WARN = 1.0  # seconds of a late monitor tick worth a warning (shorter ones: a busy host, logged at debug)


@dataclass
class RunnerInfo:
    runner_id: str
    routing: bytes | None = None  # None: known only from journals/state (after a scheduler restart)
    status: RunnerStatus | None = None
    last_seen: float = field(default_factory=time.monotonic)  # judge time (RunnerTracker.clock)
    lost: bool = False
    runs: set[str] = field(default_factory=set)  # active runs assigned to it

    @property
    def connected(self) -> bool:
        return self.routing is not None and self.status is not None and not self.lost

    def free(self) -> int:
        return (self.status.capacity if self.status else 0) - len(self.runs)


class RunnerTracker:
    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.lost_after = scheduler.cfg.scheduler.runner_lost_after
        self.tick = min(0.25, self.lost_after / 8)
        # a tick that comes late counts as at most two: a stall of the scheduler is not runner silence
        self.clock = JudgeClock(max_step=2 * self.tick)
        self._deferred: set[str] = set()  # runners whose verdict waits for unread input (logged once each)
        self.dispatch_sock: zmq.asyncio.Socket | None = None  # bound, and closed, by Scheduler.run
        self.dispatch_dropped = 0

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

    # ------------------------------------------------------------------------------------ runner messages

    async def receive(self) -> None:
        assert self.dispatch_sock is not None
        where = f"scheduler.dispatch {self.s.cfg.scheduler.dispatch}"
        while True:
            frames = await self.dispatch_sock.recv_multipart()
            if len(frames) != 2:
                self.dispatch_dropped += 1
                log.warning("%s: dropped a message of %d frames (expected routing id + payload)", where, len(frames))
                continue
            routing, payload = frames
            try:
                msg = from_runner_decoder.decode(payload)
            except DECODE_ERRORS as e:
                self.dispatch_dropped += 1
                log.warning("%s: dropped a bad message from %r: %s", where, routing[:64], e)
                continue
            if routing != msg.runner_id.encode():  # runners connect with their id as routing id
                self.dispatch_dropped += 1
                log.warning("%s: dropped a %s naming runner %r from connection %r: a runner speaks only for itself",
                            where, type(msg).__name__, msg.runner_id[:64], routing[:64])
                continue
            match msg:
                case RunnerStatus():
                    await self._on_status(routing, msg)
                case RunAccepted():
                    await self._on_accepted(msg)
                case RunRejected():
                    await self._on_rejected(msg)
                case RunFinished():
                    self._on_finished(msg)

    def _runner_of(self, runner_id: str) -> RunnerInfo:
        r = self.s.runners.get(runner_id)
        if r is None:
            r = self.s.runners[runner_id] = RunnerInfo(runner_id, last_seen=self.clock.now())
        return r

    def _owned_by(self, rec: RunRecord | None, runner_id: str, attempt: int) -> bool:
        return (rec is not None and rec.run_id in self.s.active and rec.runner == runner_id
                and rec.attempt == attempt and rec.phase in ACTIVE_PHASES)

    async def _release(self, runner: RunnerInfo, run_id: str, attempt: int, reason: str) -> None:
        log.warning("runner %s reports run %s attempt %d, which %s: sending ReleaseRun", runner.runner_id, run_id, attempt, reason)
        await self.send(runner, ReleaseRun(run_id=run_id, attempt=attempt, reason=reason))

    async def _on_status(self, routing: bytes, msg: RunnerStatus) -> None:
        s = self.s
        r = self._runner_of(msg.runner_id)
        fresh = not r.connected or (r.status is not None and r.status.pid != msg.pid)
        if r.lost:
            log.warning("runner %s speaks again after being declared lost; its old runs stay ended", msg.runner_id)
        r.routing, r.status, r.last_seen, r.lost = routing, msg, self.clock.now(), False
        if fresh:
            log.info("runner %s connected: pid %d, capacity %d, journal dir %s, config %s, publishes on %s",
                     msg.runner_id, msg.pid, msg.capacity, msg.journal_dir, msg.config_path, msg.publish)
            if Path(msg.journal_dir) != s.journal_dir:
                log.error("runner %s writes journals in %s but the scheduler reads %s: runs will look lost "
                          "(use one config for all services)", msg.runner_id, msg.journal_dir, s.journal_dir)
        for run_id, attempt in msg.runs.items():
            rec = s.runs.get(run_id)
            if rec is None:
                continue  # not a scheduler run (e.g. the doctor's probe)
            if rec.phase == "ended" or rec.phase == "ending":
                await self._release(r, run_id, attempt, f"has ended ({rec.outcome or 'ending'}: {rec.msg})")
            elif rec.phase == "queued" and attempt >= rec.attempt:
                s.queue.pop(run_id, None)  # the runner has it (dispatched before a scheduler restart)
                rec.runner, rec.attempt = r.runner_id, attempt
                rec.set_phase("running")
                r.runs.add(run_id)
                s.active[run_id] = rec
                log.info("run %s adopted: runner %s owns it (attempt %d)", run_id, r.runner_id, attempt)
            elif not self._owned_by(rec, r.runner_id, attempt):
                await self._release(r, run_id, attempt, f"is attempt {rec.attempt} on runner {rec.runner}")
            else:
                if rec.phase != "running" or rec.recovered:
                    rec.set_phase("running")
                    rec.recovered = False
                    log.info("run %s re-adopted: runner %s still runs attempt %d", run_id, r.runner_id, attempt)
                rec.unreported_since = None
        now = self.clock.now()
        for run_id in r.runs:
            rec = s.runs[run_id]
            if run_id not in msg.runs and rec.phase in ("dispatched", "running") and rec.unreported_since is None:
                rec.unreported_since = now
        s.dispatcher.wake()

    async def _on_accepted(self, msg: RunAccepted) -> None:
        rec = self.s.runs.get(msg.run_id)
        r = self._runner_of(msg.runner_id)
        if not self._owned_by(rec, msg.runner_id, msg.attempt):
            await self._release(r, msg.run_id, msg.attempt, "the scheduler no longer assigns to it")
            return
        assert rec is not None
        rec.set_phase("running")
        rec.unreported_since = None
        rec.started_at = rec.started_at or now_timestamp(self.s.tz)
        log.info("run %s accepted by runner %s (attempt %d)", rec.run_id, msg.runner_id, msg.attempt)

    async def _on_rejected(self, msg: RunRejected) -> None:
        rec = self.s.runs.get(msg.run_id)
        if not self._owned_by(rec, msg.runner_id, msg.attempt):
            log.warning("late RunRejected for run %s attempt %d from %s ignored", msg.run_id, msg.attempt, msg.runner_id)
            return
        assert rec is not None
        rec.rejections += 1
        log.warning("run %s attempt %d rejected by runner %s: %s", rec.run_id, msg.attempt, msg.runner_id, msg.reason)
        if rec.cancel_requested:
            await self.s.journaling.end_run(rec, "cancelled", rec.msg or "cancelled on request")
        elif rec.rejections >= MAX_REJECTIONS:
            await self.s.journaling.end_run(rec, "failure", f"rejected by runners {rec.rejections} times; last: {msg.reason}",
                                            {"attempts": rec.attempt})
        else:
            self.s.dispatcher.requeue(rec, f"runner {msg.runner_id}: {msg.reason}",
                                      delay=min(0.2 * 2 ** (rec.rejections - 1), 5.0))

    def _on_finished(self, msg: RunFinished) -> None:
        s = self.s
        rec = s.runs.get(msg.run_id)
        if not self._owned_by(rec, msg.runner_id, msg.attempt):
            log.warning("late RunFinished for run %s attempt %d from %s ignored", msg.run_id, msg.attempt, msg.runner_id)
            return
        assert rec is not None
        s.dispatcher.release_slot(rec)
        last = JournalReader(journal_path(s.journal_dir, rec.run_id), rec.run_id).last_event()
        if last is not None and last.is_terminal:
            rec.end(last)
        else:
            log.error("run %s: runner %s says %s but its journal has no terminal event", rec.run_id, msg.runner_id, msg.outcome)
            rec.set_phase("ended")
            rec.outcome = msg.outcome
        log.info("run %s finished on runner %s: %s", rec.run_id, msg.runner_id, rec.outcome)
        s.dispatcher.wake()

    # ------------------------------------------------------------------------------------ runner lost

    async def monitor(self) -> None:
        s = self.s
        self.clock.tick()  # judging starts: times recorded at start (real time) compare from here
        while True:
            await anyio.sleep(self.tick)
            uncounted = self.clock.tick()
            if uncounted > 0:
                log.log(logging.WARNING if uncounted >= _STALL_WARN else logging.DEBUG,
                        "runner monitor: tick %.2f s late (the scheduler was stopped or starved); %.2f s not "
                        "counted as runner silence", uncounted + self.clock.max_step - self.tick, uncounted)
            self.judge()
            if any(r.not_before for r in s.queue.values()):
                s.dispatcher.wake()

    def unread_input(self) -> bool:
        """Messages wait on scheduler.dispatch, not yet read: one of them may be the heartbeat."""
        assert self.dispatch_sock is not None
        return bool(self.dispatch_sock.get(zmq.EVENTS) & zmq.POLLIN)

    def judge(self) -> None:
        """One round of the monitor: declare silent runners lost, reconcile runs no runner reports."""
        s = self.s
        now = self.clock.now()
        unread: bool | None = None  # asked of the socket only when someone is past the limit
        for r in list(s.runners.values()):
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
        for rec in list(s.active.values()):
            if rec.unreported_since is not None and now - rec.unreported_since > self.lost_after:
                if unread is None:
                    unread = self.unread_input()
                v = verdict(now - rec.unreported_since, self.lost_after, unread)
                if v.lost:
                    self._reconcile_unreported(rec, now - rec.unreported_since)
                else:
                    log.debug("run %s: unreported by %s for %.1f s; reading unread runner messages first",
                              rec.run_id, rec.runner, now - rec.unreported_since)

    def _declare_lost(self, r: RunnerInfo, silence: float) -> None:
        s = self.s
        assert s.tg is not None
        r.lost = True
        runs = sorted(r.runs)
        log.error("runner %s lost: no heartbeat for %.1f s (runner_lost_after %g s); failing its %d run(s): %s",
                  r.runner_id, silence, self.lost_after, len(runs), ", ".join(runs) or "none")
        for run_id in runs:
            rec = s.runs[run_id]
            s.dispatcher.release_slot(rec)
            rec.set_phase("ending")
            s.tg.start_soon(s.journaling.end_run, rec, "failure",
                            f"runner lost: no heartbeat from {r.runner_id} for {silence:.0f} s",
                            {"runner": r.runner_id, "attempt": rec.attempt})
        r.runs.clear()
        s.dispatcher.wake()

    def _reconcile_unreported(self, rec: RunRecord, silence: float) -> None:
        """Its runner is alive but has not listed the run for runner_lost_after: ask the journal."""
        s = self.s
        assert s.tg is not None
        last = JournalReader(journal_path(s.journal_dir, rec.run_id), rec.run_id).last_event()
        if last is not None and last.is_terminal:
            s.dispatcher.release_slot(rec)
            rec.end(last)
            log.warning("run %s ended in its journal (%s) without a RunFinished from %s", rec.run_id, last.event, rec.runner)
            s.dispatcher.wake()
        elif last is not None and last.seq == 1:
            log.warning("run %s: runner %s never started attempt %d (not reported for %.0f s); queued again",
                        rec.run_id, rec.runner, rec.attempt, silence)
            s.dispatcher.requeue(rec, f"runner {rec.runner} never started attempt {rec.attempt}")
        else:
            runner = rec.runner
            s.dispatcher.release_slot(rec)
            rec.set_phase("ending")
            s.tg.start_soon(s.journaling.end_run, rec, "failure",
                            f"runner lost: {runner} stopped reporting this run for {silence:.0f} s",
                            {"runner": runner, "attempt": rec.attempt})
