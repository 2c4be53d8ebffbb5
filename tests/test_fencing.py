"""A hung runner (SIGSTOP) is fenced off: the scheduler ends its run "runner lost" within
runner_lost_after and a few seconds although the stopped process still holds the journal's flock, and
the runner, woken up, writes and publishes nothing more for that run. Real scheduler and runner
processes, a plain pyzmq SUB on both PUB sockets."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from shared.config import load_settings
from shared.events import Event
from shared.journal import journal_path, read_events
from shared.runstate import fold, open_stages
from tests.harness import SLEEP_PIPELINE, Service, write_config
from tests.runner_peer import pid_alive, wait_gone
from tests.test_runner_stages import pids_from_logs

STAGE = Path(__file__).with_name("orphan_stage.py")
LOST_AFTER = 3.0  # the harness's scheduler.runner_lost_after

BODY = SLEEP_PIPELINE + f"""
[pipelines.ticking]
[[pipelines.ticking.stages]]
name = "tick"
command = ["{{python}}", "{STAGE}"]
log_rate = 1000
"""

_decoder = msgspec.msgpack.Decoder()


def wait_for(what: str, check, timeout: float):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def launch(ports_control: str, pipeline: str, params: dict | None = None) -> str:
    import anyio

    from shared.control import ControlClient, Launch

    async def go() -> str:
        async with ControlClient(ports_control) as client:
            return (await client.call(Launch(pipeline=pipeline, params=params or {}))).run_id
    return anyio.run(go)


def processes_with_run_id(run_id: str) -> list[int]:
    """Every live process whose environment names the run (read here, not with runwire's code)."""
    needle = f"RUNWIRE_RUN_ID={run_id}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and pid_alive(int(name)):
            out.append(int(name))
    return out


def test_stopped_runner_is_fenced_and_its_run_ends(tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path, BODY)
    settings = load_settings(cfg)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    runner = Service("runner_svc", cfg, tmp_path).start()
    services.append(runner)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"ev/")
    sub.connect(f"tcp://127.0.0.1:{ports.publish}")
    sub.connect(f"tcp://127.0.0.1:{ports.scheduler_publish}")
    received: list[tuple[float, dict]] = []

    def drain(for_s: float = 0.0) -> None:
        end = time.monotonic() + for_s
        while True:
            if sub.poll(max(0, int((end - time.monotonic()) * 1000))):
                _, payload = sub.recv_multipart()
                received.append((time.monotonic(), _decoder.decode(payload)))
            elif time.monotonic() >= end:
                return

    stopped = False
    try:
        run_id = launch(settings.config.scheduler.control, "ticking")
        events = wait_for("the stage's pids", lambda: (lambda evs: evs if len(pids_from_logs(evs, "grandchild") + pids_from_logs(evs, "stage")) == 2 else None)(read_events(settings.journal_dir, run_id)), 30)
        grandchild, stage_pid = pids_from_logs(events, "grandchild")[0], pids_from_logs(events, "stage")[0]
        drain(0.5)
        os.kill(runner.pid, signal.SIGSTOP)
        stopped = True
        t0 = time.monotonic()

        def ended() -> list[Event] | None:
            drain()
            evs = read_events(settings.journal_dir, run_id)
            return evs if evs and evs[-1].is_terminal else None
        events = wait_for("the run's end while its runner is stopped", ended, LOST_AFTER + 15)
        took = time.monotonic() - t0
        terminal = events[-1]
        assert terminal.event == "failure" and terminal.msg.startswith("runner lost"), terminal
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert sum(e.is_terminal for e in events) == 1
        assert open_stages(fold(run_id, events)) == []
        # the stage and the grandchild that left its group are ended by the scheduler, on this host
        assert wait_gone(stage_pid, 10) and wait_gone(grandchild, 10), "the lost run's processes outlived its end"
        assert processes_with_run_id(run_id) == []
        journal_bytes = journal_path(settings.journal_dir, run_id).read_bytes()

        os.kill(runner.pid, signal.SIGCONT)
        stopped = False
        runner.wait_for(rf"run {run_id}: (fenced|released)", 20)
        drain(2.0)  # heartbeats resume, the runner journals what its stage printed meanwhile (refused)
        assert journal_path(settings.journal_dir, run_id).read_bytes() == journal_bytes, "the fenced runner wrote to the journal"
        mine = [(at, ev) for at, ev in received if ev["run_id"] == run_id]
        end_at = next(at for at, ev in mine if ev["seq"] == terminal.seq)
        late = [ev for at, ev in mine if at > end_at or ev["seq"] > terminal.seq]
        assert late == [], f"published after the run's end: {late}"
        assert processes_with_run_id(run_id) == []
        # the woken runner serves again
        again = launch(settings.config.scheduler.control, "sleepy", {"seconds": 0.1})
        last = wait_for("a new run on the woken runner", lambda: (lambda evs: evs[-1] if evs and evs[-1].is_terminal else None)(read_events(settings.journal_dir, again)), 30)
        assert last.event == "success", last
        print(f"run ended {took:.1f}s after SIGSTOP (runner_lost_after {LOST_AFTER}s)")
    finally:
        if stopped:
            os.kill(runner.pid, signal.SIGCONT)
        sub.close(0)
        ctx.term()


@pytest.mark.parametrize("after", ["terminal", "open"])
def test_fence_left_half_done_is_finished_or_undone_at_start(tmp_path: Path, after: str) -> None:
    """A process that dies mid-fence leaves the old file beside the journal: the next start keeps the
    journal if it has the run's end, else puts the old file (which has every line) back."""
    from zoneinfo import ZoneInfo

    from shared.fence import restore_fences
    from shared.journal import JournalWriter, begin_run

    tz = ZoneInfo("UTC")
    jdir = tmp_path / "events"
    begin_run(jdir, "r1", tz, "p", {}, {"trigger": "manual"})
    path = journal_path(jdir, "r1")
    with JournalWriter.open(jdir, "r1", tz) as w:
        w.append("pipeline", "start", "s")
        w.append("st", "log", "one")
    old = jdir / ".fenced-r1.jsonl"
    os.link(path, old)  # step 2 of a fence: the old file kept reachable
    full = path.read_bytes()
    copy = jdir / ".copy"
    copy.write_bytes(full[: full.index(b"\n") + 1])  # a copy that lacks the later lines
    os.replace(copy, path)  # ... took the journal's path; then the fencer died
    if after == "terminal":  # it died after writing the delta and the end, before removing the old file
        os.truncate(path, 0)
        path.write_bytes(full)
        with JournalWriter.open(jdir, "r1", tz) as w:
            w.append("pipeline", "failure", "runner lost")
    assert restore_fences(jdir) == ["r1"]
    assert not old.exists()
    events = read_events(jdir, "r1")
    if after == "terminal":
        assert events[-1].msg == "runner lost"
    else:
        assert path.read_bytes() == full and [e.seq for e in events] == [1, 2, 3]
