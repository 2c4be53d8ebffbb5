"""Fuzzing the gateway's HTTP surface (README's route table) against the real trio: random paths,
methods, query strings, headers and bodies, and raw malformed requests. Every answer is a 4xx with the
JSON error shape (never a 500, never a hang), and after each batch every service still serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import example, given, strategies as st

from tests.fuzzing import (
    NUMBERISH,
    Trio,
    assert_json_error,
    assert_serving,
    fuzz,
    hostile_text,
    http_request,
    int_verdict,
    json_bomb,
    json_values,
    launch_and_finish,
    raw_http,
    trio,  # noqa: F401  (the module's fixture)
)

MAX_BODY = 65536  # gateway.max_body_bytes default

ROUTES = [
    ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/api/pipelines"), ("GET", "/api/runs"),
    ("POST", "/api/runs"), ("GET", "/api/runs/{run}"), ("GET", "/api/runs/{run}/events"),
    ("POST", "/api/runs/{run}/cancel"), ("GET", "/api/schedules"), ("POST", "/api/schedules/{name}/pause"),
    ("POST", "/api/schedules/{name}/resume"),
]
QUERY_NAMES = ["after_seq", "limit", "status", "include_probes", "pipeline", "before", "cursor", "token", "x"]


@pytest.fixture(scope="module")
def ended_run(trio: Trio) -> str:  # noqa: F811
    return launch_and_finish(trio)


@pytest.fixture(autouse=True)
def still_serving(trio: Trio) -> Iterator[None]:  # noqa: F811
    yield
    assert_serving(trio)


def _no_500(status: int, headers: dict[str, str], body: bytes, what: Any) -> None:
    assert status < 500, (what, status, body[:500])
    if status >= 400:
        assert_json_error(status, headers, body, what)


# ---------------------------------------------------------------------------- numbers in query strings


@fuzz(60)
@given(route=st.sampled_from(["/api/runs/{run}/events", "/api/runs"]),
       name=st.sampled_from(["after_seq", "limit"]), raw=NUMBERISH)
@example(route="/api/runs/{run}/events", name="after_seq", raw="١١")
@example(route="/api/runs/{run}/events", name="after_seq", raw="²")
@example(route="/api/runs/{run}/events", name="after_seq", raw="--1")
@example(route="/api/runs/{run}/events", name="limit", raw="--5")
@example(route="/api/runs", name="limit", raw="--5")
@example(route="/api/runs", name="limit", raw="²")
def test_numbers_in_query_strings_are_ascii_digits_or_a_400_naming_the_parameter(
        trio: Trio, ended_run: str, route: str, name: str, raw: str) -> None:  # noqa: F811
    if route == "/api/runs" and name == "after_seq":
        return
    path = route.replace("{run}", ended_run) + f"?{name}={quote(raw, safe='')}"
    status, headers, body = http_request(trio.ports.http, "GET", path)
    lo, hi = (0, 2**53) if name == "after_seq" else (1, 1000 if route == "/api/runs" else 10_000)
    verdict = int_verdict(raw, lo, hi)
    if verdict or (verdict is None and status == 200):
        assert status == 200, (path, status, body[:300])
        return
    doc = assert_json_error(status, headers, body, path, statuses=(400,))
    assert name in doc["error"]["message"], (path, doc)


# ---------------------------------------------------------------------------- random routes and params


path_segment = hostile_text.map(lambda s: quote(s, safe=""))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str]:
    method, template = draw(st.sampled_from(ROUTES + [("GET", "/{any}"), ("GET", "/api/{any}"),
                                                      ("GET", "/ws/events/{run}")]))
    method = draw(st.sampled_from([method, method, "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"]))
    path = template
    for hole in ("{run}", "{name}", "{any}"):
        while hole in path:
            path = path.replace(hole, draw(path_segment) or "x", 1)
    params = draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES), hostile_text), max_size=4))
    if params:
        path += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params)
    return method, path


@fuzz(400)
@given(req=requests())
@example(req=("GET", "/api/runs/a%00b/events"))
@example(req=("GET", "/api/runs?limit=" + "9" * 400))
@example(req=("POST", "/api/schedules/%00/pause"))
@example(req=("GET", "/api/runs?status=%00&before=..%2F..&pipeline=%FF"))
def test_random_routes_methods_and_query_strings_answer_json_errors(trio: Trio, req: tuple[str, str]) -> None:  # noqa: F811
    method, path = req
    status, headers, body = http_request(trio.ports.http, method, path)
    _no_500(status, headers, body, req)


# ---------------------------------------------------------------------------- headers


# Expect is aiohttp's own answer (417): one case in MALFORMED, so it does not hide every other finding here
header_name = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
                      min_size=1, max_size=30).filter(lambda n: n.lower() != "expect")
header_value = st.one_of(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=200),
                         NUMBERISH.filter(lambda s: "\x00" not in s))


@fuzz(200)
@given(path=st.sampled_from(["/api/runs", "/api/pipelines", "/api/runs/{run}/events", "/metrics"]),
       headers=st.lists(st.tuples(st.one_of(header_name, st.sampled_from(
           ["Authorization", "Content-Length", "Transfer-Encoding", "Host", "Last-Event-ID", "Content-Type",
            "Connection", "Upgrade", "Accept-Encoding"])), header_value), max_size=6))
def test_random_headers_never_give_a_500(trio: Trio, ended_run: str, path: str, headers: list[tuple[str, str]]) -> None:  # noqa: F811
    path = path.replace("{run}", ended_run)
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    for k, v in headers:
        head += k.encode("latin-1") + b": " + v.encode("utf-8") + b"\r\n"  # raw UTF-8 bytes in a header: hostile, not HTTP
    head += b"Connection: close\r\n\r\n"
    status, hdrs, body = raw_http(trio.ports.http, head)
    _no_500(status, hdrs, body, headers)


# ---------------------------------------------------------------------------- bodies


def _post(trio: Trio, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:  # noqa: F811
    return http_request(trio.ports.http, "POST", path, body=body, headers={"Content-Type": content_type})


body_bytes = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["pipeline", "params", "reason", "extra"]), json_values, max_size=3).map(
        lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"pipeline": st.sampled_from(["echo", "sleepy", "nope", "", "\x00"]),
                           "params": st.dictionaries(st.sampled_from(["word", "words", "seconds", "zzz"]),
                                                     json_values, max_size=3)}).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=300),
    st.sampled_from([b"", b" ", b"null", b"[]", b"\"x\"", b"1", b"{", b"{\"pipeline\":", b"\xff\xfe",
                     b'{"pipeline": "echo"}\x00', b'{"pipeline": "echo", "pipeline": "echo"}']),
)


def _launchable(body: bytes) -> bool:
    """A body that is a valid launch of a configured pipeline (then 202 is right)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict) or set(doc) - {"pipeline", "params"} or doc.get("pipeline") not in ("echo", "sleepy"):
        return False
    params = doc.get("params", {})
    if not isinstance(params, dict):
        return False
    if doc["pipeline"] == "sleepy":
        return set(params) <= {"seconds"} and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in params.values())
    ok_word = all(isinstance(params[k], str) and "\x00" not in params[k] for k in params if k == "word")
    return set(params) <= {"word", "words"} and ok_word and "words" not in params


