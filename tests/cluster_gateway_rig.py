"""The rig of tests/test_cluster_gateway.py: a stand-in runner (a PUB socket in the runner registry that
appends each batch to JetStream and publishes it only after the ack), gateway processes on a cluster,
and a WebSocket client that records its frames."""


from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import zmq
import zmq.asyncio

from runwire_cluster.events import EventStream, RunWriter
from runwire_cluster.state import ClusterState
from shared.config import ClusterConfig
from shared.curve import PUBLIC_NAME, SECRET_NAME, CurveKeys, bind_secured
from shared.events import Event
from shared.wire import Heartbeat, encode_event_frames, encode_heartbeat_frames
from tests.cluster_fixtures import NatsCluster, Postgres
from tests.harness import Service, free_port, write_config

numbers = itertools.count(1)
T = 60.0  # generous: two cores shared with other suites


def new_run_id(tag: str) -> str:
    now = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}Z-{tag}.{next(numbers)}"  # a dot too: it must survive the subject mapping


def now_ts() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def make_run(run_id: str, n_logs: int) -> list[Event]:
    """queued, start, n_logs logs, success: a whole run."""
    evs = [Event(run_id=run_id, seq=1, timestamp=now_ts(), stage="pipeline", event="queued", msg="queued",
                 data={"pipeline": "sleepy", "params": {"seconds": 0.1}, "trigger": "manual"}),
           Event(run_id=run_id, seq=2, timestamp=now_ts(), stage="pipeline", event="start", msg="started")]
    for i in range(n_logs):
        evs.append(Event(run_id=run_id, seq=3 + i, timestamp=now_ts(), stage="nap", event="log", msg=f"line {i}"))
    evs.append(Event(run_id=run_id, seq=len(evs) + 1, timestamp=now_ts(), stage="pipeline", event="success", msg="done"))
    return evs


class Publisher:
    """A stand-in runner: a PUB socket in the registry; each batch to JetStream first, then on the socket."""

    def __init__(self, ctx: zmq.asyncio.Context, stream: EventStream, runner_id: str,
                 keys: CurveKeys | None = None) -> None:
        self.stream = stream
        self.runner_id = runner_id
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.sock: zmq.Socket[bytes] = (ctx if keys is None else zmq.Context.instance()).socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        bind_secured(self.sock, self.endpoint, "runner.publish", keys)
        self.writers: dict[str, RunWriter] = {}
        self.last: dict[str, int] = {}  # run -> last seq written (what heartbeats claim)

    async def register(self, state: ClusterState) -> None:
        await state.register_runner(self.runner_id, self.endpoint, f"tcp://127.0.0.1:{free_port()}", 2)

    async def write(self, events: list[Event], *, publish: bool = True) -> None:
        run_id = events[0].run_id
        w = self.writers.get(run_id)
        if w is None:
            w = self.writers[run_id] = await self.stream.writer(run_id, new=events[0].seq == 1)
        await w.append(events)  # acknowledged by a quorum before anything is published
        self.last[run_id] = events[-1].seq
        if publish:
            for ev in events:
                await self._send(encode_event_frames(ev))

    async def heartbeat(self) -> None:
        hb = Heartbeat(runner_id=self.runner_id, timestamp=now_ts(), journal_dir=f"/elsewhere/{self.runner_id}",
                       config_path="/elsewhere/runwire.toml", runs=dict(self.last), interval=0.5)
        await self._send(encode_heartbeat_frames(hb))

    async def _send(self, frames: list[bytes]) -> None:
        sent = self.sock.send_multipart(frames)  # a zmq.asyncio socket's returns an awaitable
        if sent is not None:
            await sent

    def close(self) -> None:
        self.sock.close(linger=0)


