"""Fuzzing the control sockets (ROUTER, MessagePack requests tagged by `op`, shared/control.py) of the
real scheduler and the real runner: random bytes, wrong frame counts, valid-looking requests with wrong
types, depth bombs and huge frames. Each gets an error reply; afterwards both services answer Identity
(issue 11, defect 1: a params depth bomb used to stop both services)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, strategies as st

from tests.fuzzing import (
    Trio,
    assert_serving,
    control_identity,
    control_send,
    fuzz,
    hostile_text,
    json_values,
    msgpack_bomb,
    pack,
    trio,  # noqa: F401  (the module's fixture)
)

OPS = ["identity", "launch", "cancel", "list_runs", "get_run", "list_schedules", "pause", "resume", "probe"]
FIELDS = ["id", "deadline", "pipeline", "params", "run_id", "reason", "status", "limit", "name"]


@pytest.fixture(autouse=True)
def still_serving(trio: Trio) -> Iterator[None]:  # noqa: F811
    yield
    assert_serving(trio)


def _endpoint(trio: Trio, which: str) -> str:  # noqa: F811
    return trio.scheduler_control if which == "scheduler" else trio.runner_control


def _assert_error_reply(reply: Any, what: Any) -> None:
    assert reply is not None, f"no reply to {what!r:.300}"
    assert isinstance(reply, dict) and reply.get("ok") is False, (what, reply)
    err = reply.get("error")
    assert isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str), (what, reply)


# a value of any MessagePack type, including ones JSON lacks (bytes, big ints)
msgpack_values = st.one_of(json_values, st.binary(max_size=20), st.integers(-2**63, 2**64 - 1), st.floats())


@st.composite
def requests(draw: st.DrawFn) -> dict[Any, Any]:
    """Requests that look valid: a known op, fields with the wrong types (or an unknown op)."""
    req: dict[Any, Any] = {"op": draw(st.one_of(st.sampled_from(OPS), hostile_text, msgpack_values))}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        req[name] = draw(msgpack_values)
    return req


def _accept_ok(req: dict[Any, Any], which: str) -> bool:
    """An ok reply is right only for a request that is valid as it stands: a read-only op whose fields
    (if any) have their documented types, or a probe on the runner."""
    op = req.get("op")
    fields = {k: v for k, v in req.items() if k != "op"}
    if not isinstance(fields.get("id", 0), int) or isinstance(fields.get("id", 0), bool):
        return False
    deadline = fields.get("deadline", 0.0)
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or (deadline and deadline < 1e9):
        return False  # a deadline in the past is refused too
    if which == "runner":
        # Probe's own field is run_id; other fields are unknown to it and tolerated, as on every request
        return op == "identity" or (op == "probe" and fields.get("run_id") is None)
    if op in ("identity", "list_schedules"):
        return True  # unknown fields are tolerated on the wire (schema evolution)
    if op == "list_runs":
        return (fields.get("status") in (None, "queued", "running", "success", "failure", "cancelled")
                and isinstance(fields.get("limit", 1), int) and not isinstance(fields.get("limit", 1), bool))
    return False


@fuzz(400)
@given(which=st.sampled_from(["scheduler", "runner"]), req=requests())
@example(which="scheduler", req={"op": "launch", "pipeline": "sleepy", "params": {"seconds": [[[[[[1]]]]]]}})
@example(which="scheduler", req={"op": "launch", "pipeline": "echo", "params": {"word": "a\x00b"}})
@example(which="scheduler", req={"op": "cancel", "run_id": "../../etc/passwd"})
@example(which="scheduler", req={"op": "get_run", "run_id": "x" * 10_000})
@example(which="scheduler", req={"op": "list_runs", "limit": -1, "status": "bogus"})
@example(which="runner", req={"op": "probe", "run_id": "../x"})
@example(which="runner", req={"op": "probe", "pipeline": None})  # found in CI: an unknown field on a probe is fine
@example(which="scheduler", req={"op": "identity", "id": "7"})
@example(which="scheduler", req={"op": "identity", "deadline": "soon"})
def test_requests_with_wrong_types_get_error_replies(trio: Trio, which: str, req: dict[Any, Any]) -> None:  # noqa: F811
    try:
        payload = pack(req)
    except (TypeError, OverflowError, RecursionError):
        return  # not representable in MessagePack (hypothesis' floats are; dict keys of odd types may not be)
    reply = control_send(_endpoint(trio, which), [payload])
    assert reply is not None, f"no reply from the {which} to {req!r:.300}"
    if reply.get("ok") is True:
        assert _accept_ok(req, which), (which, req, reply)
        return
    _assert_error_reply(reply, req)


@fuzz(200)
@given(which=st.sampled_from(["scheduler", "runner"]), payload=st.binary(max_size=300))
@example(which="scheduler", payload=b"")
@example(which="runner", payload=b"")
@example(which="scheduler", payload=b"\xc1")  # never-used MessagePack byte
@example(which="scheduler", payload=b"\x81\xa2op\xa6launch")  # {"op": "launch"} without a pipeline
@example(which="scheduler", payload=b"\xdf\xff\xff\xff\xff")  # a map claiming 4 billion entries
@example(which="runner", payload=b"\xdd\xff\xff\xff\xff")  # an array claiming 4 billion items
def test_random_bytes_get_an_error_reply(trio: Trio, which: str, payload: bytes) -> None:  # noqa: F811
    reply = control_send(_endpoint(trio, which), [payload])
    _assert_error_reply(reply, payload)


@pytest.mark.parametrize("which", ["scheduler", "runner"])
@pytest.mark.parametrize("depth", [3000, 100_000])
def test_msgpack_depth_bombs_get_an_error_reply(trio: Trio, which: str, depth: int) -> None:  # noqa: F811
    """Nested arrays as the whole request, and as the params of a launch (issue 11, defect 1)."""
    launch_head = b"\x84\xa2op\xa6launch\xa2id\x03\xa8pipeline\xa6sleepy\xa6params"  # a 4-entry map, then params
    for payload in (msgpack_bomb(depth),
                    launch_head + b"\x81\xa7seconds" + msgpack_bomb(depth),    # {"seconds": [[[...]]]}
                    launch_head + b"\x81\xa1a" * depth + b"\x01"):              # {"a": {"a": ...}}
        reply = control_send(_endpoint(trio, which), [payload])
        _assert_error_reply(reply, payload[:40])


@pytest.mark.parametrize("which", ["scheduler", "runner"])
def test_huge_frames_get_an_error_reply(trio: Trio, which: str) -> None:  # noqa: F811
    for payload in (os.urandom(8 * 1024 * 1024), b"\x82\xa2op\xa8identity\xa3pad\xdb" + (16 * 1024 * 1024).to_bytes(4, "big") + b"x" * (16 * 1024 * 1024)):
        reply = control_send(_endpoint(trio, which), [payload], timeout=30)
        if payload[0] == 0x82:  # an identity request with a 16 MiB unknown field: tolerated, answered
            assert reply is not None and reply.get("ok") is True, reply
        else:
            _assert_error_reply(reply, payload[:40])


@fuzz(80)
@given(which=st.sampled_from(["scheduler", "runner"]),
       frames=st.lists(st.one_of(st.binary(max_size=50), st.just(pack({"op": "identity", "id": 9}))), min_size=2, max_size=6))
@example(which="scheduler", frames=[b"", pack({"op": "identity", "id": 9})])
@example(which="runner", frames=[pack({"op": "identity", "id": 9}), b""])
@example(which="scheduler", frames=[b"", b"", b"", b""])
def test_wrong_frame_counts_get_a_reply_and_the_socket_keeps_serving(trio: Trio, which: str, frames: list[bytes]) -> None:  # noqa: F811
    """A DEALER sending several frames: the ROUTER takes all but the last as the envelope and answers
    the last; an identity request there is answered ok, anything else with an error."""
    reply = control_send(_endpoint(trio, which), frames)
    assert reply is not None, f"no reply from the {which} to {len(frames)} frames"
    if frames[-1] == pack({"op": "identity", "id": 9}):
        assert reply.get("ok") is True and reply.get("id") == 9, reply
    else:
        _assert_error_reply(reply, frames)
    control_identity(_endpoint(trio, which))