@fuzz(300)
@given(path=st.sampled_from(["/api/runs", "/api/runs/{run}/cancel"]), body=body_bytes)
@example(path="/api/runs", body=json_bomb(5000, "list"))
@example(path="/api/runs", body=json_bomb(5000, "dict"))
@example(path="/api/runs", body=b'{"pipeline": "echo", "params": {"word": ' + json_bomb(5000, "dict") + b"}}")
@example(path="/api/runs/{run}/cancel", body=json_bomb(5000, "dict"))
@example(path="/api/runs", body=json.dumps({"pipeline": "echo", "params": {"word": "a\x00b"}}).encode())
@example(path="/api/runs", body=json.dumps({"pipeline": "echo", "params": {"words": ["a", "b\x00"]}}).encode())
def test_bodies_that_are_not_launches_get_4xx_json(trio: Trio, ended_run: str, path: str, body: bytes) -> None:  # noqa: F811
    path = path.replace("{run}", ended_run)
    status, headers, answer = _post(trio, path, body)
    if path == "/api/runs" and _launchable(body):
        assert status == 202, (body[:200], status, answer[:300])
        return
    assert_json_error(status, headers, answer, body[:200], statuses=(400, 409, 413))


@fuzz(6)
@given(extra=st.integers(min_value=1, max_value=3 * MAX_BODY), declared=st.booleans())
@example(extra=1, declared=True)
@example(extra=1, declared=False)
def test_bodies_over_max_body_bytes_get_413(trio: Trio, extra: int, declared: bool) -> None:  # noqa: F811
    body = json.dumps({"pipeline": "sleepy", "params": {}, "pad": "x" * (MAX_BODY + extra)}).encode()
    if declared:
        status, headers, answer = _post(trio, "/api/runs", body)
    else:  # chunked, no Content-Length: refused while reading
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192]) for i in range(0, len(body), 8192))
        req = (b"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n")
        status, headers, answer = raw_http(trio.ports.http, req)
    doc = assert_json_error(status, headers, answer, (extra, declared), statuses=(413,))
    assert doc["error"]["code"] == "body_too_large"


