"""The seeds' polling design (seeds 001 and 004), as the end-to-end benchmark's baseline: an aiohttp
backend whose monitor scans `pipeline_*.jsonl` every 2 s, reads each file from its stored offset up to the
size it saw, `json.loads` each line, drops lines already seen by (run_id, line index), and publishes
the rest to an in-process event bus (a ring buffer of recent events plus one queue per subscriber);
each WebSocket handler sends every event of its subscription with `send_json`, one frame per event.

As in seed 001's pseudo-code, a line that fails to parse is logged and ends that file's pass without
moving its offset, so the next pass reads the chunk again and the dedupe keeps what was published. The
line index counts lines from the start of the file (what keeps that re-read from duplicating).
Nothing is replayed to a client that connects late but the ring buffer's contents are not sent either
(the seed's WebSocket streams from its subscription on); there are no cursors.

    python -m bench.baselines.polling EVENTS_DIR HTTP_PORT      (prints "ready" once listening)
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)
SCAN_INTERVAL = 2.0


class EventBus:
    """Central distribution: a ring buffer of recent events, and a queue per subscriber."""

    def __init__(self, ring: int = 1000) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=ring)
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    async def publish(self, event: dict[str, Any]) -> None:
        self.recent.append(event)
        for q in self.subscribers:
            q.put_nowait(event)

    async def subscribe(self, q: asyncio.Queue[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                yield await q.get()
        finally:
            self.subscribers.discard(q)


class Monitor:
    """The JSONL event replay monitor: offsets and line counts per file, the seen (run_id, line) keys."""

    def __init__(self, events_dir: Path, bus: EventBus) -> None:
        self.events_dir = events_dir
        self.bus = bus
        self.offsets: dict[Path, int] = {}
        self.lines: dict[Path, int] = {}  # lines before the stored offset
        self.seen: dict[tuple[str, int], bool] = {}

    async def scan_once(self) -> None:
        for path in self.events_dir.glob("pipeline_*.jsonl"):
            last = self.offsets.get(path, 0)
            size = path.stat().st_size
            if size <= last:
                continue
            with open(path, "rb") as f:
                f.seek(last)
                new_data = f.read()
            try:
                for index, line in enumerate(new_data.decode().split("\n"), start=self.lines.get(path, 0)):
                    if line.strip():
                        event = json.loads(line)
                        key = (event["run_id"], index)
                        if key not in self.seen:
                            await self.bus.publish(event)
                            self.seen[key] = True
            except (ValueError, KeyError) as e:  # a torn or bad line: read the chunk again next pass
                log.warning("%s: line after offset %d not parsed (%s); retrying next scan", path, last, e)
                continue
            self.lines[path] = self.lines.get(path, 0) + new_data[: size - last].count(b"\n")
            self.offsets[path] = size

    async def run(self) -> None:
        while True:
            await self.scan_once()
            await asyncio.sleep(SCAN_INTERVAL)


async def websocket_events(request: web.Request) -> web.WebSocketResponse:
    run_id = request.match_info.get("run_id")
    bus: EventBus = request.app["bus"]
    q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    bus.subscribers.add(q)  # before the handshake completes: the client's first event is not missed
    ws = web.WebSocketResponse()
    try:
        await ws.prepare(request)
        async for event in bus.subscribe(q):
            if run_id is None or event.get("run_id") == run_id:
                await ws.send_json(event)
    except ConnectionError:
        pass  # the client left; its queue is gone with the subscription
    finally:
        bus.subscribers.discard(q)
    return ws


async def _monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(Monitor(app["events_dir"], app["bus"]).run())
    task.add_done_callback(_stop_on_failure)
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def _stop_on_failure(task: asyncio.Task[None]) -> None:
    """A monitor that dies takes the backend with it (loudly), rather than leaving it silent."""
    if not task.cancelled() and task.exception() is not None:
        log.error("monitor failed", exc_info=task.exception())
        asyncio.get_running_loop().stop()


def make_app(events_dir: Path) -> web.Application:
    app = web.Application()
    app["events_dir"] = events_dir
    app["bus"] = EventBus()
    app.router.add_get("/ws/events", websocket_events)
    app.router.add_get("/ws/events/{run_id}", websocket_events)
    app.cleanup_ctx.append(_monitor_ctx)
    return app


async def main(events_dir: Path, port: int) -> None:
    runner = web.AppRunner(make_app(events_dir))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
