"""Runner lifecycle with real processes: kill -9 and restart (the interrupted run ends `failure`, its
processes are gone, its journal intact), SIGTERM shutdown (runs end `cancelled`, no orphans), ReleaseRun
(processes killed, nothing more written), capacity.

A raw pyzmq ROUTER (tests/runner_peer.py) plays the scheduler's side of shared/dispatch.py (the real
scheduler is written in parallel); events are read from the journal files and a plain pyzmq SUB.
"""

from __future__ import annotations

import time
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from shared.dispatch import RunAccepted, RunFinished, RunnerStatus, RunRejected
from shared.events import Event
from shared.journal import JournalWriter, journal_path
from shared.runstate import fold, open_stages
from tests.runner_peer import RunnerRig, journal, queue_run, wait_gone, wait_journal_terminal
from tests.test_runner_stages import pids_from_logs

STAGES = Path(__file__).with_name("runner_stages.py")

BODY = f"""
[pipelines.hang]
[[pipelines.hang.stages]]
name = "hang"
command = ["{{python}}", "{STAGES}", "hang"]
[[pipelines.hang.stages]]
name = "after"
command = ["{{python}}", "{STAGES}", "ok"]

[pipelines.hang-callable]
[[pipelines.hang-callable.stages]]
name = "hang"
callable = "runner_stages:hang_callable"
env = {{ PYTHONPATH = "{STAGES.parent}" }}
"""


@pytest.fixture
def rig(tmp_path: Path, services: list) -> RunnerRig:
    r = RunnerRig(tmp_path, BODY, services=services, runner="capacity = 2").start()
    yield r
    r.close()


def start_hanging(rig: RunnerRig, pipeline: str = "hang") -> tuple[str, list[int]]:
    """Dispatch a run whose stage hangs; return its id and the (grandchild, stage) pids it printed."""
    run_id = queue_run(rig.home, pipeline)
    rig.sched.dispatch(run_id, pipeline)
    rig.sched.wait_for(RunAccepted, run_id=run_id)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        evs = journal(rig.home, run_id)
        pids = pids_from_logs(evs, "grandchild") + pids_from_logs(evs, "stage")
        if len(pids) == 2:
            return run_id, pids
        time.sleep(0.05)
    raise AssertionError(f"the stage of {run_id} never printed its pids: {journal(rig.home, run_id)}")


def check_journal_file(path: Path, run_id: str) -> list[Event]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "torn last line"
    events = [msgspec.json.decode(line, type=Event) for line in raw.split(b"\n")[:-1]]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.run_id == run_id for e in events)
    return events


@pytest.mark.parametrize("pipeline", ["hang", "hang-callable"])
def test_kill9_then_restart_ends_the_run_and_its_processes(rig: RunnerRig, pipeline: str) -> None:
    run_id, (grandchild, stage_pid) = start_hanging(rig, pipeline)
    before = journal(rig.home, run_id)
    rig.kill9()
    # the stage process dies with the runner (PR_SET_PDEATHSIG set by runner_svc.child)
    assert wait_gone(stage_pid, 10), "the stage process outlived its runner"
    path = journal_path(rig.home / "events", run_id)
    events = check_journal_file(path, run_id)
    assert events == before and not events[-1].is_terminal

    rig.restart()
    rig.svc.wait_for(rf"run {run_id}: runner test-runner restarted: run interrupted \(last seq {len(events)}\)")
    after = check_journal_file(path, run_id)
    assert after[: len(events)] == events
    # the stage that was running ends too (no stage stays "running"), then the run
    state = fold(run_id, after)
    assert open_stages(state) == [] and state.stages["hang"].status == "failure"
    assert [(e.stage, e.event) for e in after[len(events):-1]] == [("hang", "failure")]
    last = after[-1]
    assert last.is_terminal and last.event == "failure"
    assert last.msg == f"runner test-runner restarted: run interrupted (last seq {len(events)})"
    # the grandchild (its own child, not told about the runner's death) is swept on restart
    assert wait_gone(grandchild, 10), "the stage's child survived the runner's restart"
    finished = rig.sched.wait_for(RunFinished, run_id=run_id)
    assert finished.outcome == "failure"


def test_restart_leaves_other_runs_alone(rig: RunnerRig, tmp_path: Path) -> None:
    tz = ZoneInfo("America/Chicago")
    events_dir = rig.home / "events"
    queued_only = queue_run(rig.home, "hang")
    other = queue_run(rig.home, "hang")
    with JournalWriter.open(events_dir, other, tz) as w:
        w.append("pipeline", "start", "on another runner", {"runner": "someone-else", "attempt": 1, "pid": 1})
    mine_but_locked = queue_run(rig.home, "hang")
    with JournalWriter.open(events_dir, mine_but_locked, tz) as w:
        w.append("pipeline", "start", "ours", {"runner": "test-runner", "attempt": 1, "pid": 1})
    holder = JournalWriter.open(events_dir, mine_but_locked, tz)  # someone (the scheduler) holds it
    try:
        rig.svc.stop()
        rig.restart()
        rig.svc.wait_for(rf"run {mine_but_locked}: interrupted run of this runner not recovered now: .*held by another writer")
    finally:
        holder.close()
    assert [e.event for e in journal(rig.home, queued_only)] == ["queued"]
    assert [e.event for e in journal(rig.home, other)] == ["queued", "start"]
    assert [e.event for e in journal(rig.home, mine_but_locked)] == ["queued", "start"]