# ---------------------------------------------------------------------------- raw malformed requests


MALFORMED = [
    b"GET /\xff\xfe\xfd HTTP/1.1\r\nHost: x\r\n\r\n",                    # a raw path that is not ASCII
    b"GET /api/runs/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",           # URL over the line limit
    b"GET /api/runs HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",  # header over the limit
    b"GARBAGE\r\n\r\n",                                                   # malformed request lines
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / FTP/1.1\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"GET /api/runs HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET /api/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST /api/runs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /api/runs HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /api/runs HTTP/1.1\r\n: empty-name\r\n\r\n",
    b"GET /api/runs HTTP/1.1\r\nHost: x\r\nExpect: 0\r\n\r\n",       # aiohttp's own 417
]

MALFORMED_IDS = ["non-ascii-path", "non-ascii-run-id", "url-over-64k", "header-over-64k", "garbage-line", "no-target", "http-9.9", "ftp", "nul-in-method", "negative-length", "two-lengths", "bad-chunk", "header-without-colon", "empty-header-name", "expect-0"]


def test_a_missing_static_file_is_a_json_404(trio: Trio) -> None:  # noqa: F811
    status, headers, body = http_request(trio.ports.http, "GET", "/static/no-such-file.js")
    assert_json_error(status, headers, body, "/static/no-such-file.js", statuses=(404,))


@pytest.mark.parametrize("request_bytes", MALFORMED, ids=MALFORMED_IDS)
def test_malformed_raw_requests_get_a_json_400(trio: Trio, request_bytes: bytes) -> None:  # noqa: F811
    status, headers, body = raw_http(trio.ports.http, request_bytes)
    assert_json_error(status, headers, body, request_bytes[:60])


@fuzz(150)
@given(line=st.binary(min_size=1, max_size=200).filter(lambda b: b"\r\n\r\n" not in b))
def test_random_request_lines_get_a_json_error_or_nothing(trio: Trio, line: bytes) -> None:  # noqa: F811
    """Bytes that are no HTTP at all: the gateway answers a JSON 4xx (or closes), never a 500 or a hang."""
    try:
        # half-closed after sending: blank lines before a request are allowed (RFC 9112 2.2), so the
        # server may rightly wait for more; at EOF it must answer or close
        status, headers, body = raw_http(trio.ports.http, line + b"\r\n\r\n", timeout=REQUEST_TIMEOUT_RAW, half_close=True)
    except AssertionError as e:  # closed without an answer: acceptable for bytes that are no request
        assert "no HTTP answer: b''" in str(e), e
        return
    _no_500(status, headers, body, line)


REQUEST_TIMEOUT_RAW = 15.0
