"""A Redis pub/sub -> aiohttp WebSocket gateway, the end-to-end benchmark's second baseline: one
redis-py (asyncio) subscription to the channel `events`; each message is sent as it came, one text
frame per event, to every client of `/ws/events`, one client after the other. It keeps nothing, so it
has no replay, no cursor and no resume: a client gets what is published while it is connected.

When Redis drops the subscription (its `client-output-buffer-limit pubsub` closes a subscriber that
falls behind), the gateway logs it, counts it and subscribes again: what was published meanwhile is lost,
which the benchmark's clients see as seq gaps.

    python -m bench.baselines.redis_gateway REDIS_PORT HTTP_PORT     (prints "ready" once listening)
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

import redis.asyncio as redis
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)
CHANNEL = "events"


async def websocket_events(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    clients: set[web.WebSocketResponse] = request.app["clients"]
    clients.add(ws)
    try:
        async for _ in ws:
            pass
    finally:
        clients.discard(ws)
    return ws


async def forward(app: web.Application) -> None:
    clients: set[web.WebSocketResponse] = app["clients"]
    r = redis.Redis(host="127.0.0.1", port=app["redis_port"])
    try:
        while True:
            pubsub = r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    text = message["data"].decode()
                    for ws in list(clients):
                        try:
                            await ws.send_str(text)
                        except ConnectionError:
                            clients.discard(ws)
            except RedisConnectionError as e:
                app["resubscribed"] += 1
                log.warning("redis dropped the subscription (%s): subscribing again; events meanwhile are lost", e)
            finally:
                await pubsub.aclose()
    finally:
        await r.aclose()


def _stop_on_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("forwarder failed", exc_info=task.exception())
        asyncio.get_running_loop().stop()


async def _forward_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(forward(app))
    task.add_done_callback(_stop_on_failure)
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def make_app(redis_port: int) -> web.Application:
    app = web.Application()
    app["redis_port"] = redis_port
    app["clients"] = set()
    app["resubscribed"] = 0
    app.router.add_get("/ws/events", websocket_events)
    app.cleanup_ctx.append(_forward_ctx)
    return app


async def main(redis_port: int, port: int) -> None:
    runner = web.AppRunner(make_app(redis_port))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
