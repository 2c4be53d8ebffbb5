"""A run whose execution itself raises ends with every stage and fan-out item terminal, in the journal
and in the report, not "running". Real runner process (tests/faulty_runner.py: the runner with a stage
environment holding a NUL byte planted after its config was checked, since no input can carry one any
more, so spawning the stage process fails outside the stage's own error handling)."""

from __future__ import annotations

import json
from pathlib import Path

from shared.runstate import fold, open_stages
from tests.harness import Service
from tests.runner_peer import RunnerRig

BODY = """
[pipelines.raises]
[[pipelines.raises.stages]]
name = "first"
command = ["{python}", "-c", "print('fine')"]
[[pipelines.raises.stages]]
name = "broken"
command = ["{python}", "-c", "print('never')"]
fan_out = ["a", "b"]
"""


def test_execution_error_leaves_no_stage_running(tmp_path: Path, services: list[Service]) -> None:
    rig = RunnerRig(tmp_path, BODY, services=services, module="tests.faulty_runner").start()
    try:
        run_id, events, published = rig.run("raises")
    finally:
        rig.close()
    last = events[-1]
    assert last.event == "failure" and last.msg.startswith("runner error"), last
    state = fold(run_id, events)
    assert open_stages(state) == []
    assert state.stages["first"].status == "success"
    assert state.stages["broken"].status == "failure"
    assert {i: it.status for i, it in state.stages["broken"].items.items()} == {"a": "failure", "b": "failure"}
    assert [e["seq"] for e in published] == [e.seq for e in events[1:]]  # `queued` is the test's own
    report = json.loads((rig.home / "reports" / f"{run_id}.json").read_text())
    assert report["stages"]["broken"]["status"] == "failure"
    assert {i: it["status"] for i, it in report["stages"]["broken"]["items"].items()} == {"a": "failure", "b": "failure"}
