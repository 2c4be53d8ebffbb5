"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): the real trio started once per module,
plain clients that are not our code (http.client, raw sockets, pyzmq, aiohttp), hostile-input
strategies, and the check that every service still serves after a batch of hostile input.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, settings, strategies as st

from shared.journal import JournalReader, journal_path
from tests.harness import SLEEP_PIPELINE, Ports, Service, write_config

# Fuzz settings: the services are real processes on 2 shared cores, so examples are few and slow-ish;
# no deadline (a loaded machine is not a bug), no example database (nothing written into the repo).
FUZZ = dict(
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.function_scoped_fixture],
)


def fuzz(max_examples: int) -> Any:
    return settings(max_examples=max_examples, **FUZZ)  # type: ignore[arg-type]


REQUEST_TIMEOUT = 15.0  # a generous bound: an answer that takes longer counts as a hang

# ---------------------------------------------------------------------------- the trio


@dataclass
class Trio:
    config: Path
    ports: Ports
    home: Path
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def journal_dir(self) -> Path:
        return self.home / "events"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.ports.http}"

    @property
    def scheduler_control(self) -> str:
        return f"tcp://127.0.0.1:{self.ports.control}"

    @property
    def runner_control(self) -> str:
        return f"tcp://127.0.0.1:{self.ports.runner_control}"

    @property
    def dispatch(self) -> str:
        return f"tcp://127.0.0.1:{self.ports.dispatch}"

    def start(self) -> Trio:
        for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
            self.services[module] = Service(module, self.config, self.config.parent).start()
        wait_healthy(self)
        return self

    def stop(self) -> None:
        errors = []
        for svc in reversed(list(self.services.values())):
            try:
                svc.stop()
            except AssertionError as e:
                errors.append(str(e))
        if errors:
            raise AssertionError("\n".join(errors))

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{svc.output()[-3000:]}" for name, svc in self.services.items())


# `sleepy` (a float parameter) and `echo` (a string and a list parameter: where a NUL byte could hide)
FUZZ_PIPELINES = SLEEP_PIPELINE + """
[pipelines.echo]
description = "prints its parameters"
[pipelines.echo.params.word]
type = "str"
default = "hello"
[pipelines.echo.params.words]
type = "list"
default = ["a"]
[[pipelines.echo.stages]]
name = "say"
command = ["{python}", "-c", "import sys; print(sys.argv[1:])", "{word}", "{words}"]
timeout = 60
"""


def make_trio(tmp: Path, body: str = FUZZ_PIPELINES, **kw: Any) -> Trio:
    config, ports = write_config(tmp, body, **kw)
    return Trio(config=config, ports=ports, home=tmp / "home")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    """The real scheduler, runner and gateway, started once for a module's fuzz tests."""
    t = make_trio(tmp_path_factory.mktemp("trio"))
    t.start()
    try:
        yield t
    finally:
        t.stop()


def wait_healthy(trio: Trio, timeout: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            status, _, body = http_request(trio.ports.http, "GET", "/healthz")
            last = (status, body[:500])
            if status == 200:
                return json.loads(body)  # type: ignore[no-any-return]
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"/healthz not 200 within {timeout}s: {last!r}\n{trio.logs()}")


def assert_serving(trio: Trio) -> None:
    """After a batch: every process alive, /healthz 200, an HTTP route and both control sockets answer."""
    for name, svc in trio.services.items():
        assert svc.proc is not None and svc.proc.poll() is None, f"{name} exited ({svc.proc and svc.proc.returncode}):\n{svc.output()[-4000:]}"
    wait_healthy(trio, timeout=10.0)
    status, headers, body = http_request(trio.ports.http, "GET", "/api/pipelines")
    names = [p["name"] for p in json.loads(body)["pipelines"]] if status == 200 else []
    assert status == 200 and "sleepy" in names, (status, body[:300])
    for endpoint, service in ((trio.scheduler_control, "scheduler"), (trio.runner_control, "runner")):
        reply = control_identity(endpoint)
        assert reply.get("ok") is True and reply["result"]["service"] == service, reply


def launch_and_finish(trio: Trio, seconds: float = 0.1, timeout: float = 30.0) -> str:
    """A normal launch still works: 202, then the run ends success with exactly one terminal event."""
    status, _, body = http_request(trio.ports.http, "POST", "/api/runs",
                                   body=json.dumps({"pipeline": "sleepy", "params": {"seconds": seconds}}).encode(),
                                   headers={"Content-Type": "application/json"})
    assert status == 202, (status, body[:500])
    run_id = json.loads(body)["run_id"]
    wait_run_ended(trio, run_id, timeout)
    return run_id  # type: ignore[no-any-return]


