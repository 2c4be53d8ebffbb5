"""Fuzzing the scheduler's dispatch socket (runners connect a DEALER, shared/dispatch.py) against the
real trio: garbage, wrong frame counts, and forged or replayed RunFinished / RunAccepted / RunnerStatus
messages for a run of another runner or of another attempt (fencing). The scheduler ignores them: the
real run ends normally with exactly one terminal event, and the scheduler keeps serving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import example, given, strategies as st

from shared.dispatch import RunAccepted, RunFinished, RunnerStatus, RunRejected, encode
from tests.fuzzing import (
    Trio,
    assert_serving,
    control_send,
    fuzz,
    http_request,
    launch_and_finish,
    pack,
    trio,  # noqa: F401  (the module's fixture)
    wait_run_ended,
)

REAL_RUNNER = "test-runner"  # tests/harness.py's runner.id


@pytest.fixture(autouse=True)
def still_serving(trio: Trio) -> Iterator[None]:  # noqa: F811
    yield
    assert_serving(trio)


class Forger:
    """A DEALER on the dispatch socket that is not the real runner (its own routing id)."""

    def __init__(self, endpoint: str, routing_id: bytes = b"forger") -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Forger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scheduler_run(trio: Trio, run_id: str) -> dict[str, Any]:  # noqa: F811
    reply = control_send(trio.scheduler_control, [pack({"op": "get_run", "id": 5, "run_id": run_id})])
    assert reply is not None and reply.get("ok") is True, reply
    return reply["result"]  # type: ignore[no-any-return]


def _launch(trio: Trio, seconds: float) -> str:  # noqa: F811
    status, _, body = http_request(trio.ports.http, "POST", "/api/runs", headers={"Content-Type": "application/json"},
                                   body=json.dumps({"pipeline": "sleepy", "params": {"seconds": seconds}}).encode())
    assert status == 202, body
    return json.loads(body)["run_id"]  # type: ignore[no-any-return]


def _wait_running(trio: Trio, run_id: str, timeout: float = 20.0) -> int:  # noqa: F811
    """The attempt the real runner is running."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _scheduler_run(trio, run_id)
        if info.get("status") == "running" and info.get("runner") == REAL_RUNNER:
            return int(info["attempt"])
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} not running on {REAL_RUNNER} within {timeout}s: {_scheduler_run(trio, run_id)}")


def _status(runner_id: str, runs: dict[str, int]) -> RunnerStatus:
    # capacity 0: a forger the scheduler believes must still never be given a run
    return RunnerStatus(runner_id=runner_id, capacity=0, pid=1, version="0", config_path="/forged",
                        journal_dir="/forged", publish="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1", runs=runs)


