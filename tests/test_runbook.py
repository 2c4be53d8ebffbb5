"""The run book's transitions, in-process: each one allowed from the phases it leaves (with the queue,
active and per-runner membership that follows), and refused, as a bug, from every other phase."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from scheduler_svc.runbook import RunBook, RunnerInfo, TransitionError
from scheduler_svc.runs import RunRecord
from shared.dispatch import RunnerStatus
from shared.events import Event

PHASES = ("queued", "dispatching", "dispatched", "running", "ending", "ended")


def runner(book: RunBook, runner_id: str = "w1", capacity: int = 2) -> RunnerInfo:
    r = book.runner(runner_id, last_seen=0.0)
    r.routing = runner_id.encode()
    r.status = RunnerStatus(runner_id=runner_id, capacity=capacity, pid=1, version="t", config_path="c.toml",
                            journal_dir="/j", publish="tcp://127.0.0.1:1", control="tcp://127.0.0.1:2")
    return r


def terminal(run_id: str, kind: str = "success", seq: int = 5) -> Event:
    return Event(run_id=run_id, seq=seq, timestamp="2026-07-01T10:00:00+00:00", stage="pipeline", event=kind,
                 msg=f"{kind} by test")


def in_phase(book: RunBook, phase: str, run_id: str = "r1") -> RunRecord:
    """A run brought to `phase` by the book's own transitions."""
    rec = RunRecord(run_id=run_id, pipeline="p", params={})
    book.record(rec)
    if phase == "queued":
        book.enqueue(rec)
        return rec
    if phase in ("ending", "ended"):
        book.begin_end(rec)
        if phase == "ended":
            book.end(rec, terminal(run_id, "cancelled", 2))
        return rec
    book.enqueue(rec)
    book.dispatch(rec, runner(book))
    if phase in ("dispatched", "running"):
        book.sent(rec)
    if phase == "running":
        book.accept(rec)
    return rec


def membership(book: RunBook, rec: RunRecord) -> tuple[bool, bool, bool, bool]:
    """(in runs, in queue, in active, in its runner's runs)"""
    on_runner = any(rec.run_id in r.runs for r in book.runners.values())
    return rec.run_id in book.runs, rec.run_id in book.queue, rec.run_id in book.active, on_runner


def test_the_life_of_a_run_moves_it_between_the_sets() -> None:
    book = RunBook()
    w = runner(book)
    rec = RunRecord(run_id="r1", pipeline="p", params={})
    book.record(rec)
    assert membership(book, rec) == (True, False, False, False) and rec.phase == "queued"
    book.enqueue(rec)
    assert membership(book, rec) == (True, True, False, False)
    assert book.owned_seqs() == {"r1": 1}  # the scheduler holds its journal
    book.dispatch(rec, w)
    assert (rec.phase, rec.attempt, rec.runner) == ("dispatching", 1, "w1")
    assert membership(book, rec) == (True, False, True, True) and w.free() == 1
    assert book.owned_by(rec, "w1", 1) and not book.owned_by(rec, "w1", 2) and not book.owned_by(rec, "w2", 1)
    book.sent(rec)
    assert rec.phase == "dispatched" and book.owned_seqs() == {"r1": 1}
    book.accept(rec, started_at="2026-07-01T10:00:00+00:00")
    assert rec.phase == "running" and rec.started_at == "2026-07-01T10:00:00+00:00"
    assert book.owned_seqs() == {}  # the runner holds it now
    book.accept(rec, started_at="later")  # a status listing it again: still running, start kept
    assert rec.phase == "running" and rec.started_at == "2026-07-01T10:00:00+00:00"
    book.finish(rec, terminal("r1"), "success")
    assert (rec.phase, rec.outcome, rec.last_seq) == ("ended", "success", 5)
    assert membership(book, rec) == (True, False, False, False) and w.free() == 2
    book.forget(rec)
    assert membership(book, rec) == (False, False, False, False)


def test_a_finish_without_a_terminal_event_takes_the_runners_word() -> None:
    book = RunBook()
    rec = in_phase(book, "running")
    book.finish(rec, None, "failure")
    assert (rec.phase, rec.outcome, rec.status) == ("ended", "failure", "failure")


@pytest.mark.parametrize("phase", ["dispatching", "dispatched", "running"])
def test_requeue_from_each_active_phase_frees_the_slot_and_keeps_the_attempt(phase: str) -> None:
    book = RunBook()
    rec = in_phase(book, phase)
    w = book.runners["w1"]
    book.requeue(rec, "runner w1: no room", delay=30.0)
    assert rec.phase == "queued" and rec.runner is None and rec.attempt == 1 and rec.last_rejection == "runner w1: no room"
    assert membership(book, rec) == (True, True, False, False) and w.free() == 2
    assert rec.not_before > 0
    book.dispatch(rec, w)
    assert rec.attempt == 2  # attempts never repeat


