"""The building blocks alone, as the gateway's latency reference: a ZeroMQ SUB socket (zmq.asyncio) whose
events are decoded, JSON-encoded and sent as one WebSocket frame per wake-up (aiohttp) to every client
connected to /ws/events/{anything}. No journal, run index, gap filling, queues, checks or metrics.

bench_gateway runs it beside the gateway and measures both the same way, interleaved, so the gateway's
latency can be read against what the machine gives the bare pipeline at the same moment.

    python bench/reference_forwarder.py SUB_ENDPOINT HTTP_PORT     (prints "ready" once listening)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.events import msgpack_decoder  # noqa: E402
from shared.wire import EVENT_TOPIC_PREFIX  # noqa: E402

_encode = msgspec.json.Encoder().encode
CLIENTS: set[web.WebSocketResponse] = set()


async def events(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    CLIENTS.add(ws)
    try:
        async for _ in ws:
            pass
    finally:
        CLIENTS.discard(ws)
    return ws


async def forward(endpoint: str) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.connect(endpoint)
    sock.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC_PREFIX)
    while True:
        msgs = [await sock.recv_multipart()]
        while True:  # what is already queued goes in the same frame
            try:
                msgs.append(await sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        parts = [_encode(msgpack_decoder.decode(payload)) for _topic, payload in msgs]
        frame = b'{"type":"events","events":[' + b",".join(parts) + b'],"cursor":""}'
        for ws in list(CLIENTS):
            await ws.send_frame(frame, WSMsgType.TEXT)


async def main(endpoint: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/ws/events/{run_id}", events)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await forward(endpoint)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
