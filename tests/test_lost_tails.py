"""The end of a run that a restarting runner writes ("runner ... restarted: run interrupted") goes out
right after its PUB socket binds, before subscribers are back: its heartbeats must list the run with its
last seq for the documented minute, also after another restart, so a subscriber that follows the
README's recipe (examples/zmq_subscriber.py), connected after the restart, still learns of the end.
Real runner (with the test's scheduler peer), real gateway, the example as a separate program."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from shared.dispatch import RunAccepted
from shared.journal import read_events
from shared.wire import decode_heartbeat_payload
from tests.harness import REPO, Service
from tests.runner_peer import EventSub, RunnerRig, queue_run
from tests.test_fencing import BODY
from tests.test_orphans import stage_pids


def follow_with_the_example(rig: RunnerRig, run_id: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "zmq_subscriber.py"),
         "--pub", f"tcp://127.0.0.1:{rig.ports.publish}", "--pub", f"tcp://127.0.0.1:{rig.ports.scheduler_publish}",
         "--gateway", f"http://127.0.0.1:{rig.ports.http}", "--run", run_id, "--until-terminal"],
        capture_output=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def listed_in_heartbeats(rig: RunnerRig, run_id: str) -> int:
    sub = EventSub(rig.ports.publish, topic=b"hb/")
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if sub.sock.poll(500):
                hb = decode_heartbeat_payload(sub.sock.recv_multipart()[1])
                if run_id in hb.runs:
                    return hb.runs[run_id]
        raise AssertionError(f"no heartbeat of the restarted runner lists {run_id}")
    finally:
        sub.close()


def test_run_ended_by_a_restarting_runner_is_in_its_heartbeats(tmp_path: Path, services: list[Service]) -> None:
    rig = RunnerRig(tmp_path, BODY, services=services).start()
    try:
        services.append(Service("gateway_svc", rig.config, tmp_path).start())
        run_id = queue_run(rig.home, "ticking")
        rig.sched.dispatch(run_id, "ticking")
        rig.sched.wait_for(RunAccepted, run_id=run_id)
        stage_pids(rig.home / "events", run_id)
        rig.kill9()
        rig.restart()
        rig.svc.wait_for(rf"run {run_id}: runner test-runner restarted: run interrupted")
        events = read_events(rig.home / "events", run_id)
        assert events[-1].is_terminal and "restarted: run interrupted" in events[-1].msg

        printed = follow_with_the_example(rig, run_id)  # connected after the restart
        assert [e["seq"] for e in printed] == [e.seq for e in events]

        rig.kill9()  # and once more: the list survives the restart
        rig.restart()
        assert listed_in_heartbeats(rig, run_id) == events[-1].seq
        printed = follow_with_the_example(rig, run_id)
        assert [e["seq"] for e in printed] == [e.seq for e in events]
    finally:
        rig.close()
