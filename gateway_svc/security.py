"""The gateway's security defaults (CONTRACT "Security defaults"): loopback unless a token is set, and
with a token every `/api/*`, `/ws/*` and `/metrics` request carries it (`Authorization: Bearer <token>`,
or `?token=` for browsers' WebSocket and EventSource), compared in constant time. `/`, `/static/` and
`/healthz` stay open. `?token=` anywhere else is refused (401) even when right: tokens in URLs end up in
access logs, proxies and browser history, so only the routes whose browser clients cannot set a header
take it."""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web
from aiohttp.typedefs import Middleware

from shared.errors import ConfigError

from .errors import Handler, error_response

PROTECTED_PREFIXES = ("/api/", "/ws/", "/metrics")
QUERY_TOKEN_PREFIXES = ("/ws/",)  # browsers' WebSocket cannot set headers
QUERY_TOKEN_PATHS = ("/api/events",)  # nor can EventSource (SSE)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, config_path: object) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"{config_path}: key `gateway.host` is {host!r}, not a loopback address, and no API token is set: "
            "set RUNWIRE_TOKEN (clients then send 'Authorization: Bearer <token>') or bind 127.0.0.1"
        )


def auth_middleware(token: str | None) -> Middleware:
    expected = token.encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or not request.path.startswith(PROTECTED_PREFIXES):
            return await handler(request)
        given = ""
        auth = request.headers.get("Authorization", "")
        query_ok = request.path.startswith(QUERY_TOKEN_PREFIXES) or request.path in QUERY_TOKEN_PATHS
        if "token" in request.query and not query_ok:
            return error_response(
                401, "unauthorized",
                f"?token= is accepted only on WebSocket (/ws/*) and SSE (/api/events) routes, not on {request.path}: "
                "send the token as 'Authorization: Bearer <token>' (tokens in URLs end up in logs)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif "token" in request.query:
            given = request.query["token"]
        if not given:
            return error_response(401, "unauthorized", "this gateway needs a token: 'Authorization: Bearer <token>' "
                                  "(or ?token= on WebSocket and SSE)", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), expected):
            return error_response(401, "unauthorized", "wrong token", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware  # type: ignore[return-value]
