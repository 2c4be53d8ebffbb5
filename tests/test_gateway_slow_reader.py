"""A client that reads, but slower than events come, is closed with 4008 and sees the 4008: the close
frame waits behind what is still buffered for it as long as it keeps reading (issue 11, defect 12)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import anyio
import pytest

from tests.test_gateway_helpers import FakePublisher, make_settings, running_gateway

READ_RATE = 400_000  # bytes per second the slow client takes: several MB buffered take longer than 5 s


@pytest.mark.timeout(90)  # the close waits while the slow peer keeps taking bytes (about 25 s here)
async def test_a_slow_reader_is_closed_4008_and_receives_the_close(tmp_path: Path) -> None:
    settings, ports = make_settings(
        tmp_path, gateway="client_queue_events = 200\nclient_queue_bytes = 1000000\nsend_timeout = 2.0"
    )
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            run_id = pub.begin()
            ws = await http.ws_connect(f"{gw.ws}/ws/events/{run_id}?after_seq=0", max_msg_size=64 * 1024 * 1024)
            received = 0

            async def read_slowly() -> None:
                nonlocal received
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        received += len(msg.data)
                        await anyio.sleep(len(msg.data) / READ_RATE)

            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_slowly)
                    await anyio.sleep(0.3)
                    pub.emit(run_id, "pipeline", "start", "s")
                    big = "x" * 8000
                    for i in range(3000):
                        pub.emit(run_id, "nap", "log", big, {"i": i})
                        if i % 100 == 0:
                            await anyio.sleep(0.01)
                    pub.emit(run_id, "pipeline", "success", "done")
            assert gw.stats.slow_consumer_closes == 1
            # it was behind by more than it could read in the 5 s a silent peer is given
            assert received > 5 * READ_RATE, received
            assert ws.close_code == 4008, ws.close_code
    finally:
        pub.close()
