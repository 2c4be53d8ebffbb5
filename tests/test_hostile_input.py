"""Regression tests for the poison inputs of issue 11: depth bombs on the control sockets and in a journal,
deep JSON over HTTP and WebSocket, numbers that are not ASCII digits, a NUL in a parameter, and the
requests aiohttp refuses before any route sees them. Each gets a clear error and the services keep
serving (and start) afterwards. The broad, generated cases are in tests/test_fuzz_*.py."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import zmq

from shared.control import Identity, Launch, encode
from shared.journal import journal_path
from tests.harness import Service, write_config
from tests.test_gateway_helpers import collect, make_settings, running_gateway

BOMB = 5_000


def _ask(endpoint: str, payload: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """One raw request on a control ROUTER (DEALER side), its reply decoded without a schema."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(payload)
        assert sock.poll(timeout * 1000), f"no reply from {endpoint}"
        reply: dict[str, Any] = msgspec.msgpack.decode(sock.recv())
        sock.close()
        return reply
    finally:
        ctx.term()


def test_a_depth_bomb_on_either_control_socket_is_refused_and_both_keep_serving(tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    services.append(Service("runner_svc", cfg, tmp_path).start())
    # params nested 3,000 levels (3 KB): MessagePack arrays of one element, 0x91 each (no encoder nests so deep)
    template = msgspec.msgpack.encode({"op": "launch", "id": 7, "pipeline": "sleepy", "params": {"seconds": "@@"}})
    bomb = template.replace(b"\xa2@@", b"\x91" * 3_000 + b"\x01")
    for port in (ports.control, ports.runner_control):
        endpoint = f"tcp://127.0.0.1:{port}"
        reply = _ask(endpoint, bomb)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
        assert _ask(endpoint, encode(Identity(id=8)))["ok"] is True
    # the scheduler still launches
    reply = _ask(f"tcp://127.0.0.1:{ports.control}", encode(Launch(id=9, pipeline="sleepy", params={"seconds": 0.1})))
    assert reply["ok"] is True, reply
    for svc in services:
        assert svc.proc is not None and svc.proc.poll() is None, svc.output()[-3000:]


async def test_a_depth_bomb_line_in_a_journal_is_skipped_reported_and_all_three_services_start(
    tmp_path: Path, services: list[Service]
) -> None:
    cfg, ports = write_config(tmp_path)
    trio = [Service(m, cfg, tmp_path).start() for m in ("scheduler_svc", "runner_svc", "gateway_svc")]
    services.extend(trio)
    base = f"http://127.0.0.1:{ports.http}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/runs", json={"pipeline": "sleepy", "params": {"seconds": 0.1}}) as resp:
            assert resp.status == 202, await resp.text()
            run_id = (await resp.json())["run_id"]
        with anyio.fail_after(30):
            while True:
                async with http.get(f"{base}/api/runs/{run_id}") as resp:
                    if (await resp.json()).get("status") == "success":
                        break
                await anyio.sleep(0.1)
    for svc in reversed(trio):
        assert svc.stop() == 0
    services.clear()

    # replace the second line (the runner's start) by a line nested 5,000 levels deep, and append one
    path = journal_path(tmp_path / "home" / "events", run_id)
    lines = path.read_bytes().splitlines(keepends=True)
    start = json.loads(lines[1])
    bomb_line = (json.dumps({**start, "data": {"x": 0}})[:-2] + ', "y": ' + "[" * BOMB + "]" * BOMB + "}}\n").encode()
    path.write_bytes(lines[0] + bomb_line + b"".join(lines[2:]) + bomb_line)

    trio = [Service(m, cfg, tmp_path).start() for m in ("scheduler_svc", "runner_svc", "gateway_svc")]
    services.extend(trio)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/runs/{run_id}/events") as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        seqs = [e["seq"] for e in body["events"]]
        assert seqs == [1] + list(range(3, len(lines) + 1)), seqs
        assert body["gaps"] == [[2, 2]], body["gaps"]
        got = await collect(http, f"ws://127.0.0.1:{ports.http}/ws/events/{run_id}?after_seq=0", timeout=20)
        assert got.close_code == 1000
        assert [e["seq"] for e in got.events] == seqs
        gaps = [f for f in got.frames if f["type"] == "error" and f["code"] == "journal_gap"]
        assert gaps and gaps[0]["missing"] == [2, 2], got.frames
        async with http.post(f"{base}/api/runs", json={"pipeline": "sleepy", "params": {"seconds": 0.1}}) as resp:
            assert resp.status == 202, await resp.text()
    assert "skipped corrupt line" in trio[2].output()


async def test_http_inputs_that_used_to_answer_500_or_be_misread_get_a_json_400(tmp_path: Path) -> None:
    settings, ports = make_settings(tmp_path)
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        for query in ("after_seq=--1", "limit=--5", "after_seq=%C2%B2", "after_seq=%D9%A1%D9%A1", "limit=1e3", "limit=%EF%BC%95"):
            url = aiohttp.client.URL(f"{gw.base}/api/runs/some-run/events?{query}", encoded=True)
            async with http.get(url) as resp:
                body = await resp.json()
                assert resp.status == 400, (query, body)
                name = query.split("=")[0]
                assert body["error"]["code"] == "bad_request" and repr(name) in body["error"]["message"], body
        async with http.get(aiohttp.client.URL(f"{gw.base}/api/runs?limit=--5", encoded=True)) as resp:
            assert resp.status == 400
        deep_body = '{"pipeline": "sleepy", "params": {"seconds": ' + "[" * BOMB + "]" * BOMB + "}}"
        async with http.post(f"{gw.base}/api/runs", data=deep_body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400 and resp.content_type == "application/json"
            assert "nested" in (await resp.json())["error"]["message"]
        async with http.post(f"{gw.base}/api/runs", json={"pipeline": "sleepy", "params": {"seconds": "a\u0000b"}}) as resp:
            assert resp.status == 400  # a float parameter given a string

        for frame in ("[" * BOMB + "]" * BOMB, '{"type": ' + "[" * BOMB + "]" * BOMB + "}", "x" * 5000):
            async with http.ws_connect(f"{gw.ws}/ws/events") as ws:
                hello = await ws.receive_json(timeout=10)
                assert hello["type"] == "hello"
                await ws.send_str(frame)
                error = await ws.receive_json(timeout=10)
                assert error["type"] == "error" and error["code"] == "bad_message", error
                closed = await ws.receive(timeout=10)
                assert closed.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4400, (closed, ws.close_code)

        # refused by aiohttp's parser before any route: still the API's JSON error
        raw_requests = [
            b"GET /api/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
            b"BLAH\x01 / HTTP/1.1\r\n\r\n",
            b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
        ]
        for raw in raw_requests:
            status, headers, body = await anyio.to_thread.run_sync(_raw_http, ports.http, raw)
            assert status == 400, (raw[:40], status, body)
            assert headers.get("content-type", "").startswith("application/json"), (raw[:40], headers)
            assert json.loads(body)["error"]["code"] == "bad_request"
        async with http.get(f"{gw.base}/api/runs") as resp:
            assert resp.status == 200


def _raw_http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        end = time.monotonic() + 10
        while time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body