@st.composite
def forgeries(draw: st.DrawFn) -> list[tuple[str, str, int, str]]:
    """(kind, runner_id, attempt offset, outcome): for another runner, or the real one's other attempts
    (never the real runner's current attempt: that one is the impersonation test below)."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["finished", "accepted", "rejected", "status"]))
        runner = draw(st.sampled_from(["forger", REAL_RUNNER, "", "x" * 300]))
        offset = draw(st.sampled_from([0, -1, 1, 100, -100]) if runner != REAL_RUNNER else st.sampled_from([-1, 1, 100]))
        outcome = draw(st.sampled_from(["success", "failure", "cancelled"]))
        out.append((kind, runner, offset, outcome))
    return out


def _forged(kind: str, runner: str, run_id: str, attempt: int, outcome: str) -> msgspec.Struct:
    match kind:
        case "finished":
            return RunFinished(runner_id=runner, run_id=run_id, attempt=attempt, outcome=outcome)  # type: ignore[arg-type]
        case "accepted":
            return RunAccepted(runner_id=runner, run_id=run_id, attempt=attempt)
        case "rejected":
            return RunRejected(runner_id=runner, run_id=run_id, attempt=attempt, reason="forged")
    return _status(runner if runner != REAL_RUNNER else "forger", {run_id: attempt})


@fuzz(4)
@given(forged=forgeries())
@example(forged=[("finished", "forger", 0, "failure"), ("accepted", "forger", 0, "success"),
                 ("finished", REAL_RUNNER, -1, "failure"), ("finished", REAL_RUNNER, 1, "cancelled"),
                 ("rejected", REAL_RUNNER, -1, "success"), ("status", "forger", 0, "success")])
def test_forged_run_messages_are_ignored_and_the_run_ends_normally(trio: Trio, forged: list[tuple[str, str, int, str]]) -> None:  # noqa: F811
    run_id = _launch(trio, seconds=1.5)
    attempt = _wait_running(trio, run_id)
    with Forger(trio.dispatch) as forger:
        for kind, runner, offset, outcome in forged:
            forger.send(encode(_forged(kind, runner, run_id, attempt + offset, outcome)))
        time.sleep(0.3)
        info = _scheduler_run(trio, run_id)
        assert info["status"] == "running" and info["runner"] == REAL_RUNNER and info["attempt"] == attempt, info
    wait_run_ended(trio, run_id, expect="success")
    assert _scheduler_run(trio, run_id)["status"] == "success"


def test_replayed_messages_of_an_ended_run_are_ignored(trio: Trio) -> None:  # noqa: F811
    run_id = launch_and_finish(trio)
    info = _scheduler_run(trio, run_id)
    attempt = int(info["attempt"])
    with Forger(trio.dispatch) as forger:
        for runner in ("forger", REAL_RUNNER):
            forger.send(encode(RunAccepted(runner_id=runner, run_id=run_id, attempt=attempt)))
            forger.send(encode(RunFinished(runner_id=runner, run_id=run_id, attempt=attempt, outcome="failure")))
            forger.send(encode(RunRejected(runner_id=runner, run_id=run_id, attempt=attempt, reason="replayed")))
        forger.send(encode(_status("forger", {run_id: attempt})))
        time.sleep(0.5)
    assert _scheduler_run(trio, run_id)["status"] == "success"
    events = wait_run_ended(trio, run_id, expect="success")
    time.sleep(0.5)
    assert len(wait_run_ended(trio, run_id, expect="success")) == len(events)  # nothing appended after the end
    launch_and_finish(trio)


def test_a_finished_message_from_another_connection_naming_the_real_runner_is_ignored(trio: Trio) -> None:  # noqa: F811
    """Impersonation: a peer that is not the runner's connection claims its id and current attempt.
    The run must still end as the real runner ends it, with one terminal event."""
    run_id = _launch(trio, seconds=2.0)
    attempt = _wait_running(trio, run_id)
    with Forger(trio.dispatch, routing_id=b"impostor") as forger:
        forger.send(encode(RunFinished(runner_id=REAL_RUNNER, run_id=run_id, attempt=attempt, outcome="failure")))
        time.sleep(0.3)
    wait_run_ended(trio, run_id, timeout=15.0, expect="success")
    assert _scheduler_run(trio, run_id)["status"] == "success"


garbage = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["type", "runner_id", "run_id", "attempt", "outcome", "capacity", "runs"]),
                    st.one_of(st.sampled_from(["finished", "accepted", "status", "rejected", REAL_RUNNER]),
                              st.integers(-2**63, 2**63), st.text(max_size=10), st.none(),
                              # MessagePack holds integers of 64 bits: a bigger one cannot be sent at all
                              st.lists(st.integers(-2**63, 2**64 - 1), max_size=3)),
                    max_size=5).map(pack),
    st.just(b"\x91" * 100_000 + b"\x01"),
    st.just(b"\x87\xa4type\xa6status" + b"\x81\xa1a" * 5000 + b"\x01"),
)


@fuzz(60)
@given(frames=st.lists(garbage, min_size=1, max_size=4))
@example(frames=[b""])
@example(frames=[b"", b""])
@example(frames=[pack({"type": "finished", "runner_id": REAL_RUNNER, "run_id": "../../x", "attempt": 1, "outcome": "success"})])
def test_garbage_on_the_dispatch_socket_is_dropped(trio: Trio, frames: list[bytes]) -> None:  # noqa: F811
    with Forger(trio.dispatch, routing_id=b"garbage") as forger:
        forger.send(*frames)
        forger.sock.poll(20)


def test_a_normal_run_still_works_after_the_garbage(trio: Trio) -> None:  # noqa: F811
    time.sleep(0.3)
    launch_and_finish(trio)
    assert "dropped" in trio.services["scheduler_svc"].output()  # the garbage was logged, not silent
