"""The runner tracker's fencing, in-process: a message about an attempt the run book does not have
active on that runner changes nothing (a late RunFinished, an old attempt, another runner), a runner
still holding such a run is told to release it, and a runner lost mid-dispatch or a run its runner stops
reporting ends or goes back to the queue as intended. Real journals in a temporary directory, real
ZeroMQ sockets on loopback (the tracker's ROUTER, a DEALER as the runner); the monitor's clock is fake.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio
from anyio.streams.memory import MemoryObjectReceiveStream

from scheduler_svc.dispatcher import Dispatcher
from scheduler_svc.journaling import EndRequest, EndSender
from scheduler_svc.runbook import RunBook, RunnerInfo
from scheduler_svc.runners import MAX_REJECTIONS, RunnerTracker
from scheduler_svc.runs import RunRecord
from scheduler_svc.silence import JudgeClock
from shared.config import load_settings
from shared.dispatch import (
    DispatchRun,
    FromScheduler,
    ReleaseRun,
    RunAccepted,
    RunFinished,
    RunnerStatus,
    RunRejected,
)
from shared.events import Event
from shared.journal import JournalWriter, begin_run
from tests.harness import SLEEP_PIPELINE, write_config

UTC = ZoneInfo("UTC")
LOST_AFTER = 3.0
_from_scheduler = msgspec.msgpack.Decoder(FromScheduler)


@dataclass
class Rig:
    book: RunBook
    tracker: RunnerTracker
    ends: MemoryObjectReceiveStream[EndRequest]
    journal_dir: Path
    runner_sock: zmq.asyncio.Socket  # DEALER, routing id w1
    now: list[float]  # the monitor's real clock, moved by hand

    def status(self, runs: dict[str, int] | None = None, runner_id: str = "w1") -> RunnerStatus:
        return RunnerStatus(runner_id=runner_id, capacity=2, pid=4242, version="t", config_path="c.toml",
                            journal_dir=str(self.journal_dir), publish="tcp://127.0.0.1:1",
                            control="tcp://127.0.0.1:2", runs=runs or {})

    async def connect(self, runs: dict[str, int] | None = None, runner_id: str = "w1") -> RunnerInfo:
        await self.tracker.handle(runner_id.encode(), self.status(runs, runner_id))
        return self.book.runners[runner_id]

    def queued(self, run_id: str) -> RunRecord:
        ev = begin_run(self.journal_dir, run_id, UTC, "sleepy", {}, {"trigger": "manual"})
        rec = RunRecord(run_id=run_id, pipeline="sleepy", params={}, last_seq=ev.seq)
        self.book.record(rec)
        self.book.enqueue(rec)
        return rec

    def running(self, run_id: str, runner: RunnerInfo, attempts: int = 1) -> RunRecord:
        rec = self.queued(run_id)
        for _ in range(attempts - 1):
            self.book.dispatch(rec, runner)
            self.book.requeue(rec, "test: again")
        self.book.dispatch(rec, runner)
        self.book.sent(rec)
        self.book.accept(rec)
        return rec

    def journal(self, run_id: str, *events: str) -> None:
        with JournalWriter.open(self.journal_dir, run_id, UTC) as w:
            for kind in events:
                w.append("pipeline", kind, f"{kind} (test)", {"attempt": 1} if kind == "start" else None)
            w.sync()

    async def received(self) -> FromScheduler:
        with anyio.fail_after(5):
            return _from_scheduler.decode(await self.runner_sock.recv())

    def advance(self, seconds: float) -> None:
        """Time passes on the monitor's clock (as if its ticks came on time)."""
        self.now[0] += seconds
        self.tracker.clock.tick()

    def pending_ends(self) -> list[EndRequest]:
        out = []
        while True:
            try:
                out.append(self.ends.receive_nowait())
            except anyio.WouldBlock:
                return out


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    journal_dir = tmp_path / "events"
    journal_dir.mkdir()
    book = RunBook()
    ends_out, ends_in = anyio.create_memory_object_stream[EndRequest](math.inf)
    tracker = RunnerTracker(book, EndSender(book, ends_out), journal_dir, UTC, LOST_AFTER)
    now = [1000.0]
    tracker.clock = JudgeClock(max_step=1e9, real=lambda: now[0])
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"w1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    await dealer.send(b"hello")  # the ROUTER knows w1 once it has heard from it
    with anyio.fail_after(5):
        assert (await router.recv_multipart())[0] == b"w1"
    tracker.dispatch_sock = router
    tracker.clock.tick()
    try:
        yield Rig(book, tracker, ends_in, journal_dir, dealer, now)
    finally:
        dealer.close(0)
        router.close(0)
        ctx.term()
        ends_out.close()
        ends_in.close()


