"""Exactly-once delivery when the hub paces frames on its shared tick (the many-clients path: events
wait a few ms in the hub, then go out as one batch whose frame every caught-up client shares), and
the send timeout kept by the hub's watchdog. The real gateway app in-process on a real port, real
ZeroMQ, real WebSocket clients; `pacing_from = 1` turns ticks on for a handful of clients. The
publisher is the test-side `FakePublisher` (journal first, then PUB, per the wire contract).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

import gateway_svc.fanout
from gateway_svc.cursor import decode_cursor
from gateway_svc.fanout import MAX_FRAME_INTERVAL
from gateway_svc.keys import HUB
from tests.test_gateway_helpers import FakePublisher, collect, journal_of, make_settings, running_gateway


def _ticks_on(gw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gw.app[HUB].pacing_from = 1
    # full-length ticks with a handful of clients, so events are often waiting in the hub when a
    # client registers or ends its replay
    monkeypatch.setattr(gateway_svc.fanout, "FRAME_INTERVAL_PER_CLIENT", MAX_FRAME_INTERVAL)


async def test_ticked_run_and_all_runs_clients_resuming_get_exactly_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, ports = make_settings(tmp_path)
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    rng = random.Random(11)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            _ticks_on(gw, monkeypatch)
            # an all-runs client from before the run: it must get the whole run, once, in order
            watcher = await http.ws_connect(f"{gw.ws}/ws/events", max_msg_size=64 * 1024 * 1024)
            hello = await watcher.receive_json()
            assert hello["type"] == "hello" and hello["recovered"] is True
            cursor = hello["cursor"]
            run_id = pub.begin()
            per_run: list[dict[str, Any]] = []
            resumed: list[dict[str, Any]] = []
            joiners: list[tuple[int, list[dict[str, Any]]]] = []  # (seq at hello, what came after)

            async def produce() -> None:
                pub.emit(run_id, "pipeline", "start", "started", {"runner": pub.runner_id, "attempt": 1, "pid": 1})
                for i in range(600):
                    pub.emit(run_id, "nap", "log", f"line {i}", {"i": i})
                    if i % 3 == 0:
                        await anyio.sleep(0.002)
                pub.emit(run_id, "pipeline", "success", "done")

            async def follow_run() -> None:
                after = 0
                while True:
                    got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq={after}",
                                        max_frames=rng.randint(2, 5))
                    assert got.frames[0]["recovered"] is True
                    per_run.extend(got.events)
                    if got.events:
                        after = got.events[-1]["seq"]
                        assert got.last_cursor == str(after)
                    if got.close_code == 1000:
                        return

            def ended(events: list[dict[str, Any]]) -> bool:
                return any(e["event"] == "success" and e["stage"] == "pipeline" for e in events)

            async def follow_all() -> None:
                nonlocal cursor
                while not ended(resumed):
                    frames = rng.randint(2, 4)
                    got = await collect(http, f"{gw.ws}/ws/events?cursor={cursor}",
                                        until=lambda c, frames=frames: len(c.frames) >= frames or ended(c.events))
                    assert got.frames[0]["recovered"] is True, got.frames[0]
                    resumed.extend(got.events)
                    cursor = got.last_cursor

            async def join_fresh() -> None:
                """All-runs clients without a cursor, joining mid-run: each gets what follows its hello."""
                tag = gw.app[HUB].tag
                while not ended(per_run):
                    frames = rng.randint(2, 4)
                    events: list[dict[str, Any]] = []
                    async with http.ws_connect(f"{gw.ws}/ws/events", max_msg_size=64 * 1024 * 1024) as ws:
                        hello = await ws.receive_json()
                        start = decode_cursor(hello["cursor"], tag).p.get(run_id, 0)
                        with anyio.move_on_after(1.0):  # a client joining at the very end gets nothing more
                            for _ in range(frames):
                                events.extend((await ws.receive_json())["events"])
                    joiners.append((start, events))
                    await anyio.sleep(rng.random() * 0.02)

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                tg.start_soon(follow_run)
                tg.start_soon(follow_all)
                tg.start_soon(join_fresh)
            watched: list[dict[str, Any]] = []
            with anyio.fail_after(20):
                while not ended(watched):
                    frame = await watcher.receive_json()
                    assert frame["type"] == "events"
                    watched.extend(frame["events"])
            await watcher.close()
            journal = journal_of(settings, run_id)
            assert per_run == journal
            assert resumed == journal
            assert watched == journal
            assert len(joiners) > 3
            for start, events in joiners:
                assert events == journal[start : start + len(events)], f"a client that joined at seq {start}"
    finally:
        pub.close()


async def test_a_send_stuck_longer_than_send_timeout_closes_4008(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A client that reads nothing, with queue limits too large to be reached: the send blocks once the
    socket buffers are full, and the watchdog ends it after send_timeout."""
    settings, ports = make_settings(
        tmp_path, gateway="client_queue_events = 1000000\nclient_queue_bytes = 1073741824\nsend_timeout = 1.0"
    )
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    caplog.set_level(logging.INFO, logger="gateway_svc.live")
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            run_id = pub.begin()
            stuck = await http.ws_connect(f"{gw.ws}/ws/events/{run_id}?after_seq=0", max_msg_size=1 << 30)
            await anyio.sleep(0.2)
            big = "x" * 8000
            pub.emit(run_id, "pipeline", "start", "s")
            with anyio.fail_after(60):
                i = 0
                while gw.stats.slow_consumer_closes == 0:
                    for _ in range(50):
                        pub.emit(run_id, "nap", "log", big, {"i": i})
                        i += 1
                    await anyio.sleep(0.01)
            assert any("a send took longer than 1s" in r.getMessage() for r in caplog.records)
            with anyio.fail_after(30):
                async for _msg in stuck:
                    pass
            assert stuck.close_code == 4008
    finally:
        pub.close()
