"""A stage's burst through the runner's batch path: every message one event, in the stage's order,
the same on the PUB socket as in the journal; a bad line inside a burst becomes a note in its place;
an output burst becomes log events in order. Real runner process, a plain SUB (tests/runner_peer.py)."""

from __future__ import annotations

from pathlib import Path

from tests.harness import Service
from tests.runner_peer import RunnerRig

TESTS_DIR = Path(__file__).parent
COUNT, LINES = 20_000, 2_000

BODY = f"""
[pipelines.burst]
[pipelines.burst.params.count]
type = "int"
default = {COUNT}
[pipelines.burst.params.lines]
type = "int"
default = {LINES}
[[pipelines.burst.stages]]
name = "burst"
callable = "runner_stages:bursting"
env = {{ PYTHONPATH = "{TESTS_DIR}" }}
log_rate = 1000000
progress_interval = 3600
"""


def test_a_burst_of_messages_is_every_event_once_in_order_on_pub_and_in_the_journal(tmp_path: Path, services: list[Service]) -> None:
    rig = RunnerRig(tmp_path, BODY, services=services).start()
    try:
        run_id, events, published = rig.run("burst", timeout=120)
    finally:
        rig.close()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # the SUB saw exactly the journal (after `queued`, which the test wrote itself), in order
    assert [(p["seq"], p["stage"], p["event"], p.get("msg"), p.get("data")) for p in published] == [
        (e.seq, e.stage, e.event, e.msg or None, e.data) for e in events[1:]]
    assert rig.sub.topics[-len(published):] == [f"ev/{run_id}/{p['stage']}/{p['event']}".encode() for p in published]

    ticks = [e for e in events if e.event == "metric" and e.msg == "tick"]
    assert [e.data for e in ticks] == [{"i": i} for i in range(COUNT + 1000)]
    # the bad line in the middle of one write: its note sits between message 499 and 500 of that write
    note = next(e for e in events if e.event == "log" and "bad stage message" in e.msg)
    before = next(e for e in ticks if e.data["i"] == COUNT + 499)
    after = next(e for e in ticks if e.data["i"] == COUNT + 500)
    assert before.seq < note.seq < after.seq
    lines = [e.msg for e in events if e.event == "log" and (e.data or {}).get("stream") == "stdout"]
    assert lines == [f"line {i}" for i in range(LINES)]
    # a burst goes through the batch path: the events of one batch share its timestamp
    assert len({e.timestamp for e in ticks}) < len(ticks)
    assert events[-1].event == "success"
