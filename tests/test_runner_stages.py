"""Stage semantics of the runner, with real processes: timeouts and cancel end whole process groups,
on_failure stop/continue, requires (skipped), retries, fan-out policies, the log rate cap, success
markers and callable stages.

The runner runs as a subprocess; a raw pyzmq ROUTER (tests/runner_peer.py) plays the scheduler's side of
shared/dispatch.py, since the real scheduler is written in parallel; events arrive on a plain pyzmq SUB.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from shared.dispatch import RunAccepted, RunFinished
from tests.runner_peer import RunnerRig, journal, queue_run, wait_gone, wait_journal_terminal

STAGES = Path(__file__).with_name("runner_stages.py")
TESTS_DIR = Path(__file__).parent

BODY = f"""
[pipelines.hang]
[[pipelines.hang.stages]]
name = "hang"
command = ["{{python}}", "{STAGES}", "hang"]
timeout = 4  # long enough for two interpreters to start on a loaded machine
[[pipelines.hang.stages]]
name = "after"
command = ["{{python}}", "{STAGES}", "ok"]

[pipelines.cancel-me]
[[pipelines.cancel-me.stages]]
name = "hang"
command = ["{{python}}", "{STAGES}", "hang"]
[[pipelines.cancel-me.stages]]
name = "after"
command = ["{{python}}", "{STAGES}", "ok"]

[pipelines.stop]
[[pipelines.stop.stages]]
name = "bad"
command = ["{{python}}", "{STAGES}", "fail"]
[[pipelines.stop.stages]]
name = "good"
command = ["{{python}}", "{STAGES}", "ok"]

[pipelines.continue]
[[pipelines.continue.stages]]
name = "bad"
command = ["{{python}}", "{STAGES}", "fail"]
on_failure = "continue"
[[pipelines.continue.stages]]
name = "good"
command = ["{{python}}", "{STAGES}", "ok"]

[pipelines.requires]
[[pipelines.requires.stages]]
name = "needs-csv"
command = ["{{python}}", "{STAGES}", "ok"]
requires = "data/raw/*.csv"
[[pipelines.requires.stages]]
name = "good"
command = ["{{python}}", "{STAGES}", "ok"]

[pipelines.retry]
[[pipelines.retry.stages]]
name = "flaky"
command = ["{{python}}", "{STAGES}", "fail_once", "{{home}}/flaky.marker"]
retries = 2
retry_backoff = 0.1

[pipelines.fan-all]
[pipelines.fan-all.params.bad]
type = "str"
default = "NQ"
[[pipelines.fan-all.stages]]
name = "per-item"
command = ["{{python}}", "{STAGES}", "item", "{{item}}", "{{bad}}"]
fan_out = ["ES", "NQ", "CL"]
max_parallel = 2
item_policy = "all"

[pipelines.fan-any]
[pipelines.fan-any.params.instruments]
type = "list"
default = ["ES", "NQ", "CL"]
[[pipelines.fan-any.stages]]
name = "per-item"
command = ["{{python}}", "{STAGES}", "item", "{{item}}", "NQ,CL"]
fan_out = "instruments"
item_policy = "any"

[pipelines.spam]
[[pipelines.spam.stages]]
name = "chatty"
command = ["{{python}}", "{STAGES}", "spam", "5000"]
log_rate = 50

[pipelines.marker]
[[pipelines.marker.stages]]
name = "lingers"
command = ["{{python}}", "{STAGES}", "linger", "[SUCCESS] all done"]
success_marker = "[SUCCESS]"
marker_grace = 0.5

[pipelines.daemon]
[[pipelines.daemon.stages]]
name = "leaves-one"
command = ["{{python}}", "{STAGES}", "daemon"]

[pipelines.bad-placeholder]
[[pipelines.bad-placeholder.stages]]
name = "typo"
command = ["{{python}}", "{STAGES}", "ok", "{{nope}}"]

[pipelines.callable]
[[pipelines.callable.stages]]
name = "count"
callable = "runner_stages:counting"
env = {{ PYTHONPATH = "{TESTS_DIR}" }}
progress_interval = 0.2
[[pipelines.callable.stages]]
name = "explode"
callable = "runner_stages:failing"
env = {{ PYTHONPATH = "{TESTS_DIR}" }}