def wait_run_ended(trio: Trio, run_id: str, timeout: float = 30.0, expect: str = "success") -> list[Any]:
    end = time.monotonic() + timeout
    events: list[Any] = []
    while time.monotonic() < end:
        events = JournalReader(journal_path(trio.journal_dir, run_id), run_id).read()
        if events and events[-1].is_terminal:
            break
        time.sleep(0.1)
    terminals = [ev for ev in events if ev.is_terminal]
    assert len(terminals) == 1, (run_id, [(e.seq, e.stage, e.event, e.msg) for e in events], trio.logs())
    assert terminals[0].event == expect, (run_id, terminals[0], trio.logs())
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), [e.seq for e in events]
    return events


# ---------------------------------------------------------------------------- plain clients


def http_request(port: int, method: str, path: str, *, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection with http.client: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def raw_http(port: int, request: bytes, timeout: float = REQUEST_TIMEOUT,
             half_close: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer until the server closes or the body is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it read everything we sent
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                lengths = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")[1:]
                           if ln.lower().startswith(b"content-length:")]
                if lengths and len(rest) >= int(lengths[0]):
                    break
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines and lines[0].startswith(b"HTTP/1."), f"no HTTP answer: {data[:300]!r}"
    status = int(lines[0].split()[1])
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.decode("latin-1").partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest


def assert_json_error(status: int, headers: dict[str, str], body: bytes, what: Any, statuses: tuple[int, ...] | None = None) -> dict[str, Any]:
    """A 4xx answer with the README's JSON error shape and content type."""
    assert 400 <= status < 500, (what, status, body[:300])
    if statuses is not None:
        assert status in statuses, (what, status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (what, status, headers, body[:300])
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), (what, doc)
    assert isinstance(doc["error"].get("code"), str) and doc["error"]["code"], (what, doc)
    assert isinstance(doc["error"].get("message"), str) and doc["error"]["message"], (what, doc)
    return doc


_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder()


def control_send(endpoint: str, frames: list[bytes], timeout: float = REQUEST_TIMEOUT, expect_reply: bool = True) -> Any:
    """Frames from a fresh DEALER (the ROUTER adds the routing id); the decoded reply, or None."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not expect_reply:
            return None
        if not sock.poll(int(timeout * 1000)):
            return None
        reply = sock.recv_multipart()
        return _unpacker.decode(reply[-1])
    finally:
        sock.close(linger=0)


def control_identity(endpoint: str, timeout: float = 10.0) -> dict[str, Any]:
    reply = control_send(endpoint, [_packer.encode({"op": "identity", "id": 7})], timeout)
    assert reply is not None, f"no identity answer from {endpoint} within {timeout}s"
    return reply  # type: ignore[no-any-return]


def pack(obj: Any) -> bytes:
    return _packer.encode(obj)


# ---------------------------------------------------------------------------- strategies


def nested_list(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def json_bomb(depth: int, kind: str = "list") -> bytes:
    """JSON nested `depth` levels, built as text (json.dumps itself would recurse)."""
    if kind == "list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def msgpack_bomb(depth: int) -> bytes:
    """A MessagePack value nested `depth` levels (fixarray of one element, repeated), built by hand."""
    return b"\x91" * depth + b"\x01"


def int_verdict(raw: str, lo: int, hi: int) -> bool | None:
    """Should a query integer `raw` be taken (True), refused with a 400 (False), or either (None: ASCII
    digits zero-padded beyond 19 characters)? ASCII digits only, issue 11 (4)."""
    if raw == "":
        return True  # absent: the default
    if not re.fullmatch(r"-?[0-9]+", raw, re.ASCII):
        return False
    if not lo <= int(raw) <= hi:
        return False
    return True if len(raw) <= 19 else None


# digits a careless parser takes for numbers, and numbers no route should take
NUMBERISH = st.sampled_from([
    "١١", "²", "--1", "-1", "+1", "1e3", "0x10", "1.5", " 1", "1 ", "1_000", "٣", "１２", "𝟙", "Ⅻ", "",
    "-0", "9" * 30, str(2**63), str(2**64), "-" + "9" * 25, "NaN", "inf", "\x00", "1\x00", "%00", "0" * 50 + "1",
])

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
    NUMBERISH,
    st.sampled_from(["../../etc/passwd", "..", "%2e%2e%2f", "a\x00b", "\u202e", "'; DROP TABLE runs;--", "$(id)", "{seconds}"]),
)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=20)