def test_sigterm_cancels_active_runs_cleanly(rig: RunnerRig) -> None:
    run_id, pids = start_hanging(rig)
    assert rig.svc.stop() == 0
    for pid in pids:
        assert wait_gone(pid, 5), f"process {pid} outlived the runner's shutdown"
    events = check_journal_file(journal_path(rig.home / "events", run_id), run_id)
    assert ("hang", "cancelled") in [(e.stage, e.event) for e in events]
    assert events[-1].event == "cancelled" and events[-1].msg == "runner shutting down"
    assert "runner stopped" in rig.svc.output()


def test_release_kills_and_writes_nothing_more(rig: RunnerRig) -> None:
    run_id, pids = start_hanging(rig)
    before = journal(rig.home, run_id)
    rig.sched.release(run_id, reason="declared lost")
    for pid in pids:
        assert wait_gone(pid, 10)
    rig.svc.wait_for(rf"run {run_id}: released; journal closed")
    # the runner no longer reports it, and wrote nothing after the release
    end = time.monotonic() + 10
    while time.monotonic() < end:
        status = rig.sched.wait_for(RunnerStatus)
        if run_id not in status.runs:
            break
    else:
        raise AssertionError("the released run is still reported as the runner's")
    assert journal(rig.home, run_id) == before
    # the journal is free again: the scheduler can write the terminal itself
    with JournalWriter.open(rig.home / "events", run_id, ZoneInfo("UTC")) as w:
        w.append("pipeline", "failure", "runner lost")


def test_capacity_rejects_the_run_beyond_it(rig: RunnerRig) -> None:
    first, _ = start_hanging(rig)
    second, _ = start_hanging(rig)
    third = queue_run(rig.home, "hang")
    rig.sched.dispatch(third, "hang")
    rej = rig.sched.wait_for(RunRejected, run_id=third)
    assert "at capacity (2 runs)" in rej.reason
    assert [e.event for e in journal(rig.home, third)] == ["queued"]
    end = time.monotonic() + 10  # statuses sent before the dispatches may still be queued
    while set(rig.sched.wait_for(RunnerStatus).runs) != {first, second}:
        assert time.monotonic() < end, "the runner never reported both runs"
    rig.sched.cancel(first)
    rig.sched.cancel(second)
    assert wait_journal_terminal(rig.home, first)[-1].event == "cancelled"
    assert wait_journal_terminal(rig.home, second)[-1].event == "cancelled"


def test_heartbeat_carries_each_active_runs_last_seq(rig: RunnerRig) -> None:
    from shared.wire import decode_heartbeat_payload
    from tests.runner_peer import EventSub

    run_id, _ = start_hanging(rig)
    hb_sub = EventSub(rig.ports.publish, topic=b"hb/")
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if not hb_sub.sock.poll(1000):
                continue
            topic, payload = hb_sub.sock.recv_multipart()
            assert topic == b"hb/test-runner"
            hb = decode_heartbeat_payload(payload)
            assert hb.service == "runner" and hb.journal_dir == str(rig.home / "events")
            if hb.runs.get(run_id) == journal(rig.home, run_id)[-1].seq:
                break
        else:
            raise AssertionError("no heartbeat with the run's last seq")
    finally:
        hb_sub.close()
    rig.sched.cancel(run_id)
    wait_journal_terminal(rig.home, run_id)


def test_heartbeats_list_an_ended_run_and_say_when_the_runner_stops(rig: RunnerRig) -> None:
    """A subscriber that lost a run's last events, terminal included, learns of them from the next
    heartbeats (ended runs stay listed for a while); a clean stop ends with a `stopping` heartbeat."""
    from shared.wire import decode_heartbeat_payload
    from tests.runner_peer import EventSub

    run_id, _ = start_hanging(rig)
    rig.sched.cancel(run_id)
    last = wait_journal_terminal(rig.home, run_id)[-1].seq
    hb_sub = EventSub(rig.ports.publish, topic=b"hb/")
    try:
        seen_after_end = False
        end = time.monotonic() + 20
        while time.monotonic() < end and not seen_after_end:
            if hb_sub.sock.poll(1000):
                hb = decode_heartbeat_payload(hb_sub.sock.recv_multipart()[1])
                seen_after_end = hb.runs.get(run_id) == last and not hb.stopping
        assert seen_after_end, "no heartbeat listing the ended run with its terminal seq"
        rig.svc.stop()
        stopping = None
        end = time.monotonic() + 10
        while time.monotonic() < end and stopping is None:
            if hb_sub.sock.poll(500):
                hb = decode_heartbeat_payload(hb_sub.sock.recv_multipart()[1])
                if hb.stopping:
                    stopping = hb
        assert stopping is not None, "no final heartbeat with stopping=True"
    finally:
        hb_sub.close()