async def marker(rig: Rig, runner: RunnerInfo) -> None:
    """Sent last: the first message the runner receives after this tells what was sent before it."""
    assert await rig.tracker.send(runner, ReleaseRun(run_id="marker", attempt=0, reason="marker"))


# ---------------------------------------------------------------------------- RunFinished


async def test_a_late_run_finished_from_an_old_attempt_is_ignored(rig: Rig) -> None:
    w = await rig.connect()
    rec = rig.running("r1", w, attempts=2)
    rig.journal("r1", "start", "success")  # even with a terminal event in the journal
    await rig.tracker.handle(b"w1", RunFinished(runner_id="w1", run_id="r1", attempt=1, outcome="success"))
    assert (rec.phase, rec.attempt) == ("running", 2) and "r1" in rig.book.active


async def test_a_run_finished_from_another_runner_is_ignored(rig: Rig) -> None:
    w = await rig.connect()
    await rig.connect(runner_id="w2")
    rec = rig.running("r1", w)
    await rig.tracker.handle(b"w2", RunFinished(runner_id="w2", run_id="r1", attempt=1, outcome="failure"))
    assert rec.phase == "running" and rec.runner == "w1"


async def test_run_finished_of_the_current_attempt_ends_it_as_its_journal_says(rig: Rig) -> None:
    w = await rig.connect()
    rec = rig.running("r1", w)
    rig.journal("r1", "start", "failure")
    await rig.tracker.handle(b"w1", RunFinished(runner_id="w1", run_id="r1", attempt=1, outcome="success"))
    assert (rec.phase, rec.outcome, rec.last_seq) == ("ended", "failure", 3)  # the journal is the truth
    assert "r1" not in rig.book.active and w.free() == 2
    other = rig.running("r2", w)
    await rig.tracker.handle(b"w1", RunFinished(runner_id="w1", run_id="r2", attempt=1, outcome="cancelled"))
    assert (other.phase, other.outcome) == ("ended", "cancelled")  # no terminal in its journal: the runner's word


async def test_a_run_finished_after_the_runner_was_declared_lost_is_ignored(rig: Rig) -> None:
    w = await rig.connect()
    rec = rig.running("r1", w)
    rig.advance(LOST_AFTER + 1)
    await rig.tracker.judge()
    [end] = rig.pending_ends()
    assert end.rec is rec and end.kind == "failure" and end.msg.startswith("runner lost: no heartbeat from w1")
    assert rec.phase == "ending" and w.lost and w.runs == set()
    await rig.tracker.handle(b"w1", RunFinished(runner_id="w1", run_id="r1", attempt=1, outcome="success"))
    assert rec.phase == "ending"  # the scheduler writes this end; the runner's word counts no more
    # the lost runner speaks again, still listing the run: it is told to let go, the run stays taken
    await rig.connect({"r1": 1})
    release = await rig.received()
    assert isinstance(release, ReleaseRun) and release.run_id == "r1" and release.attempt == 1
    assert rec.phase == "ending" and not w.lost


# ---------------------------------------------------------------------------- accepted, rejected, status


async def test_run_accepted_for_an_old_attempt_is_answered_with_release(rig: Rig) -> None:
    w = await rig.connect()
    rec = rig.queued("r1")
    rig.book.dispatch(rec, w)
    rig.book.requeue(rec, "test")
    rig.book.dispatch(rec, w)
    rig.book.sent(rec)
    await rig.tracker.handle(b"w1", RunAccepted(runner_id="w1", run_id="r1", attempt=1))
    release = await rig.received()
    assert isinstance(release, ReleaseRun) and (release.run_id, release.attempt) == ("r1", 1)
    assert rec.phase == "dispatched"
    await rig.tracker.handle(b"w1", RunAccepted(runner_id="w1", run_id="r1", attempt=2))
    assert rec.phase == "running" and rec.started_at is not None


