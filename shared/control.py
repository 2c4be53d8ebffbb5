"""The control protocol: requests to the scheduler (launch, cancel, runs, schedules) and to the runner
(identity, probe), as MessagePack over ZeroMQ ROUTER (server) / DEALER (client).

Each request type names its reply type (`Launch` is a `Request[LaunchResult]`; the replies are in
`shared.replies`): a handler that returns anything else is a bug, logged and answered as an internal
error, and the client decodes the result into that type, so a caller gets a typed value, never a map
to guess at.

Framing: a client sends one frame, the encoded request; the server's ROUTER sees [routing id, payload]
(or [routing id, b"", payload] from a REQ socket) and answers with the same envelope and one reply frame.
Every request carries an id (echoed in the reply) and a deadline: a server drops a request whose
deadline has passed, so a launch that timed out at the client never runs later behind its back. The
client sets the deadline a margin (`deadline_margin`) before it gives up itself, so an answer the
server commits to by its deadline still reaches the client in time; the scheduler checks a launch's
deadline again right after the run is durably queued, and ends it `cancelled` when it has passed.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, TypeVar, get_args

import anyio
import msgspec
import zmq
import zmq.asyncio

from .curve import CurveKeys, secure_client
from .errors import ERRORS_BY_CODE, BadReply, InternalError, ProtocolError, RunwireError, ServiceUnavailable
from .replies import (
    BackfillList,
    BackfillResult,
    CancelResult,
    IdentityInfo,
    LaunchResult,
    ProbeResult,
    RerunResult,
    RunDetail,
    RunList,
    ScheduleInfo,
    ScheduleList,
)
from .values import DECODE_ERRORS, Params
from .wire import configure_socket

log = logging.getLogger(__name__)


R = TypeVar("R", bound=msgspec.Struct, covariant=True)  # a request of a reply type is one of its base

class Request(msgspec.Struct, Generic[R], tag_field="op", kw_only=True):
    id: int = 0
    deadline: float = 0.0  # unix time after which the server must not act on it; 0 = none
    reply: ClassVar[type[msgspec.Struct]]  # the type its handler returns: `R` of `Request[R]`, set below

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            args = get_args(base)
            if args and isinstance(args[0], type):
                cls.reply = args[0]


class Identity(Request[IdentityInfo], tag="identity"):
    """Who are you: service, version, config file, journal directory, endpoints."""


class Launch(Request[LaunchResult], tag="launch"):
    pipeline: str
    params: Params = {}
    # the client's Idempotency-Key: a retry with the same key answers the first run, never a second
    idempotency_key: str | None = None


class Cancel(Request[CancelResult], tag="cancel"):
    run_id: str
    reason: str = "cancelled on request"


class ListRuns(Request[RunList], tag="list_runs"):
    status: str | None = None
    limit: int = 100


class GetRun(Request[RunDetail], tag="get_run"):
    run_id: str


class ListSchedules(Request[ScheduleList], tag="list_schedules"):
    pass


class Pause(Request[ScheduleInfo], tag="pause"):
    name: str


class Resume(Request[ScheduleInfo], tag="resume"):
    name: str


class Rerun(Request[RerunResult], tag="rerun"):
    """A new run of an ended run's pipeline and parameters; `from_failed`: from its first failed stage,
    when every earlier stage declares outputs and they are present (else Conflict naming the stage)."""

    run_id: str
    from_failed: bool = False


class Backfill(Request[BackfillResult], tag="backfill"):
    """Runs for a schedule's slots in [start, end] (ISO 8601; without an offset: the schedule's zone); the
    terms are checked by `shared.backfill`."""

    schedule: str
    start: str
    end: str
    policy: str = "missing"
    max_parallel: int = 1
    dry_run: bool = False


class ListBackfills(Request[BackfillList], tag="list_backfills"):
    limit: int = 50


class Probe(Request[ProbeResult], tag="probe"):
    """Runner: write a probe run (queued, then success) through journal and PUB; reply its run id."""

    run_id: str | None = None


AnyRequest = (Identity | Launch | Cancel | ListRuns | GetRun | ListSchedules | Pause | Resume | Rerun | Backfill
              | ListBackfills | Probe)


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class Reply(msgspec.Struct, omit_defaults=True):
    id: int
    ok: bool
    result: Any = None  # the request's reply Struct when ok
    error: ErrorBody | None = None


class _RawReply(msgspec.Struct):
    """A reply as the client first reads it: the result is decoded afterwards, into the request's type."""

    id: int
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"\xc0")  # MessagePack nil
    error: ErrorBody | None = None


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(AnyRequest)
_reply_decoder = msgspec.msgpack.Decoder(_RawReply)
_result_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {
    t: msgspec.msgpack.Decoder(t) for t in {r.reply for r in AnyRequest.__args__}  # type: ignore[attr-defined]
}


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


IDEMPOTENCY_KEY_MAX = 255
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,%d}" % IDEMPOTENCY_KEY_MAX)


def check_idempotency_key(key: object) -> str:
    """An Idempotency-Key is 1 to 255 visible ASCII characters (no spaces); ProtocolError otherwise."""
    if not isinstance(key, str) or _IDEMPOTENCY_KEY.fullmatch(key) is None:
        shown = repr(key)[:80]
        raise ProtocolError(f"Idempotency-Key {shown}: expected 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII "
                            "characters (letters, digits, punctuation; no spaces)")
    return key


