"""The run book: the one owner of the scheduler's runs, its queue, its active runs and each runner's
runs, changed only by named transitions that check the phase they leave.

    queued --dispatch--> dispatching --sent--> dispatched --accept--> running
       ^                     |                     |                     |
       +------- requeue -----+---------------------+---------------------+
    queued | dispatching | dispatched | running --begin_end--> ending --end--> ended
    dispatching | dispatched | running --finish--> ended        (the runner wrote the end)
    queued --adopt--> running                                     (a runner reports it has it)
    ended | ending --forget--> (gone)

A transition from a phase it does not leave raises `TransitionError`: a bug in the caller, never a
state to serve on. Membership follows the phase: `queue` holds the queued runs that may be dispatched
(oldest first), `active` the dispatching, dispatched and running ones (they take a concurrency slot),
and a runner's `runs` the active runs assigned to it. Pure: no sockets, no files, no clock but
`time.monotonic` for `not_before`, so every transition is tested in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio

from shared.dispatch import RunnerStatus
from shared.events import Event

from .runs import ACTIVE_PHASES, Phase, RunRecord

log = logging.getLogger(__name__)


class TransitionError(RuntimeError):
    """A run was moved from a phase the transition does not leave: a bug in the scheduler."""


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


_ACTIVE: tuple[Phase, ...] = tuple(sorted(ACTIVE_PHASES))


class RunBook:
    def __init__(self) -> None:
        self.runs: dict[str, RunRecord] = {}
        self.queue: dict[str, RunRecord] = {}  # phase queued, oldest first
        self.active: dict[str, RunRecord] = {}  # dispatching, dispatched, running
        self.runners: dict[str, RunnerInfo] = {}
        self._dirty = False  # changed since the dispatcher last looked
        self._woken: anyio.Event | None = None  # made when awaited: the book is built outside the event loop too
        # told of each run that ends from here on (finish, end, a skipped slot; not runs read at start):
        # the alerts' channel (it only queues, never blocks a transition)
        self.on_end: Callable[[RunRecord], None] | None = None

    # ------------------------------------------------------------------------------------ reading

    def get(self, run_id: str) -> RunRecord | None:
        return self.runs.get(run_id)

    def runner(self, runner_id: str, last_seen: float) -> RunnerInfo:
        """The runner of that id, known from now on if it was not."""
        r = self.runners.get(runner_id)
        if r is None:
            r = self.runners[runner_id] = RunnerInfo(runner_id, last_seen=last_seen)
        return r

    def runs_of(self, runner: RunnerInfo) -> list[RunRecord]:
        return [self.runs[run_id] for run_id in sorted(runner.runs)]

    def owned_by(self, rec: RunRecord | None, runner_id: str, attempt: int) -> bool:
        """Is `rec` active on that runner in that attempt? (Anything else a runner says of it is stale.)"""
        return (rec is not None and rec.run_id in self.active and rec.runner == runner_id
                and rec.attempt == attempt and rec.phase in ACTIVE_PHASES)

    def owned_seqs(self) -> dict[str, int]:
        """run id -> last seq of the runs whose journal the scheduler holds (queued, not yet accepted)."""
        out = {r.run_id: r.last_seq for r in self.queue.values()}
        out.update({r.run_id: r.last_seq for r in self.active.values() if r.phase in ("dispatching", "dispatched")})
        return out

    # ------------------------------------------------------------------------------------ change

    def changed(self) -> None:
        """Something the dispatcher decides on changed (queue, slots, runners): it looks again."""
        self._dirty = True
        if self._woken is not None:
            self._woken.set()

    async def wait_changed(self) -> None:
        """Return once something changed since the last return."""
        while not self._dirty:
            self._woken = anyio.Event()
            await self._woken.wait()
        self._dirty = False
        self._woken = None

    # ------------------------------------------------------------------------------------ transitions

    def _check(self, rec: RunRecord, transition: str, leaves: Iterable[Phase]) -> None:
        if rec.phase not in leaves:
            raise TransitionError(f"run {rec.run_id}: {transition} from phase {rec.phase!r} (it leaves "
                                  f"{' or '.join(leaves)})")
        if self.runs.get(rec.run_id) is not rec:
            raise TransitionError(f"run {rec.run_id}: {transition} of a run the book does not hold")

    def _release(self, rec: RunRecord) -> None:
        self.queue.pop(rec.run_id, None)
        self.active.pop(rec.run_id, None)
        if rec.runner and rec.runner in self.runners:
            self.runners[rec.runner].runs.discard(rec.run_id)

    def _ended(self, rec: RunRecord) -> None:
        if self.on_end is not None:
            self.on_end(rec)

    def record(self, rec: RunRecord, *, just_ended: bool = False) -> None:
        """A new run: queued (not yet dispatchable: see `enqueue`) or already ended (a skipped slot, which
        `just_ended` announces; a run read from its journal at start is not)."""
        if rec.phase not in ("queued", "ended"):
            raise TransitionError(f"run {rec.run_id}: recorded in phase {rec.phase!r} (a new run is queued or ended)")
        if rec.run_id in self.runs:
            raise TransitionError(f"run {rec.run_id}: recorded twice")
        self.runs[rec.run_id] = rec
        if just_ended and rec.phase == "ended":
            self._ended(rec)

    def enqueue(self, rec: RunRecord) -> None:
        """A recorded queued run may be dispatched from now on."""
        self._check(rec, "enqueue", ("queued",))
        if rec.run_id in self.queue:
            raise TransitionError(f"run {rec.run_id}: enqueued twice")
        self.queue[rec.run_id] = rec
        self.changed()

    def restore_active(self, rec: RunRecord, runner: RunnerInfo, now: float) -> None:
        """At start: a run the journals show dispatched or running waits for its runner's word."""
        if rec.phase not in ("queued", "dispatched", "running"):
            raise TransitionError(f"run {rec.run_id}: restored as active from phase {rec.phase!r}")
        if rec.phase == "queued":
            rec.set_phase("dispatched")
        self.runs[rec.run_id] = rec
        rec.runner = runner.runner_id
        runner.runs.add(rec.run_id)
        rec.unreported_since = now
        rec.recovered = True
        self.active[rec.run_id] = rec

    def dispatch(self, rec: RunRecord, runner: RunnerInfo) -> None:
        """queued -> dispatching on `runner`, the next attempt: it takes a slot from here."""
        self._check(rec, "dispatch", ("queued",))
        self.queue.pop(rec.run_id, None)
        rec.attempt += 1
        rec.runner = runner.runner_id
        rec.set_phase("dispatching")
        runner.runs.add(rec.run_id)
        self.active[rec.run_id] = rec

    def sent(self, rec: RunRecord) -> None:
        """dispatching -> dispatched: DispatchRun is on its way to the runner."""
        self._check(rec, "sent", ("dispatching",))
        rec.set_phase("dispatched")

    def accept(self, rec: RunRecord, started_at: str | None = None) -> None:
        """-> running: its runner accepted it (or lists it in its status). Running again is a no-op."""
        self._check(rec, "accept", _ACTIVE)
        if rec.phase != "running":
            rec.set_phase("running")
        rec.recovered = False
        rec.unreported_since = None
        if started_at is not None:
            rec.started_at = rec.started_at or started_at

    def adopt(self, rec: RunRecord, runner: RunnerInfo, attempt: int) -> None:
        """queued -> running: a runner reports it runs this attempt (dispatched before a restart)."""
        self._check(rec, "adopt", ("queued",))
        self.queue.pop(rec.run_id, None)
        rec.runner, rec.attempt = runner.runner_id, attempt
        rec.set_phase("running")
        rec.unreported_since = None
        runner.runs.add(rec.run_id)
        self.active[rec.run_id] = rec

    def requeue(self, rec: RunRecord, why: str, delay: float = 0.0) -> None:
        """An active run back to the queue (not sent, rejected, never started), retried after `delay`."""
        self._check(rec, "requeue", _ACTIVE)
        self._release(rec)
        rec.runner = None
        rec.unreported_since = None
        rec.set_phase("queued")
        rec.not_before = time.monotonic() + delay
        rec.last_rejection = why
        self.queue[rec.run_id] = rec
        self.changed()

    def begin_end(self, rec: RunRecord) -> None:
        """-> ending: the scheduler writes its end; it leaves the queue and its slot now."""
        self._check(rec, "begin_end", ("queued", *_ACTIVE))
        self._release(rec)
        rec.set_phase("ending")
        self.changed()

    def end(self, rec: RunRecord, terminal: Event) -> None:
        """ending -> ended: the end the scheduler wrote (or found) is in the journal."""
        self._check(rec, "end", ("ending",))
        rec.end(terminal)
        self._ended(rec)

    def finish(self, rec: RunRecord, terminal: Event | None, outcome: str) -> None:
        """active -> ended by its runner: `terminal` from the journal (None: the journal has none,
        then `outcome` is what the runner said)."""
        self._check(rec, "finish", _ACTIVE)
        self._release(rec)
        if terminal is not None:
            rec.end(terminal)
        else:
            rec.set_phase("ended")
            rec.outcome = outcome
        self.changed()
        self._ended(rec)

    def forget(self, rec: RunRecord) -> None:
        """An ended run whose journal was removed (retention), or one being ended whose journal vanished."""
        self._check(rec, "forget", ("ended", "ending"))
        self._release(rec)
        del self.runs[rec.run_id]