def gateway_config(tmp: Path, name: str, nats: NatsCluster, pg: Postgres, keys_dir: Path | None = None) -> Path:
    root = tmp / name
    root.mkdir()
    cluster = (f'\n[cluster]\nnats = {json.dumps(nats.urls)}\nstate = "{pg.url}"\n'
               'stream_max_age = "1h"\nstream_replicas = 3\n')
    if keys_dir is not None:
        cluster += (f'[cluster.curve]\npublic_file = "{keys_dir / PUBLIC_NAME}"\n'
                    f'secret_file = "{keys_dir / SECRET_NAME}"\n')
    path, _ = write_config(root, body=cluster, home=root / "home")
    return path


async def http_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return resp.status, await resp.json()


async def wait_until(what: str, check: Any, timeout: float = T) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await anyio.sleep(0.1)


async def follows(session: aiohttp.ClientSession, base: str, runner_id: str, present: bool = True) -> None:
    async def check() -> bool:
        _, body = await http_json(session, f"{base}/healthz")
        return (runner_id in body["checks"]["registry"]["runners"]) == present
    await wait_until(f"{base} {'follows' if present else 'lets go of'} {runner_id}", check)


async def heard_from(session: aiohttp.ClientSession, base: str, runner_id: str) -> None:
    async def check() -> bool:
        _, body = await http_json(session, f"{base}/healthz")
        return runner_id in body["checks"]["runner"]["runners"]
    await wait_until(f"{base} hears the heartbeats of {runner_id}", check)


class WsReader:
    """A WebSocket client's frames, read in the background."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.closed = anyio.Event()

    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.frames.append(json.loads(msg.data))
        self.closed.set()

    def events(self) -> list[dict[str, Any]]:
        return [ev for f in self.frames if f["type"] == "events" for ev in f["events"]]

    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "error"]

    def last_cursor(self) -> str:
        return [f for f in self.frames if f["type"] in ("hello", "events")][-1]["cursor"]


@asynccontextmanager
async def cluster_rig(tmp: Path, nats: NatsCluster, pg: Postgres) -> AsyncIterator[tuple[EventStream, ClusterState, zmq.asyncio.Context]]:
    await nats.ready()
    cfg = ClusterConfig(nats=nats.urls, state=pg.url, stream_max_age="1h", stream_replicas=3)
    ctx = zmq.asyncio.Context()
    try:
        async with await EventStream.connect(cfg) as stream, await ClusterState.connect(cfg) as state:
            await stream.ensure()
            await state.migrate()
            yield stream, state, ctx
    finally:
        ctx.destroy(linger=0)


def start_gateway(tmp: Path, name: str, nats: NatsCluster, pg: Postgres,
                  keys_dir: Path | None = None) -> tuple[Service, str]:
    path = gateway_config(tmp, name, nats, pg, keys_dir)
    svc = Service("gateway_svc", path, tmp / name).start(timeout=T)
    port = int(svc.wait_for(r"listening on http://127\.0\.0\.1:(\d+)")[1])
    return svc, f"http://127.0.0.1:{port}"


async def run_socket(session: aiohttp.ClientSession, tg: Any, url: str) -> WsReader:
    reader = WsReader(await session.ws_connect(url, max_msg_size=0))
    tg.start_soon(reader.run)
    return reader



async def beat_and_check(session: aiohttp.ClientSession, base: str, pub: Publisher) -> bool:
    await pub.heartbeat()
    _, body = await http_json(session, f"{base}/healthz")
    return pub.runner_id in body["checks"]["runner"]["runners"]


async def has_frames(reader: WsReader, n: int) -> bool:
    return len(reader.frames) >= n


async def count_run(reader: WsReader, run_id: str, n: int, strict: bool = True) -> bool:
    k = sum(1 for e in reader.events() if e["run_id"] == run_id)
    if strict:
        assert k <= n, f"more than {n} events of {run_id}"
    return k >= n


async def metric(session: aiohttp.ClientSession, base: str, name: str) -> tuple[int, float | None]:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name) or line.startswith(f"runwire_gateway_{name}"):
            return resp.status, float(line.split()[-1])
    return resp.status, None


def msgspec_json(ev: Event) -> bytes:
    import msgspec

    return msgspec.json.encode(ev)