def deadline_margin(timeout: float) -> float:
    """Seconds between the deadline a client sends and the moment it gives up: the time an answer
    committed at the deadline may take to reach it (a fifth of the timeout, at most a second)."""
    return min(1.0, timeout / 5)


def error_reply(req_id: int, exc: RunwireError) -> Reply:
    return Reply(id=req_id, ok=False, error=ErrorBody(code=exc.code, message=str(exc)))


Handler = Callable[[Any], Awaitable[Any]]


async def serve_requests(sock: zmq.asyncio.Socket, handle: Handler, where: str) -> None:
    """Answer requests on a bound ROUTER until cancelled. A bad frame or a failing handler gets an
    error reply (and a log line naming the socket); the loop keeps serving."""
    while True:
        frames = await sock.recv_multipart()
        if len(frames) < 2:
            log.warning("%s: dropped a message of %d frame(s): no routing envelope", where, len(frames))
            continue
        envelope, payload = frames[:-1], frames[-1]
        reply = await _answer(payload, handle, where)
        await sock.send_multipart([*envelope, encode(reply)])


async def _answer(payload: bytes, handle: Handler, where: str) -> Reply:
    try:
        req = _request_decoder.decode(payload)
    except DECODE_ERRORS as e:
        log.warning("%s: refused a bad request (%d bytes): %s", where, len(payload), e)
        return error_reply(0, ProtocolError(f"bad request: {e}"))
    if req.deadline and time.time() > req.deadline:
        log.warning("%s: dropped %s request %d: it arrived after its deadline", where, type(req).__name__, req.id)
        return error_reply(req.id, ServiceUnavailable("request arrived after its deadline; not acted on"))
    try:
        result = await handle(req)
    except RunwireError as e:
        return error_reply(req.id, e)
    except Exception as e:  # a bug in a handler must not take the socket down; it is logged in full
        log.exception("%s: %s request %d failed", where, type(req).__name__, req.id)
        return error_reply(req.id, InternalError(f"{type(e).__name__}: {e}"))
    if type(result) is not req.reply:  # a handler's bug: never send a shape the client cannot read
        log.error("%s: the handler answered %s request %d with %s, not %s", where, type(req).__name__, req.id,
                  type(result).__name__, req.reply.__name__)
        return error_reply(req.id, InternalError(
            f"the {type(req).__name__.lower()} handler answered a {type(result).__name__}, not a {req.reply.__name__}"))
    return Reply(id=req.id, ok=True, result=result)


class ControlClient:
    """An async DEALER client with a timeout per call. After a timeout the socket is thrown away
    (nothing queued in it is sent later), and the request's deadline, `deadline_margin` before the
    client gives up, stops a late server acting. Waiting to connect spends the same budget: the
    deadline is fixed when the call starts, so a slow connect shortens the server's time, never the
    margin. With the cluster's CURVE keys (`[cluster.curve]`), it is a CURVE client: the control
    sockets of a cluster's schedulers and runners accept nothing else."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, timeout: float = 5.0, ctx: zmq.asyncio.Context | None = None,
                 keys: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._keys = keys
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = anyio.Lock()  # one request in flight per client: replies are not interleaved

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            configure_socket(sock, sndhwm=100, rcvhwm=100)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a peer that is not there
            secure_client(sock, self._keys)  # before the connect: CURVE applies to connections made after
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def call(self, req: Request[R], timeout: float | None = None) -> R:
        """Send a request, return its reply (the request's reply type); raise the service's error,
        ServiceUnavailable, or BadReply for an answer that is not of that type."""
        async with self._lock:
            return await self._call(req, timeout)

    async def _call(self, req: Request[R], timeout: float | None) -> R:
        timeout = self.timeout if timeout is None else timeout
        req.id = next(self._ids)
        end = time.monotonic() + timeout
        req.deadline = time.time() + timeout - deadline_margin(timeout)
        sock = self._socket()
        what = f"{type(req).__name__.lower()} to {self.endpoint}"
        try:
            if not await sock.poll(timeout * 1000, zmq.POLLOUT):  # type: ignore[call-arg]  # pyzmq's stub lacks `flags`
                raise ServiceUnavailable(f"{what}: nothing listening (not connected within {timeout:g}s)")
            await sock.send(encode(req), zmq.NOBLOCK)
            while True:
                left = end - time.monotonic()
                if left <= 0 or not await sock.poll(left * 1000, zmq.POLLIN):  # type: ignore[call-arg]
                    raise ServiceUnavailable(f"{what}: no answer within {timeout:g}s")
                reply = _reply_decoder.decode(await sock.recv())
                if reply.id == req.id:
                    break
                log.debug("%s: discarded a late reply to request %d", what, reply.id)
        except ServiceUnavailable:
            self.close()
            raise
        except zmq.ZMQError as e:
            self.close()
            raise ServiceUnavailable(f"{what}: {e}") from e
        except (msgspec.DecodeError, RecursionError) as e:  # a reply's result is free-form: bound it here
            self.close()
            raise BadReply(f"{what}: bad reply: {e}") from e
        if reply.ok:
            try:
                return _result_decoders[req.reply].decode(reply.result)  # type: ignore[no-any-return]
            except (msgspec.DecodeError, RecursionError) as e:
                raise BadReply(f"{what}: the answer is not a {req.reply.__name__}: {e}") from e
        if reply.error is None:
            raise BadReply(f"{what}: a failed reply without an error")
        cls = ERRORS_BY_CODE.get(reply.error.code, RunwireError)
        raise cls(reply.error.message)
