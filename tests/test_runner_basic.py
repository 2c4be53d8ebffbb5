"""The runner as a real subprocess: start-up, a command pipeline end to end (journal and PUB agree),
and its control socket (Identity, Probe, garbage).

The scheduler's side of the dispatch protocol is played by a raw pyzmq ROUTER (tests/runner_peer.py):
the real scheduler is written in parallel and is not under test here. Events are received with a plain
pyzmq SUB, not with our own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq

from shared.control import ControlClient, Identity, Probe
from shared.dispatch import RunFinished, RunnerStatus, RunRejected
from shared.errors import ProtocolError
from shared.journal import read_events
from tests.runner_peer import RunnerRig, queue_run

TWO_STAGES = """
[pipelines.two]
[pipelines.two.params.word]
type = "str"
default = "hello"
[[pipelines.two.stages]]
name = "say"
command = ["{python}", "-c", "import sys; print(sys.argv[1]); print('to stderr', file=sys.stderr)", "{word}-{run_id}"]
[[pipelines.two.stages]]
name = "write"
command = ["{python}", "-c", "import pathlib,sys; pathlib.Path(sys.argv[1]).write_text('x')", "{home}/out.txt"]
outputs = ["out.txt"]
"""


@pytest.fixture(params=["flush", "fsync"])
def rig(request: pytest.FixtureRequest, tmp_path: Path, services: list) -> RunnerRig:
    r = RunnerRig(tmp_path, TWO_STAGES, services=services, runner=f'durability = "{request.param}"').start()
    yield r
    r.close()


def test_status_then_command_pipeline_end_to_end(rig: RunnerRig) -> None:
    status = rig.sched.wait_for(RunnerStatus)
    assert status.runner_id == "test-runner" and status.capacity >= 1
    assert status.journal_dir == str(rig.home / "events")

    run_id, events, published = rig.run("two", {"word": "hi"})
    kinds = [(e.stage, e.event) for e in events]
    assert kinds[0] == ("pipeline", "queued") and kinds[1] == ("pipeline", "start")
    assert events[1].data["runner"] == "test-runner" and events[1].data["attempt"] == 1
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    terminals = [e for e in events if e.is_terminal]
    assert terminals == [events[-1]] and events[-1].event == "success", events[-1]
    assert ("say", "success") in kinds and ("write", "success") in kinds
    logs = [(e.data["stream"], e.msg) for e in events if e.stage == "say" and e.event == "log"]
    assert ("stdout", f"hi-{run_id}") in logs and ("stderr", "to stderr") in logs
    assert (rig.home / "out.txt").read_text() == "x"

    # the plain SUB saw exactly the journal's events after `queued` (written by the scheduler), in order
    as_dicts = [json.loads(json.dumps({k: v for k, v in {
        "run_id": e.run_id, "seq": e.seq, "timestamp": e.timestamp, "stage": e.stage, "event": e.event,
        "msg": e.msg, "data": e.data}.items() if v not in (None, "")})) for e in events[1:]]
    assert published == as_dicts
    assert rig.sub.topics[-1] == f"ev/{run_id}/pipeline/success".encode()

    finished = rig.sched.wait_for(RunFinished, run_id=run_id)
    assert finished.outcome == "success" and finished.attempt == 1
    report = json.loads((rig.home / "reports" / f"{run_id}.json").read_text())
    assert report["status"] == "success"
    assert report["stages"]["say"]["status"] == "success" and report["stages"]["say"]["duration_s"] >= 0


def test_rejections_write_nothing(rig: RunnerRig) -> None:
    run_id = queue_run(rig.home, "two")
    rig.sched.dispatch(run_id, "no-such-pipeline")
    rej = rig.sched.wait_for(RunRejected, run_id=run_id)
    assert "unknown pipeline" in rej.reason
    rig.sched.dispatch("never-queued-run", "two")
    rej = rig.sched.wait_for(RunRejected, run_id="never-queued-run")
    assert "does not exist" in rej.reason
    assert [e.event for e in read_events(rig.home / "events", run_id)] == ["queued"]


async def test_identity_probe_and_garbage(rig: RunnerRig) -> None:
    endpoint = f"tcp://127.0.0.1:{rig.ports.runner_control}"
    async with ControlClient(endpoint, timeout=10) as client:
        info = await client.call(Identity())
        assert info.service == "runner"
        assert info.journal_dir == str(rig.home / "events")
        assert info.config_path == str(rig.config)

        result = await client.call(Probe())
        assert result.last_seq == 2
        events = read_events(rig.home / "events", result.run_id)
        assert [(e.stage, e.event, e.msg) for e in events][1] == ("pipeline", "success", "probe")
        assert events[0].data["trigger"] == "probe"
        published = rig.sub.until_terminal(result.run_id, 10)
        assert [e["seq"] for e in published] == [1, 2]

    # garbage on the control socket gets an error reply; the runner keeps serving
    ctx = zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(endpoint)
        raw.send(b"\xc1 definitely not msgpack")
        assert raw.poll(10_000)
        reply = raw.recv()
        assert b"bad_request" in reply
        raw.close()
    finally:
        ctx.term()
    async with ControlClient(endpoint, timeout=10) as client:
        with pytest.raises(ProtocolError):
            from shared.control import ListRuns
            await client.call(ListRuns())
        assert (await client.call(Identity())).service == "runner"


def test_start_errors_are_clear(tmp_path: Path) -> None:
    """A taken port ends the runner with a one-line reason (exit 1); a bad config with exit 2."""
    import subprocess
    import sys

    from tests.harness import REPO, write_config

    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)
    squatter.setsockopt(zmq.LINGER, 0)
    try:
        config, ports = write_config(tmp_path)
        squatter.bind(f"tcp://127.0.0.1:{ports.publish}")
        proc = subprocess.run([sys.executable, "-m", "runner_svc", "--config", str(config)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert f"runner cannot start: runner.publish: cannot bind PUB socket on tcp://127.0.0.1:{ports.publish}" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        squatter.close()
        ctx.term()
    bad = tmp_path / "bad.toml"
    bad.write_text("[runner]\ncapacityy = 3\n")
    proc = subprocess.run([sys.executable, "-m", "runner_svc", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "capacityy" in proc.stderr and str(bad) in proc.stderr