[pipelines.flood]
[[pipelines.flood.stages]]
name = "flood"
callable = "runner_stages:flooding"
env = {{ PYTHONPATH = "{TESTS_DIR}" }}
"""


@pytest.fixture
def rig(tmp_path: Path, services: list) -> RunnerRig:
    r = RunnerRig(tmp_path, BODY, services=services).start()
    yield r
    r.close()


def kinds(events: list, stage: str | None = None) -> list[tuple[str, str]]:
    return [(e.stage, e.event) for e in events if stage is None or e.stage == stage]


def pids_from_logs(events: list, label: str) -> list[int]:
    return [int(m.group(1)) for e in events if e.event == "log" for m in [re.fullmatch(rf"{label} (\d+)", e.msg)] if m]


def test_timeout_kills_stage_and_grandchild(rig: RunnerRig) -> None:
    run_id, events, _ = rig.run("hang")
    grandchildren = pids_from_logs(events, "grandchild")
    stage_pids = pids_from_logs(events, "stage")
    assert grandchildren and stage_pids
    for pid in grandchildren + stage_pids:
        assert wait_gone(pid), f"process {pid} outlived the stage's timeout"
    fail = [e for e in events if (e.stage, e.event) == ("hang", "failure")]
    assert len(fail) == 1 and "timed out after 4s" in fail[0].msg
    assert ("after", "skipped") in kinds(events)
    assert events[-1].event == "failure" and "stage hang failed" in events[-1].msg and "timed out" in events[-1].msg


def test_cancel_mid_stage(rig: RunnerRig) -> None:
    run_id = queue_run(rig.home, "cancel-me")
    rig.sched.dispatch(run_id, "cancel-me")
    rig.sched.wait_for(RunAccepted, run_id=run_id)
    # wait until the stage has started its grandchild (both pids are in the journal), then cancel
    end = time.monotonic() + 30
    while len(pids_from_logs(journal(rig.home, run_id), "(?:grandchild|stage)")) < 2:
        assert time.monotonic() < end, "the stage never printed its pids"
        time.sleep(0.05)
    rig.sched.cancel(run_id, reason="operator said stop")
    events = wait_journal_terminal(rig.home, run_id)
    pids = pids_from_logs(events, "grandchild") + pids_from_logs(events, "stage")
    assert len(pids) == 2
    for pid in pids:
        assert wait_gone(pid), f"process {pid} survived the cancel"
    assert ("hang", "cancelled") in kinds(events)
    assert ("after", "skipped") in kinds(events)
    assert events[-1].stage == "pipeline" and events[-1].event == "cancelled"
    assert "operator said stop" in events[-1].msg
    assert rig.sched.wait_for(RunFinished, run_id=run_id).outcome == "cancelled"


def test_on_failure_stop_skips_later_stages(rig: RunnerRig) -> None:
    _, events, _ = rig.run("stop")
    assert kinds(events)[2:] == [("bad", "start"), ("bad", "log"), ("bad", "failure"), ("good", "skipped"), ("pipeline", "failure")]
    assert "exited with status 4" in events[4].msg and "failing on purpose" in events[4].msg
    assert events[5].msg == "not run: stage bad failed"
    assert events[-1].msg.startswith("stage bad failed: ")


def test_on_failure_continue_runs_later_stages_but_fails_the_run(rig: RunnerRig) -> None:
    _, events, _ = rig.run("continue")
    assert ("bad", "failure") in kinds(events) and ("good", "success") in kinds(events)
    assert events[-1].event == "failure" and "stage bad failed" in events[-1].msg


def test_requires_unmatched_skips_the_stage(rig: RunnerRig) -> None:
    _, events, _ = rig.run("requires")
    skipped = [e for e in events if (e.stage, e.event) == ("needs-csv", "skipped")]
    assert len(skipped) == 1 and "data/raw/*.csv" in skipped[0].msg
    assert ("needs-csv", "start") not in kinds(events)
    assert ("good", "success") in kinds(events) and events[-1].event == "success"


def test_retry_after_a_failed_attempt(rig: RunnerRig) -> None:
    run_id, events, _ = rig.run("retry")
    retries = [e for e in events if e.event == "log" and (e.data or {}).get("attempt") == 2]
    assert len(retries) == 1 and "retrying in 0.1s" in retries[0].msg
    assert ("flaky", "success") in kinds(events) and events[-1].event == "success"
    assert (rig.home / "flaky.marker").exists()
    report = json.loads((rig.home / "reports" / f"{run_id}.json").read_text())
    assert report["stages"]["flaky"]["attempts"] == 2


def item_events(events: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        if e.stage == "per-item" and e.event != "log" and "item" in (e.data or {}):
            out.setdefault(e.data["item"], []).append(e.event)
    return out


def test_fan_out_all_fails_when_one_item_fails(rig: RunnerRig) -> None:
    run_id, events, _ = rig.run("fan-all")
    assert item_events(events) == {"ES": ["start", "success"], "NQ": ["start", "failure"], "CL": ["start", "success"]}
    stage_end = [e for e in events if e.stage == "per-item" and e.event in ("success", "failure") and "item" not in (e.data or {})]
    assert len(stage_end) == 1 and stage_end[0].event == "failure"
    assert stage_end[0].data["items_failed"] == ["NQ"] and "NQ" in stage_end[0].msg
    assert events[-1].event == "failure"
    report = json.loads((rig.home / "reports" / f"{run_id}.json").read_text())
    assert report["stages"]["per-item"]["items"]["NQ"]["status"] == "failure"
    assert report["stages"]["per-item"]["items"]["ES"]["duration_s"] >= 0


def test_fan_out_any_succeeds_with_one_item(rig: RunnerRig) -> None:
    _, events, _ = rig.run("fan-any", {"instruments": ["ES", "NQ", "CL"]})
    assert set(item_events(events)) == {"ES", "NQ", "CL"}
    stage_end = [e for e in events if e.stage == "per-item" and e.event in ("success", "failure") and "item" not in (e.data or {})]
    assert stage_end[0].event == "success"
    assert sorted(stage_end[0].data["items_failed"]) == ["CL", "NQ"] and "2 of 3 items failed" in stage_end[0].msg
    assert events[-1].event == "success"


def test_log_rate_cap_accounts_for_every_line(rig: RunnerRig) -> None:
    _, events, published = rig.run("spam")
    lines = [e for e in events if e.event == "log" and (e.data or {}).get("stream") == "stdout"]
    held = [e for e in events if e.event == "log" and "held_back" in (e.data or {})]
    assert held, "no held-back report"
    assert len(lines) < 5000
    assert len(lines) + sum(e.data["held_back"] for e in held) == 5000
    end = [e for e in events if (e.stage, e.event) == ("chatty", "success")][0]
    assert end.data["log_lines_held_back"] == 5000 - len(lines)
    assert [e["seq"] for e in published] == [e.seq for e in events[1:]]


def test_success_marker_ends_a_lingering_process(rig: RunnerRig) -> None:
    _, events, _ = rig.run("marker")
    (pid,) = pids_from_logs(events, "stage")
    assert wait_gone(pid)
    notes = [e for e in events if e.event == "log" and "success marker" in e.msg]
    assert notes and "ending its process group" in notes[0].msg
    assert ("lingers", "success") in kinds(events) and events[-1].event == "success"


def test_process_left_outside_the_group_is_swept_at_run_end(rig: RunnerRig) -> None:
    _, events, _ = rig.run("daemon")
    (pid,) = pids_from_logs(events, "daemon")
    assert wait_gone(pid, 10), "a process the stage left in its own session survived the run"
    sweep = [e for e in events if e.stage == "pipeline" and e.event == "log"]
    assert len(sweep) == 1 and sweep[0].data["pids"] == [pid]
    assert events[-1].event == "success"


def test_unknown_placeholder_fails_the_stage_clearly(rig: RunnerRig) -> None:
    _, events, _ = rig.run("bad-placeholder")
    fail = [e for e in events if (e.stage, e.event) == ("typo", "failure")][0]
    assert "unknown placeholder {nope}" in fail.msg
    assert events[-1].event == "failure"


def test_callable_stage_reports_logs_counters_and_metrics(rig: RunnerRig) -> None:
    run_id, events, _ = rig.run("callable")
    count = [e for e in events if e.stage == "count"]
    logs = [e for e in count if e.event == "log"]
    assert any(e.msg == "hello from a callable" and e.data["answer"] == 42 for e in logs)
    assert any(e.msg == f"plain print from count of {run_id}" and e.data["stream"] == "stdout" for e in logs)
    metrics = [e for e in count if e.event == "metric"]
    assert any(e.msg == "half way" and e.data == {"pct": 50} for e in metrics)
    progress = [e for e in metrics if "elapsed_s" in e.data]
    assert any(e.data.get("files_written") == 3 for e in progress), progress
    assert progress[-1].data["rows"] == 1234
    assert ("count", "success") in kinds(events)
    fail = [e for e in events if (e.stage, e.event) == ("explode", "failure")][0]
    assert "exited with status 1" in fail.msg and "ValueError: callable went wrong on purpose" in fail.msg
    assert any(e.stage == "explode" and e.msg == "about to fail" for e in events)
    assert events[-1].event == "failure"
    report = json.loads((rig.home / "reports" / f"{run_id}.json").read_text())
    assert report["stages"]["count"]["counters"] == {"files_written": 3, "rows": 1234}


def test_an_endless_stage_message_is_skipped_with_a_note_and_later_messages_still_count(rig: RunnerRig) -> None:
    _, events, _ = rig.run("flood")
    flood = [e for e in events if e.stage == "flood"]
    notes = [e.msg for e in flood if "ignored" in e.msg]
    assert any("stage message of over 8388608 bytes ignored (20971520 bytes)" in m for m in notes), notes
    assert any("bad stage message (9 bytes)" in m for m in notes), notes
    assert any(e.event == "metric" and e.msg == "still heard" for e in flood)
    assert ("flood", "success") in kinds(events) and events[-1].event == "success"
