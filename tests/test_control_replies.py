"""Typed control replies (shared/control.py, shared/replies.py), in process over real loopback sockets:
every request names its reply Struct, the server refuses to send a handler's answer of another type,
and the client decodes into the request's type, so a field renamed on one side fails loudly."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio

from scheduler_svc.runs import RunRecord
from shared import replies
from shared.control import (
    AnyRequest,
    Backfill,
    Cancel,
    ControlClient,
    GetRun,
    Identity,
    Launch,
    ListBackfills,
    ListRuns,
    ListSchedules,
    Pause,
    Probe,
    Reply,
    Request,
    Rerun,
    Resume,
    encode,
    serve_requests,
)
from shared.errors import BadReply, InternalError

REQUESTS: list[type[Request[Any]]] = list(AnyRequest.__args__)  # type: ignore[attr-defined]


def test_every_request_names_a_reply_struct_of_shared_replies() -> None:
    expected = {
        Identity: replies.IdentityInfo, Launch: replies.LaunchResult, Cancel: replies.CancelResult,
        ListRuns: replies.RunList, GetRun: replies.RunDetail, ListSchedules: replies.ScheduleList,
        Pause: replies.ScheduleInfo, Resume: replies.ScheduleInfo, Probe: replies.ProbeResult,
        Rerun: replies.RerunResult, Backfill: replies.BackfillResult, ListBackfills: replies.BackfillList,
    }
    assert set(REQUESTS) == set(expected)
    for req in REQUESTS:
        assert req.reply is expected[req], req
        assert req.reply.__module__ == "shared.replies"


def _summary_fields(rec: RunRecord, waiting: str | None) -> dict[str, Any]:
    return msgspec.to_builtins(rec.summary(waiting))


def test_a_run_summary_carries_every_field_of_its_type_and_waiting_only_while_queued() -> None:
    rec = RunRecord(run_id="20260101T000000000000Z-abc123", pipeline="p", params={"n": 1})
    fields = set(replies.RunSummary.__struct_fields__)
    queued = _summary_fields(rec, "waiting for a runner")
    assert set(queued) == fields  # all of them, none besides: the client's type reads every one
    assert queued["waiting"] == "waiting for a runner"
    rec.phase, rec.outcome, rec.msg = "ended", "failure", "stage nap failed"
    ended = _summary_fields(rec, "waiting: next in the queue")  # a stale reason is not passed on
    assert set(ended) == fields and ended["waiting"] is None and ended["msg"] == "stage nap failed"
    # what the scheduler sends, the client reads back whole
    wire = encode(rec.summary())
    assert msgspec.msgpack.decode(wire, type=replies.RunSummary) == rec.summary()


@pytest.mark.parametrize("renamed", ["waiting", "status", "last_seq"])
def test_a_field_renamed_on_the_sending_side_fails_to_decode_naming_it(renamed: str) -> None:
    rec = RunRecord(run_id="20260101T000000000000Z-abc123", pipeline="p", params={})
    sent = _summary_fields(rec, "waiting for a runner")
    sent["renamed_" + renamed] = sent.pop(renamed)
    with pytest.raises(msgspec.ValidationError, match=f"missing required field `{renamed}`"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(sent), type=replies.RunSummary)


# ---------------------------------------------------------------------------- over a socket


@asynccontextmanager
async def serving(handle: Callable[[Any], Awaitable[Any]]) -> AsyncIterator[ControlClient]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_requests, sock, handle, "test control")
            async with ControlClient(f"tcp://127.0.0.1:{port}", timeout=5.0, ctx=ctx) as client:
                yield client
            tg.cancel_scope.cancel()
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_the_client_gets_the_reply_struct() -> None:
    async def handle(req: Any) -> Any:
        assert isinstance(req, Probe)
        return replies.ProbeResult(run_id="probe-1", last_seq=2)

    async with serving(handle) as client:
        result = await client.call(Probe())
    assert result == replies.ProbeResult(run_id="probe-1", last_seq=2)


@pytest.mark.parametrize("answer", [
    {"run_id": "probe-1", "last_seq": 2},  # the right fields, but a map: the server must send its Struct
    replies.IdentityInfo(service="runner", version="0", pid=1, config_path="c", journal_dir="j"),
    None,
])
async def test_a_handler_answering_another_type_is_an_internal_error_and_logged(
        answer: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def handle(req: Any) -> Any:
        return answer

    async with serving(handle) as client:
        with caplog.at_level(logging.ERROR, logger="shared.control"), \
                pytest.raises(InternalError, match="not a ProbeResult"):
            await client.call(Probe())
        # and the socket keeps serving
        with pytest.raises(InternalError):
            await client.call(Probe())
    assert any("not ProbeResult" in r.getMessage() for r in caplog.records), caplog.records


async def test_an_answer_of_another_shape_is_a_bad_reply_naming_the_field() -> None:
    """A peer of another version (here a raw ROUTER) whose LaunchResult calls `status` `state`."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    async def old_server() -> None:
        routing, payload = await sock.recv_multipart()
        req = msgspec.msgpack.decode(payload)
        reply = Reply(id=req["id"], ok=True, result={"run_id": "r", "state": "queued"})
        await sock.send_multipart([routing, encode(reply)])

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(old_server)
            async with ControlClient(f"tcp://127.0.0.1:{port}", timeout=5.0, ctx=ctx) as client:
                with pytest.raises(BadReply, match="not a LaunchResult.*`status`"):
                    await client.call(Launch(pipeline="p"))
    finally:
        sock.close(linger=0)
        ctx.term()
