"""The fault run's clients, as users write them: a WebSocket all-runs client resuming with its cursor, an
SSE client resuming with Last-Event-ID, per-run WebSocket clients resuming with after_seq, and a ZeroMQ
subscriber following the README's recipe (examples/zmq_subscriber.py, with its refill retried while the
gateway is down). Each records what it received in a ClientLog; at random moments (its own seeded
Random) it stalls (stops reading) or disconnects and resumes, until the run tells it to be calm.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import anyio
import msgspec
import zmq

from tests.faultrun_checks import ClientLog, is_terminal

RETRY_S = 0.5
RCVBUF = 32 * 1024  # a small, fixed receive buffer: a client that stops reading soon stops the gateway's sends


def _small_buffer_socket(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # set before connect: no autotuning
    return sock


def _session(**kwargs: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=_small_buffer_socket), **kwargs)


class Mood:
    """Shared switches: `calm` ends stalls and disconnects (the settle phase); `stop` ends the clients."""

    def __init__(self) -> None:
        self.calm = False
        self.stop = False


def _next_whim(rng: random.Random, mood: Mood) -> tuple[float, str]:
    """(seconds until it, what): read normally for a while, then stall or disconnect."""
    if mood.calm:
        return 3600.0, "stay"
    return rng.uniform(2.0, 15.0), rng.choice(["stall", "disconnect", "stall", "disconnect", "stay"])


async def _whim(log: ClientLog, rng: random.Random, what: str) -> bool:
    """Do the whim; True when the client should reconnect now."""
    if what == "stall":
        log.stalls += 1
        await anyio.sleep(rng.uniform(1.0, 12.0))  # not reading: the socket buffers fill
        return False
    if what == "disconnect":
        log.disconnects += 1
        return True
    return False


def _on_frame(log: ClientLog, frame: dict[str, Any], resumed: str = "") -> None:
    """Record one frame and the cursor it carries."""
    kind = frame.get("type")
    if kind == "hello":
        log.connects += 1
        log.hellos.append((len(log.received), f"{resumed[:60]} recovered={frame.get('recovered')}"))
        if log.t0 is None:
            log.t0 = time.time()
        if frame.get("recovered") is False:
            log.unrecovered.append(str(frame.get("reason")))
    elif kind == "events":
        for ev in frame.get("events", []):
            log.received.append((ev["run_id"], ev["seq"]))
            if is_terminal(ev):
                log.terminal_seen = True
    elif kind == "error":
        log.errors.append(f"{frame.get('code')}: {frame.get('message')}")
    cur = frame.get("cursor")
    if isinstance(cur, str):
        log.cursor = cur


async def ws_all_client(base: str, log: ClientLog, rng: random.Random, mood: Mood) -> None:
    async with _session() as http:
        while not mood.stop:
            params = {"cursor": log.cursor} if log.cursor else {}
            try:
                async with http.ws_connect(f"{base}/ws/events", params=params, autoping=True) as ws:
                    await _ws_session(ws, log, rng, mood)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.closes[type(e).__name__] += 1
            await anyio.sleep(rng.uniform(0.0, 2.0) if not mood.calm else RETRY_S)


async def _ws_session(ws: aiohttp.ClientWebSocketResponse, log: ClientLog, rng: random.Random, mood: Mood) -> None:
    due, what = _next_whim(rng, mood)
    deadline = time.monotonic() + due
    resumed = str(log.cursor)
    while not mood.stop:
        wait = max(0.01, min(deadline - time.monotonic(), 1.0))
        try:
            msg = await ws.receive(timeout=wait)
        except TimeoutError:
            if time.monotonic() >= deadline:
                if await _whim(log, rng, what):
                    return
                due, what = _next_whim(rng, mood)
                deadline = time.monotonic() + due
            elif mood.calm and what != "stay":
                due, what = _next_whim(rng, mood)
                deadline = time.monotonic() + due
            continue
        if msg.type == aiohttp.WSMsgType.TEXT:
            _on_frame(log, json.loads(msg.data), resumed)
        else:
            log.closes[str(ws.close_code) if ws.close_code is not None else msg.type.name] += 1
            return


async def run_ws_client(base: str, log: ClientLog, rng: random.Random, mood: Mood) -> None:
    """/ws/events/{run_id}?after_seq=<last received>, until the terminal event has arrived."""
    assert log.run_id is not None
    async with _session() as http:
        while not mood.stop and not log.terminal_seen:
            after = max((s for _, s in log.received), default=0)
            try:
                async with http.ws_connect(f"{base}/ws/events/{log.run_id}", params={"after_seq": str(after)}) as ws:
                    await _ws_session(ws, log, rng, mood)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.closes[type(e).__name__] += 1
            if not log.terminal_seen:
                await anyio.sleep(rng.uniform(0.0, 2.0) if not mood.calm else RETRY_S)


async def sse_client(base: str, log: ClientLog, rng: random.Random, mood: Mood) -> None:
    async with _session(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as http:
        while not mood.stop:
            headers = {"Last-Event-ID": log.cursor} if log.cursor else {}
            try:
                async with http.get(f"{base}/api/events", headers=headers) as resp:
                    if resp.status != 200:
                        log.closes[f"http {resp.status}"] += 1
                    else:
                        await _sse_session(resp, log, rng, mood)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.closes[type(e).__name__] += 1
            await anyio.sleep(rng.uniform(0.0, 2.0) if not mood.calm else RETRY_S)


async def _sse_session(resp: aiohttp.ClientResponse, log: ClientLog, rng: random.Random, mood: Mood) -> None:
    due, what = _next_whim(rng, mood)
    deadline = time.monotonic() + due
    fields: dict[str, str] = {}
    buf = b""
    resumed = str(log.cursor)
    while not mood.stop:
        if time.monotonic() >= deadline:
            if await _whim(log, rng, what):
                return
            due, what = _next_whim(rng, mood)
            deadline = time.monotonic() + due
        elif mood.calm and what != "stay":
            due, what = _next_whim(rng, mood)
            deadline = time.monotonic() + due
        if b"\n" not in buf:
            # readany, never readline: a cancelled readline loses the part of a line it had taken
            with anyio.move_on_after(1.0):
                chunk = await resp.content.readany()
                if not chunk:
                    log.closes["eof"] += 1
                    return
                buf += chunk
            continue
        raw, _, buf = buf.partition(b"\n")
        line = raw.decode().rstrip("\r")
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = fields.get(name, "") + value.removeprefix(" ")
            continue
        if "data" in fields:
            frame = json.loads(fields["data"])
            if fields.get("event") == "error":
                frame = {**frame, "type": "error"}
            frame.pop("cursor", None)  # SSE resumes from the `id:` field, whatever the frame holds
            _on_frame(log, frame, resumed)
        if "id" in fields:
            log.cursor = fields["id"]
        fields = {}
    return


class ZmqSubscriber:
    """The README's recipe in a thread: SUB to both publishers, `ev/` and `hb/`; a seq gap or a heartbeat
    above our last seq is filled from GET /api/runs/{id}/events?after_seq=N (retried while the gateway
    does not answer); an event at or below our last seq is ignored. It stalls (stops receiving) and
    reconnects its socket at random, keeping its per-run positions."""

    def __init__(self, pubs: list[str], gateway: str, log: ClientLog, rng: random.Random, mood: Mood) -> None:
        self.pubs, self.gateway, self.log, self.rng, self.mood = pubs, gateway, log, rng, mood
        self.last: dict[str, int] = {}
        self.pending: set[str] = set()
        self.thread = threading.Thread(target=self._main, name=log.name, daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self.log.t0 = time.time()
        self.thread.start()

    def join(self) -> None:
        self.thread.join(10)
        if self.failure is not None:
            raise self.failure

    def _emit(self, ev: dict[str, Any]) -> None:
        self.log.received.append((ev["run_id"], ev["seq"]))
        self.last[ev["run_id"]] = ev["seq"]
        if is_terminal(ev):
            self.log.terminal_seen = True

    def _catch_up(self, run_id: str) -> None:
        after = self.last.get(run_id, 0)
        try:
            while True:
                url = f"{self.gateway}/api/runs/{run_id}/events?after_seq={after}&limit=1000"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = json.load(resp)
                for ev in body["events"]:
                    if ev["seq"] == self.last.get(run_id, 0) + 1:
                        self._emit(ev)
                if not body["more"]:
                    break
                after = body["next_after_seq"]
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
            self.log.closes[f"refill {type(e).__name__}"] += 1
            self.pending.add(run_id)
            return
        self.pending.discard(run_id)

    def _socket(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        for ep in self.pubs:
            sub.connect(ep)
        sub.setsockopt(zmq.SUBSCRIBE, b"ev/")
        sub.setsockopt(zmq.SUBSCRIBE, b"hb/")
        self.log.connects += 1
        return sub

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # handed to join(), which raises it in the run
            self.failure = e

    def _loop(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = self._socket(ctx)
        decoder = msgspec.msgpack.Decoder()
        whim_at = time.monotonic() + self.rng.uniform(2.0, 15.0)
        retry_at = 0.0
        try:
            while not self.mood.stop:
                now = time.monotonic()
                if not self.mood.calm and now >= whim_at:
                    if self.rng.random() < 0.5:
                        self.log.stalls += 1
                        time.sleep(self.rng.uniform(1.0, 8.0))
                    else:
                        self.log.disconnects += 1
                        sub.close()
                        time.sleep(self.rng.uniform(0.0, 2.0))
                        sub = self._socket(ctx)
                    whim_at = time.monotonic() + self.rng.uniform(2.0, 15.0)
                if self.pending and now >= retry_at:
                    for run_id in sorted(self.pending):
                        self._catch_up(run_id)
                    retry_at = now + RETRY_S
                if not sub.poll(200):
                    continue
                topic, payload = sub.recv_multipart()
                msg = decoder.decode(payload)
                if topic.startswith(b"hb/"):
                    for run_id, seq in (msg.get("runs") or {}).items():
                        if seq > self.last.get(run_id, 0):
                            self._catch_up(run_id)  # a lost tail
                    continue
                run_id, seq = msg["run_id"], msg["seq"]
                have = self.last.get(run_id, 0)
                if seq <= have:
                    continue
                if seq > have + 1:
                    self._catch_up(run_id)  # a gap: fill it first
                if seq == self.last.get(run_id, 0) + 1:
                    self._emit(msg)
        finally:
            sub.close()
            ctx.term()