@pytest.mark.parametrize("phase", ["queued", "dispatching", "dispatched", "running"])
def test_begin_end_from_queued_or_active_then_end(phase: str) -> None:
    book = RunBook()
    rec = in_phase(book, phase)
    book.begin_end(rec)
    assert rec.phase == "ending"
    assert membership(book, rec) == (True, False, False, False)  # no slot, not dispatchable
    book.end(rec, terminal("r1", "failure"))
    assert (rec.phase, rec.outcome) == ("ended", "failure")


def test_adopt_takes_a_queued_run_onto_the_runner_that_reports_it() -> None:
    book = RunBook()
    rec = in_phase(book, "queued")
    w = runner(book, "w2")
    book.adopt(rec, w, 3)
    assert (rec.phase, rec.runner, rec.attempt) == ("running", "w2", 3)
    assert membership(book, rec) == (True, False, True, True) and book.owned_by(rec, "w2", 3)


def test_forget_of_a_run_being_ended_whose_journal_vanished() -> None:
    book = RunBook()
    rec = in_phase(book, "ending")
    book.forget(rec)
    assert "r1" not in book.runs


def test_restore_active_waits_for_the_runner_word() -> None:
    book = RunBook()
    rec = RunRecord(run_id="r1", pipeline="p", params={}, runner="w9", attempt=2)
    w = book.runner("w9", last_seen=0.0)
    book.restore_active(rec, w, now=7.0)
    assert rec.phase == "dispatched" and rec.recovered and rec.unreported_since == 7.0
    assert membership(book, rec) == (True, False, True, True)
    book.accept(rec)
    assert rec.phase == "running" and not rec.recovered and rec.unreported_since is None


ALLOWED: dict[str, tuple[Callable[[RunBook, RunRecord], None], set[str]]] = {
    "enqueue": (lambda b, r: b.enqueue(r), set()),  # (queued runs of in_phase are enqueued already)
    "dispatch": (lambda b, r: b.dispatch(r, runner(b, "w2")), {"queued"}),
    "sent": (lambda b, r: b.sent(r), {"dispatching"}),
    "accept": (lambda b, r: b.accept(r), {"dispatching", "dispatched", "running"}),
    "adopt": (lambda b, r: b.adopt(r, runner(b, "w2"), 1), {"queued"}),
    "requeue": (lambda b, r: b.requeue(r, "why"), {"dispatching", "dispatched", "running"}),
    "begin_end": (lambda b, r: b.begin_end(r), {"queued", "dispatching", "dispatched", "running"}),
    "end": (lambda b, r: b.end(r, terminal(r.run_id)), {"ending"}),
    "finish": (lambda b, r: b.finish(r, terminal(r.run_id), "success"), {"dispatching", "dispatched", "running"}),
    "forget": (lambda b, r: b.forget(r), {"ending", "ended"}),
}
REFUSED = [(name, phase) for name, (_, ok) in ALLOWED.items() for phase in PHASES if phase not in ok]


@pytest.mark.parametrize(("transition", "phase"), REFUSED)
def test_a_transition_from_a_phase_it_does_not_leave_is_refused_and_changes_nothing(transition: str, phase: str) -> None:
    book = RunBook()
    rec = in_phase(book, phase)
    before = (rec.phase, rec.attempt, rec.runner, membership(book, rec))
    with pytest.raises(TransitionError, match=f"run r1: {transition}"):
        ALLOWED[transition][0](book, rec)
    assert (rec.phase, rec.attempt, rec.runner, membership(book, rec)) == before


@pytest.mark.parametrize(("transition", "phase"), [(n, p) for n, (_, ok) in ALLOWED.items() for p in ok])
def test_a_transition_of_a_run_the_book_does_not_hold_is_refused(transition: str, phase: str) -> None:
    other = RunBook()
    rec = in_phase(other, phase)
    with pytest.raises(TransitionError, match="does not hold"):
        ALLOWED[transition][0](RunBook(), rec)


def test_record_refuses_a_second_record_and_a_run_in_flight() -> None:
    book = RunBook()
    in_phase(book, "queued")
    with pytest.raises(TransitionError, match="recorded twice"):
        book.record(RunRecord(run_id="r1", pipeline="p", params={}))
    with pytest.raises(TransitionError, match="enqueued twice"):
        book.enqueue(book.runs["r1"])
    with pytest.raises(TransitionError, match="recorded in phase 'running'"):
        book.record(RunRecord(run_id="r2", pipeline="p", params={}, phase="running"))


async def test_changes_wake_the_dispatcher_once_each() -> None:
    book = RunBook()
    in_phase(book, "queued")  # enqueue: a change, before anyone waits
    with anyio.fail_after(5):
        await book.wait_changed()  # not lost although nobody waited yet
    woke = anyio.Event()

    async def waiter() -> None:
        await book.wait_changed()
        woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert not woke.is_set()  # the change above was consumed
        book.begin_end(book.runs["r1"])
        with anyio.fail_after(5):
            await woke.wait()