async def test_run_rejected_requeues_then_fails_the_run_after_max_rejections(rig: Rig) -> None:
    w = await rig.connect()
    rec = rig.queued("r1")
    await rig.tracker.handle(b"w1", RunRejected(runner_id="w1", run_id="r1", attempt=0, reason="stale"))
    assert rec.rejections == 0  # not an attempt the book has active: ignored
    for n in range(1, MAX_REJECTIONS):
        rig.book.dispatch(rec, w)
        rig.book.sent(rec)
        await rig.tracker.handle(b"w1", RunRejected(runner_id="w1", run_id="r1", attempt=n, reason="no room"))
        assert rec.phase == "queued" and rec.not_before > 0 and "no room" in rec.last_rejection
        await rig.tracker.handle(b"w1", RunRejected(runner_id="w1", run_id="r1", attempt=n, reason="again"))
        assert rec.rejections == n  # the same rejection twice counts once
    rig.book.dispatch(rec, w)
    await rig.tracker.handle(b"w1", RunRejected(runner_id="w1", run_id="r1", attempt=MAX_REJECTIONS, reason="no"))
    [end] = rig.pending_ends()
    assert end.kind == "failure" and f"rejected by runners {MAX_REJECTIONS} times" in end.msg
    assert rec.phase == "ending"


async def test_a_rejected_run_that_was_cancelled_meanwhile_ends_cancelled(rig: Rig) -> None:
    w = await rig.connect()
    rec = rig.queued("r1")
    rig.book.dispatch(rec, w)
    rec.cancel_requested, rec.msg = True, "not today"
    await rig.tracker.handle(b"w1", RunRejected(runner_id="w1", run_id="r1", attempt=1, reason="no room"))
    [end] = rig.pending_ends()
    assert (end.kind, end.msg) == ("cancelled", "not today")


async def test_status_adopts_a_queued_run_its_runner_holds_and_releases_what_is_not_its_own(rig: Rig) -> None:
    rec = rig.queued("r1")  # dispatched before a scheduler restart: the journals said queued
    ended = rig.queued("r2")
    rig.book.begin_end(ended)
    rig.book.end(ended, rig_terminal("r2"))
    w = await rig.connect({"r1": 1, "r2": 1, "not-ours": 1})
    assert (rec.phase, rec.runner, rec.attempt) == ("running", "w1", 1) and "r1" in w.runs
    release = await rig.received()
    assert isinstance(release, ReleaseRun) and release.run_id == "r2" and "has ended" in release.reason
    await marker(rig, w)
    assert (await rig.received()).run_id == "marker"  # nothing about `not-ours` (not a scheduler run)
    await rig.connect(runner_id="w2", runs={"r1": 1})  # another runner claims the same attempt
    assert rec.runner == "w1"


def rig_terminal(run_id: str) -> Event:
    return Event(run_id=run_id, seq=2, timestamp="2026-07-01T10:00:00+00:00", stage="pipeline", event="cancelled",
                 msg="cancelled (test)")


# ---------------------------------------------------------------------------- lost mid-dispatch, unreported


async def test_a_runner_lost_mid_dispatch_ends_the_run_and_the_dispatch_is_never_sent(rig: Rig, tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path, SLEEP_PIPELINE)
    w = await rig.connect()
    rec = rig.queued("r1")

    async def assign(run_id: str, runner_id: str, attempt: int) -> None:
        # while the assignment is being made durable, the runner's silence passes runner_lost_after
        assert rec.phase == "dispatching" and (run_id, runner_id, attempt) == ("r1", "w1", 1)
        rig.advance(LOST_AFTER + 1)
        await rig.tracker.judge()

    dispatcher = Dispatcher(rig.book, load_settings(cfg).config, rig.tracker.send, assign, lambda _: "allow")
    await dispatcher.dispatch_ready()
    [end] = rig.pending_ends()
    assert end.rec is rec and end.kind == "failure" and "runner lost" in end.msg
    assert rec.phase == "ending" and "r1" not in rig.book.active and "r1" not in rig.book.queue
    await marker(rig, w)
    assert (await rig.received()).run_id == "marker"  # no DispatchRun went out


