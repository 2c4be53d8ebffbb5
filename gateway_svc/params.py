"""Checking what a request brings: bounded query integers, capped JSON bodies. A bad value is a 400
naming the parameter; nothing unchecked reaches a file path or another service."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from shared.values import MAX_DEPTH, decode_json_object

from .errors import HttpError

# ASCII digits only: str.isdigit() and int() also take '²' and Arabic-Indic digits ('١١' is 11)
_INTEGER = re.compile(r"-?[0-9]{1,19}", re.ASCII)


def int_param(request: web.Request, name: str, *, default: int, lo: int, hi: int, alias: str | None = None) -> int:
    raw = request.query.get(name)
    if raw is None and alias is not None:
        raw = request.query.get(alias)
    if raw is None or raw == "":
        return default
    if _INTEGER.fullmatch(raw) is None:
        raise HttpError(400, "bad_request", f"query parameter {name!r}: expected an integer in ASCII digits, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise HttpError(400, "bad_request", f"query parameter {name!r}: expected {lo}..{hi}, got {value}")
    return value


def flag_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise HttpError(400, "bad_request", f"query parameter {name!r}: expected 1 or 0, got {raw[:40]!r}")


async def json_body(request: web.Request, max_bytes: int, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object, refused with 413 beyond `max_bytes` (before reading, when the
    length is declared) and 400 when it is not a JSON object."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise HttpError(413, "body_too_large", f"request body of {length} bytes exceeds {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise HttpError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    if not body.strip():
        if required:
            raise HttpError(400, "bad_request", "expected a JSON object as the request body")
        return {}
    try:
        return decode_json_object(bytes(body))
    except msgspec.DecodeError as e:
        raise HttpError(400, "bad_request", f"request body is not a JSON object nested at most {MAX_DEPTH} levels: {e}") from None
