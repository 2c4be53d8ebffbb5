"""HTTP errors: every failure leaves the gateway as JSON `{"error": {"code", "message"}}` with a fitting
status, whether it was raised here, by `shared` (a RunwireError) or by aiohttp itself."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from shared.errors import (
    BadParams,
    BadReply,
    Conflict,
    InvalidRunId,
    NotFound,
    ProtocolError,
    RunEnded,
    RunwireError,
    ServiceUnavailable,
    UnknownPipeline,
)

log = logging.getLogger(__name__)


class HttpError(Exception):
    """An error answer decided by a handler: status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_STATUS: list[tuple[type[RunwireError], int]] = [
    (BadReply, 502),  # before ProtocolError, its base: the scheduler's answer, not the client's request
    (InvalidRunId, 400),
    (UnknownPipeline, 400),
    (BadParams, 400),
    (ProtocolError, 400),
    (NotFound, 404),
    (RunEnded, 409),
    (Conflict, 409),
    (ServiceUnavailable, 503),
]

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "body_too_large", 414: "uri_too_long", 417: "expectation_failed", 431: "headers_too_large",
               500: "internal"}


def status_of(exc: RunwireError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    # anything else a service answered (internal error, journal error): it did not take the request
    return 503


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpError as e:
        return error_response(e.status, e.code, e.message)
    except RunwireError as e:
        return error_response(status_of(e), e.code, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, f"http_{e.status}")
        return error_response(e.status, code, e.reason if e.text is None else f"{e.reason}: {request.path}")


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, whose own error answers (a malformed request line, a raw path that
    is not ASCII, an over-long URL or header: aiohttp refuses them before any route or middleware sees
    the request) are the API's JSON error too, not text/plain."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises if a response was under way
        if status >= 500:
            text = "the gateway failed while handling the request; its log has the traceback"
        else:
            text = " ".join((message or HTTPStatus(status).phrase).split())[:500]
        resp = error_response(status, _HTTP_CODES.get(status, f"http_{status}"), text)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """web.AppRunner whose server answers aiohttp's own protocol errors as JSON (see above)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _JsonErrorServer(plain.request_handler, request_factory=plain.request_factory,
                                loop=plain._loop, **plain._kwargs)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """The routes' `Expect:` answer: 100 Continue as aiohttp's default does, anything else a JSON 417
    (aiohttp's default raises a text/plain one before any middleware runs)."""
    expect = request.headers.get("Expect", "")
    if request.version != (1, 1):
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started
        return None
    return error_response(417, "expectation_failed", f"unknown Expect: {expect[:100]!r} (only 100-continue)")
