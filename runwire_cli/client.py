"""The gateway's HTTP and WebSocket API from a program's side: what the CLI (and doctor) speak.

Errors come back as the RunwireError the gateway named (`{"error": {"code", "message"}}`), and a gateway
that does not answer is a ServiceUnavailable naming its URL. `get(..., into=T)` / `post(..., into=T)`
decode the answer into T (a Struct of `shared.httpapi` or `shared.replies`): an answer of another shape
is a BadReply naming what did not fit, never a map to guess at.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, TypeVar, overload

import aiohttp
import msgspec

from shared.config import Settings
from shared.errors import ERRORS_BY_CODE, BadReply, ProtocolError, RunwireError, ServiceUnavailable
from shared.protocol import FRAME_TYPES, RETRYABLE_CLOSES, CloseCode, ErrorFrame, Frame, decode_frame

GATEWAY_URL_ENV = "RUNWIRE_GATEWAY_URL"

_body_decoder = msgspec.json.Decoder()
T = TypeVar("T")


def gateway_url(settings: Settings | None, explicit: str | None = None) -> str:
    """--gateway, else RUNWIRE_GATEWAY_URL, else the config's gateway host and port."""
    if explicit:
        return explicit.rstrip("/")
    env = os.environ.get(GATEWAY_URL_ENV)
    if env:
        return env.rstrip("/")
    if settings is None:
        return "http://127.0.0.1:8080"
    g = settings.config.gateway
    host = "127.0.0.1" if g.host in ("0.0.0.0", "") else g.host
    return f"http://{host}:{g.port}"


class GatewayClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use `async with GatewayClient(...)`"
        return self._session

    async def request(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None,
                      into: type[Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        url = self.base_url + path
        try:
            async with self.session.request(method, url, json=json, params=params, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise ServiceUnavailable(f"gateway not reachable at {self.base_url} ({e or type(e).__name__}); "
                                     "is it running? try `runwire doctor`") from e
        try:
            data = _body_decoder.decode(body) if body else None
        except (msgspec.DecodeError, RecursionError):  # not JSON (a proxy's page) or a depth bomb: no body
            data = None
        if status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                cls = ERRORS_BY_CODE.get(str(err.get("code")), RunwireError)
                raise cls(f"{err.get('message')} (HTTP {status} from {method} {path})")
            raise RunwireError(f"HTTP {status} from {method} {path}: {body[:200]!r}")
        if into is None:
            return data
        try:
            return msgspec.convert(data, into)
        except msgspec.ValidationError as e:
            raise BadReply(f"{method} {path}: the gateway's answer is not a {into.__name__}: {e}") from e

    @overload
    async def get(self, path: str, *, into: type[T], **params: Any) -> T: ...
    @overload
    async def get(self, path: str, *, into: None = None, **params: Any) -> Any: ...
    async def get(self, path: str, *, into: type[Any] | None = None, **params: Any) -> Any:
        return await self.request("GET", path, params={k: v for k, v in params.items() if v is not None}, into=into)

    @overload
    async def post(self, path: str, json: Any = None, *, into: type[T], headers: dict[str, str] | None = None) -> T: ...
    @overload
    async def post(self, path: str, json: Any = None, *, into: None = None, headers: dict[str, str] | None = None) -> Any: ...
    async def post(self, path: str, json: Any = None, *, into: type[Any] | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        return await self.request("POST", path, json=json if json is not None else {}, into=into, headers=headers)

    def ws_url(self, path: str, **params: Any) -> str:
        base = "ws" + self.base_url[len("http"):] if self.base_url.startswith("http") else self.base_url
        query = {k: str(v) for k, v in params.items() if v is not None}
        if self.token:
            query["token"] = self.token
        qs = "&".join(f"{k}={aiohttp.helpers.quote(v, safe='')}" for k, v in query.items())
        return f"{base}{path}" + (f"?{qs}" if qs else "")

    async def frames(self, path: str, **params: Any) -> AsyncIterator[Frame]:
        """The frames of one WebSocket connection (shared.protocol's Structs), until the server closes
        it with 1000; a frame of a type this client does not know is skipped. What a reconnect can mend (the gateway
        away or restarting, 1001, 4008 slow consumer, a dropped connection) raises ServiceUnavailable, so
        the caller resumes with its cursor; what it cannot (a refused handshake: bad run id, no or wrong
        token; an error frame followed by a 4xxx close) raises RunwireError with the server's words.
        """
        url = self.ws_url(path, **params)
        try:
            ws = await self.session.ws_connect(url, heartbeat=20)
        except aiohttp.WSServerHandshakeError as e:
            if 400 <= e.status < 500:
                hint = " (set RUNWIRE_TOKEN)" if e.status == 401 else ""
                raise RunwireError(f"{path} refused by {self.base_url}: HTTP {e.status}{hint}") from e
            raise ServiceUnavailable(f"cannot open {path} on {self.base_url}: HTTP {e.status}") from e
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise ServiceUnavailable(f"cannot open {path} on {self.base_url}: {e or type(e).__name__}") from e
        fatal: ErrorFrame | None = None
        async with ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        frame = decode_frame(msg.data)
                    except msgspec.ValidationError as e:
                        if _is_unknown_type(msg.data):
                            continue  # a frame type from a newer gateway
                        raise ProtocolError(f"WebSocket {path}: the gateway sent a malformed frame: {e}") from e
                    except (msgspec.DecodeError, RecursionError) as e:
                        raise ProtocolError(f"WebSocket {path}: the gateway sent a frame that is not JSON: {e}") from e
                    if isinstance(frame, ErrorFrame) and frame.fatal:
                        fatal = frame
                    yield frame
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    raise ServiceUnavailable(f"WebSocket {path} failed: {ws.exception()}")
            code = ws.close_code
        if code in (None, CloseCode.NORMAL):
            return
        if code in RETRYABLE_CLOSES or fatal is None:
            raise ServiceUnavailable(f"WebSocket {path} closed with {code}")
        raise RunwireError(f"{fatal.code}: {fatal.message} (WebSocket {path} closed with {code})")


class _TypeOnly(msgspec.Struct):
    type: str = ""


_type_decoder = msgspec.json.Decoder(_TypeOnly)


def _is_unknown_type(data: str | bytes) -> bool:
    """Whether a frame that does not validate is a JSON object of a type we do not know (to skip),
    rather than a known frame that is malformed (a protocol error)."""
    try:
        kind = _type_decoder.decode(data).type
    except (msgspec.DecodeError, RecursionError):
        return False
    return kind not in FRAME_TYPES