async def test_a_dispatch_that_cannot_be_sent_goes_back_to_the_queue(rig: Rig, tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path, SLEEP_PIPELINE)
    w = await rig.connect()
    w.routing = b"gone"  # ROUTER_MANDATORY: a send to a routing id nobody holds fails
    rec = rig.queued("r1")

    async def assign(run_id: str, runner_id: str, attempt: int) -> None:
        return None

    dispatcher = Dispatcher(rig.book, load_settings(cfg).config, rig.tracker.send, assign, lambda _: "allow")
    await dispatcher.dispatch_ready()
    assert rec.phase == "queued" and rec.attempt == 1 and rec.last_rejection == "the dispatch could not be sent"
    assert rig.tracker.dispatch_dropped == 1


@pytest.mark.parametrize(("journal", "expected"), [
    ((), "queued"),                      # only `queued`: the runner never started it -> queued again
    (("start",), "ending"),              # started, then silence -> ended failure by the scheduler
    (("start", "success"), "ended"),     # ended in its journal without a RunFinished -> ended as written
])
async def test_a_run_its_runner_stops_reporting(rig: Rig, journal: tuple[str, ...], expected: str) -> None:
    w = await rig.connect()
    rec = rig.running("r1", w)
    if journal:
        rig.journal("r1", *journal)
    rig.advance(1.0)
    await rig.connect({})  # alive, but not listing the run
    assert rec.unreported_since is not None
    rig.advance(LOST_AFTER - 0.5)
    await rig.connect({})  # a heartbeat keeps the runner alive
    await rig.tracker.judge()
    assert rec.phase == "running"  # not yet
    rig.advance(1.0)
    await rig.connect({})
    await rig.tracker.judge()
    assert rec.phase == expected and not w.lost
    ends = rig.pending_ends()
    if expected == "ending":
        assert [e.kind for e in ends] == ["failure"] and "stopped reporting this run" in ends[0].msg
    else:
        assert ends == []
    if expected == "ended":
        assert rec.outcome == "success"
    if expected == "queued":
        assert rec.runner is None and "never started attempt 1" in rec.last_rejection


async def test_overlap_queue_holds_a_run_while_the_schedules_previous_run_is_active(rig: Rig, tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path, SLEEP_PIPELINE.replace("[pipelines.sleepy]", "[pipelines.sleepy]\nmax_concurrent = 5"))
    w = await rig.connect()
    first, second = rig.queued("r1"), rig.queued("r2")
    first.schedule = second.schedule = "tick"
    first.trigger = second.trigger = "schedule"  # fired by the schedule's clock (a backfill's runs are metered apart)

    async def assign(run_id: str, runner_id: str, attempt: int) -> None:
        return None

    policy = {"tick": "queue"}
    dispatcher = Dispatcher(rig.book, load_settings(cfg).config, rig.tracker.send, assign, policy.__getitem__)
    await dispatcher.dispatch_ready()
    assert first.phase == "dispatched" and second.phase == "queued"
    assert dispatcher.wait_reason(second) == ("waiting: the previous run of schedule tick is still active "
                                              "(overlap = queue)")
    assert isinstance(await rig.received(), DispatchRun)
    rig.book.accept(first)
    rig.journal("r1", "start", "success")
    await rig.tracker.handle(b"w1", RunFinished(runner_id="w1", run_id="r1", attempt=1, outcome="success"))
    assert dispatcher.wait_reason(second) == "waiting: next in the queue"
    await dispatcher.dispatch_ready()
    assert second.phase == "dispatched" and w.runs == {"r2"}
    policy["tick"] = "allow"
    third = rig.queued("r3")
    third.schedule, third.trigger = "tick", "schedule"
    await dispatcher.dispatch_ready()
    assert third.phase == "dispatched"  # overlap = allow: side by side
