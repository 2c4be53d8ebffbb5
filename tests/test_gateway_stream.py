"""Exactly-once delivery through the real gateway (in-process app on a real port, real ZeroMQ, real
WebSocket/SSE clients): resumes mid-run, a gateway restart, a publisher that drops messages and loses a
tail, a slow client. The publisher is the test-side `FakePublisher` (journal first, then PUB, per the
wire contract), standing in for the runner and scheduler being built in parallel.

Every check compares what a client was delivered, over all its connections, with the journal: same
events, same order, no gap, no duplicate.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel

from gateway_svc.cursor import decode_cursor, encode_cursor
from gateway_svc.keys import HUB, INDEX
from shared.ids import new_run_id
from tests.harness import free_port
from tests.test_gateway_helpers import (
    Collected,
    FakePublisher,
    collect,
    journal_of,
    make_settings,
    running_gateway,
)


def _publisher(settings: Any, ports: Any) -> FakePublisher:
    return FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")


async def _produce(pub: FakePublisher, run_id: str, n: int, pause: float = 0.002, end: bool = True) -> None:
    pub.emit(run_id, "pipeline", "start", "started", {"runner": pub.runner_id, "attempt": 1, "pid": 1})
    for i in range(n):
        pub.emit(run_id, "nap", "log", f"line {i}", {"i": i})
        if pause:
            await anyio.sleep(pause)
    if end:
        pub.emit(run_id, "pipeline", "success", "done")


def _by_run(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        out.setdefault(ev["run_id"], []).append(ev)
    return out


async def test_run_stream_resumed_many_times_mid_run_equals_the_journal(tmp_path: Path) -> None:
    settings, ports = make_settings(tmp_path)
    pub = _publisher(settings, ports)
    rng = random.Random(7)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            run_id = pub.begin()
            delivered: list[dict[str, Any]] = []
            connections = 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(_produce, pub, run_id, 400)
                after = 0
                while True:
                    connections += 1
                    got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq={after}",
                                        max_frames=rng.randint(2, 6))
                    assert got.frames[0]["type"] == "hello" and got.frames[0]["recovered"] is True
                    assert got.frames[0]["cursor"] == str(after)
                    delivered.extend(got.events)
                    if got.events:
                        after = got.events[-1]["seq"]
                        assert got.last_cursor == str(after)
                    if got.close_code == 1000:
                        break
            assert connections > 3
            assert delivered == journal_of(settings, run_id)
            assert delivered[-1]["event"] == "success"
    finally:
        pub.close()


async def test_all_runs_stream_survives_gateway_restart_with_cursor(tmp_path: Path) -> None:
    """A client follows all runs, disconnects, the gateway restarts while run A goes on and run B
    starts (B's id sorts BELOW A's: created later by another id generator); resuming with the cursor
    yields exactly the rest of A and all of B."""
    settings, ports = make_settings(tmp_path)
    pub = _publisher(settings, ports)
    try:
        delivered: list[dict[str, Any]] = []
        run_a = new_run_id()
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            hello = await collect(http, f"{gw.ws}/ws/events", max_frames=1)
            cursor = hello.frames[0]["cursor"]
            assert hello.frames[0]["recovered"] is True
            pub.begin(run_a)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_produce, pub, run_a, 100, 0.002, False)
                for _ in range(3):  # resume a few times while A runs
                    got = await collect(http, f"{gw.ws}/ws/events?cursor={cursor}", max_frames=3)
                    assert got.frames[0]["recovered"] is True, got.frames[0]
                    delivered.extend(got.events)
                    cursor = got.last_cursor
        # gateway down: A continues, B (smaller id, created later) runs and ends, A ends
        for i in range(50):
            pub.emit(run_a, "nap", "log", f"while down {i}")
        run_b = "0-another-generator-" + new_run_id()
        assert run_b < run_a
        pub.begin(run_b)
        pub.emit(run_b, "pipeline", "start", "started")
        pub.emit(run_b, "nap", "log", "b working")
        pub.emit(run_b, "pipeline", "success", "b done")
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            async with anyio.create_task_group() as tg:
                async def finish_a() -> None:
                    await anyio.sleep(0.3)
                    for i in range(30):
                        pub.emit(run_a, "nap", "log", f"after restart {i}")
                        await anyio.sleep(0.005)
                    pub.emit(run_a, "pipeline", "success", "a done")

                tg.start_soon(finish_a)
                ended: set[str] = set()
                def both_ended(c: Collected) -> bool:  # under load, the last events may come in fewer frames
                    return ended | {e["run_id"] for e in c.events if e["event"] == "success"} == {run_a, run_b}

                while ended != {run_a, run_b}:
                    got = await collect(http, f"{gw.ws}/ws/events?cursor={cursor}", max_frames=4, until=both_ended)
                    assert got.frames[0]["recovered"] is True, got.frames[0]
                    delivered.extend(got.events)
                    ended |= {e["run_id"] for e in got.events if e["stage"] == "pipeline" and e["event"] == "success"}
                    cursor = got.last_cursor
        runs = _by_run(delivered)
        assert set(runs) == {run_a, run_b}
        assert runs[run_a] == journal_of(settings, run_a)
        assert runs[run_b] == journal_of(settings, run_b)
        # and a client resuming with the final cursor gets nothing more (both runs done)
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            got = await _collect_for(http, f"{gw.ws}/ws/events?cursor={cursor}", 0.5)
            assert got.frames[0]["recovered"] is True
            assert got.events == []
    finally:
        pub.close()


async def _collect_for(http: aiohttp.ClientSession, url: str, seconds: float) -> Collected:
    got = Collected()
    async with http.ws_connect(url) as ws:
        with anyio.move_on_after(seconds):
            async for msg in ws:
                got.frames.append(json.loads(msg.data))
    return got


async def test_publisher_drops_and_lost_tail_are_filled_from_the_journal(tmp_path: Path) -> None:
    """Every 7th message is lost on the wire, and so is the tail of the run: the heartbeat (which
    claims the run all along, so the journal sweep leaves it alone) is the only sign of the tail."""
    settings, ports = make_settings(tmp_path)
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            await anyio.sleep(0.3)  # past the slow-joiner window: the losses below are all on purpose
            tail_from = 200
            pub.drop = lambda ev: ev.seq % 7 == 0 or ev.seq >= tail_from
            live_all: list[dict[str, Any]] = []
            run_id = new_run_id()

            async def all_runs_client() -> None:
                got = await collect(http, f"{gw.ws}/ws/events",
                                    until=lambda c: any(e["event"] == "success" for e in c.events), timeout=30)
                live_all.extend(got.events)

            async def produce_and_heartbeat() -> None:
                await anyio.sleep(0.3)
                pub.begin(run_id)
                pub.heartbeat()
                pub.emit(run_id, "pipeline", "start", "started")
                for i in range(tail_from + 10):  # the last 10+ are lost on the wire
                    pub.emit(run_id, "nap", "log", f"line {i}")
                    if i % 50 == 0:
                        pub.heartbeat()
                    await anyio.sleep(0.001)
                last = pub.writers[run_id].last_seq
                with anyio.fail_after(10):
                    while gw.app[INDEX].get(run_id).frontier < last:
                        pub.heartbeat()  # only the heartbeat tells the gateway that seq `last` exists
                        await anyio.sleep(0.2)
                pub.drop = lambda ev: False
                pub.emit(run_id, "pipeline", "success", "done")

            async with anyio.create_task_group() as tg:
                tg.start_soon(all_runs_client)
                tg.start_soon(produce_and_heartbeat)
            journal = journal_of(settings, run_id)
            assert len(pub.dropped) > 30
            assert [e for e in live_all if e["run_id"] == run_id] == journal
            stats = gw.stats
            # every dropped event reached the client from the journal (one fill may cover several
            # drops when the journal is ahead, so count events, not fills)
            assert stats.gaps_filled >= 1 and stats.gap_events_filled >= len(pub.dropped)
            assert stats.lost_tails_filled >= 1
            assert stats.gap_events_unfilled == 0
    finally:
        pub.close()


async def test_a_run_whose_messages_come_from_two_publishers_is_joined_in_order(tmp_path: Path) -> None:
    """The scheduler publishes `queued` (seq 1) and the runner the rest; the runner's events may
    arrive first (another socket): the gateway takes seq 1 from the journal, drops the late copy."""
    settings, ports = make_settings(tmp_path)
    runner = _publisher(settings, ports)
    scheduler = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.scheduler_publish}", "scheduler", "scheduler")
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            await anyio.sleep(0.3)
            async with anyio.create_task_group() as tg:
                async def client() -> None:
                    got = await collect(http, f"{gw.ws}/ws/events", until=lambda c: any(
                        e["stage"] == "pipeline" and e["event"] == "success" for e in c.events))
                    assert [e["seq"] for e in got.events] == list(range(1, 6))
                    assert got.events == journal_of(settings, run_id)
                tg.start_soon(client)
                await anyio.sleep(0.3)
                scheduler.drop = lambda ev: True  # hold back queued...
                run_id = scheduler.begin()
                runner.writers[run_id] = scheduler.writers.pop(run_id)
                runner.emit(run_id, "pipeline", "start", "s")
                runner.emit(run_id, "nap", "start", "")
                runner.emit(run_id, "nap", "success", "")
                # the late copy must arrive after the gateway took seq 1 from the journal (the two
                # sockets do not order between them), or there is no duplicate to drop
                with anyio.fail_after(10):
                    while gw.stats.events_in < 3:
                        await anyio.sleep(0.01)
                scheduler.drop = lambda ev: False
                scheduler.publish(scheduler.dropped[0])  # ...and send it late
                await anyio.sleep(0.2)
                runner.emit(run_id, "pipeline", "success", "done")
            assert gw.stats.duplicates_dropped >= 1
    finally:
        runner.close()
        scheduler.close()


async def test_slow_client_is_closed_4008_while_a_fast_one_gets_everything(tmp_path: Path) -> None:
    settings, ports = make_settings(
        tmp_path, gateway="client_queue_events = 1000\nclient_queue_bytes = 2000000\nsend_timeout = 2.0"
    )
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            run_id = pub.begin()
            slow = await http.ws_connect(f"{gw.ws}/ws/events/{run_id}?after_seq=0")
            fast_events: list[dict[str, Any]] = []
            big = "x" * 4000
            async with anyio.create_task_group() as tg:
                async def fast() -> None:
                    got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=0", timeout=60)
                    fast_events.extend(got.events)
                    assert got.close_code == 1000

                tg.start_soon(fast)
                await anyio.sleep(0.3)
                pub.emit(run_id, "pipeline", "start", "s")
                for i in range(4000):
                    pub.emit(run_id, "nap", "log", big, {"i": i})
                    if i % 50 == 0:
                        await anyio.sleep(0.005)
                pub.emit(run_id, "pipeline", "success", "done")
            assert fast_events == journal_of(settings, run_id)
            with anyio.fail_after(30):
                async for _msg in slow:
                    pass
            assert slow.close_code == 4008
            assert gw.stats.slow_consumer_closes == 1
            await slow.close()
    finally:
        pub.close()


async def test_a_client_that_stalls_and_reads_again_gets_everything_in_order(tmp_path: Path) -> None:
    """The hub writes a caught-up client's frames straight to its connection while the connection takes
    them at once; a client that stops reading makes the kernel buffers fill, its frames then wait in
    its queue, and when it reads again it gets the queued ones and then direct ones again, in order."""
    settings, ports = make_settings(
        tmp_path, gateway="client_queue_events = 100000\nclient_queue_bytes = 100000000\nsend_timeout = 30.0"
    )
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            run_id = pub.begin()
            frames: list[dict[str, Any]] = []
            async with http.ws_connect(f"{gw.ws}/ws/events/{run_id}?after_seq=0", max_msg_size=1 << 26) as ws:
                frames.append(await ws.receive_json(timeout=10))  # hello
                big = "y" * 8000
                pub.emit(run_id, "pipeline", "start", "s")
                for i in range(1500):  # 12 MB while the client reads nothing
                    pub.emit(run_id, "nap", "log", big, {"i": i})
                    if i % 100 == 0:
                        await anyio.sleep(0.01)
                with anyio.fail_after(20):
                    while gw.stats.events_out < 5:
                        await anyio.sleep(0.05)
                queued_before = gw.stats.frames_out - gw.stats.frames_direct
                async def drain() -> None:
                    async for msg in ws:
                        frames.append(json.loads(msg.data))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain)
                    await anyio.sleep(0.5)
                    direct_before = gw.stats.frames_direct
                    for i in range(200):
                        pub.emit(run_id, "nap", "log", "after", {"i": 1500 + i})
                        await anyio.sleep(0.002)
                    pub.emit(run_id, "pipeline", "success", "done")
                assert ws.close_code == 1000
            events = [e for f in frames if f["type"] == "events" for e in f["events"]]
            assert events == journal_of(settings, run_id)
            assert queued_before > 0, "the stalled client's frames should have waited in its queue"
            assert gw.stats.frames_direct > direct_before, "once caught up, frames should go out directly again"
            assert gw.stats.slow_consumer_closes == 0
            async with http.get(gw.base + "/metrics") as resp:
                metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in (await resp.text()).splitlines()
                           if line and not line.startswith("#")}
            assert metrics["runwire_gateway_frames_direct_total"] == gw.stats.frames_direct
            assert metrics["runwire_gateway_fanout_seconds_count"] > 0
            assert metrics['runwire_gateway_fanout_seconds_bucket{le="+Inf"}'] == metrics["runwire_gateway_fanout_seconds_count"]
    finally:
        pub.close()


async def _sse_read(http: aiohttp.ClientSession, url: str, headers: dict[str, str], frames: int,
                    window: float = 2.0) -> list[tuple[str | None, dict[str, Any]]]:
    """Up to `frames` SSE messages (id, data) read within `window` seconds; then disconnect."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        ident: str | None = None
        with anyio.move_on_after(window):
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    ident = line[4:]
                elif line.startswith("data: "):
                    out.append((ident, json.loads(line[6:])))
                    ident = None
                    if len(out) >= frames:
                        break
    return out


async def test_sse_resumes_with_last_event_id(tmp_path: Path) -> None:
    settings, ports = make_settings(tmp_path)
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            first = await _sse_read(http, f"{gw.base}/api/events", {}, 1)
            cursor, hello = first[0]
            assert hello["type"] == "hello" and hello["recovered"] is True and cursor == hello["cursor"]
            run_id = pub.begin()
            delivered: list[dict[str, Any]] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(_produce, pub, run_id, 300, 0.002)
                while not any(e["stage"] == "pipeline" and e["event"] == "success" for e in delivered):
                    msgs = await _sse_read(http, f"{gw.base}/api/events", {"Last-Event-ID": cursor}, 3)
                    assert msgs[0][1]["type"] == "hello" and msgs[0][1]["recovered"] is True
                    for ident, frame in msgs[1:]:
                        assert frame["type"] == "events" and ident == frame["cursor"]
                        delivered.extend(frame["events"])
                        cursor = ident
            assert delivered == journal_of(settings, run_id)
            # the query form works too, and a bad cursor is said out loud
            msgs = await _sse_read(http, f"{gw.base}/api/events?last_event_id=garbage", {}, 1)
            assert msgs[0][1]["recovered"] is False and "undecodable" in msgs[0][1]["reason"]
    finally:
        pub.close()


async def test_cursor_from_another_journal_directory_is_not_recovered(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    settings, _ = make_settings(tmp_path / "one")
    other, _ = make_settings(tmp_path / "two")
    async with running_gateway(other, port=free_port()) as gw, aiohttp.ClientSession() as http:
        got = await collect(http, f"{gw.ws}/ws/events", max_frames=1)
        foreign = got.frames[0]["cursor"]
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        got = await collect(http, f"{gw.ws}/ws/events?cursor={foreign}", max_frames=1)
        assert got.frames[0]["recovered"] is False
        assert "another journal directory" in got.frames[0]["reason"]
        assert gw.stats.unrecovered_resumes == 1


async def test_unknown_run_gets_error_frame_and_4004(tmp_path: Path) -> None:
    settings, _ = make_settings(tmp_path)
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        got = await collect(http, f"{gw.ws}/ws/events/{new_run_id()}")
        assert got.frames[-1]["type"] == "error" and got.frames[-1]["code"] == "unknown_run"
        assert got.close_code == 4004


async def test_run_created_just_after_connect_is_waited_for(tmp_path: Path) -> None:
    settings, ports = make_settings(tmp_path)
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            run_id = new_run_id()
            async with anyio.create_task_group() as tg:
                async def later() -> None:
                    await anyio.sleep(0.5)
                    pub.begin(run_id)
                    await _produce(pub, run_id, 5, pause=0)
                tg.start_soon(later)
                got = await collect(http, f"{gw.ws}/ws/events/{run_id}")
            assert got.close_code == 1000
            assert got.events == journal_of(settings, run_id)
    finally:
        pub.close()


async def test_replay_of_a_long_run_under_a_live_flood_catches_up_from_the_journal(tmp_path: Path) -> None:
    """A client replays a long run while live events pour in faster than its small queue holds: the
    live buffer is dropped and the client catches up from the journal (no 4008 for replaying), and
    a client resuming after any close still gets each event exactly once."""
    settings, ports = make_settings(tmp_path, gateway="client_queue_events = 50\nclient_queue_bytes = 100000")
    pub = _publisher(settings, ports)
    try:
        run_id = pub.begin()
        pub.emit(run_id, "pipeline", "start", "s")
        for i in range(30_000):  # journaled before the gateway starts
            pub.emit(run_id, "nap", "log", f"early {i}")
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            delivered: list[dict[str, Any]] = []

            async def flood() -> None:
                for i in range(3_000):
                    pub.emit(run_id, "nap", "log", f"live {i}")
                    if i % 20 == 0:
                        await anyio.lowlevel.checkpoint()
                pub.emit(run_id, "pipeline", "success", "done")

            async with anyio.create_task_group() as tg:
                after = 0
                tg.start_soon(flood)
                while True:
                    got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq={after}", timeout=60)
                    delivered.extend(got.events)
                    if got.events:
                        after = got.events[-1]["seq"]
                    if got.close_code == 1000:
                        break
                    assert got.close_code == 4008, got.close_code
            assert delivered == journal_of(settings, run_id)
            assert gw.stats.replay_overflows >= 1
    finally:
        pub.close()


async def test_all_runs_resume_under_a_live_flood_catches_up_from_the_journal(tmp_path: Path) -> None:
    """The same on the all-runs stream: a cursor from before two long runs, resumed while they flood."""
    settings, ports = make_settings(tmp_path, gateway="client_queue_events = 50\nclient_queue_bytes = 100000")
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            cursor = (await collect(http, f"{gw.ws}/ws/events", max_frames=1)).frames[0]["cursor"]
        runs = [pub.begin(), pub.begin()]
        for run_id in runs:
            pub.emit(run_id, "pipeline", "start", "s")
            for i in range(15_000):
                pub.emit(run_id, "nap", "log", f"early {i}")
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            delivered: list[dict[str, Any]] = []

            async def flood() -> None:
                for i in range(2_000):
                    for run_id in runs:
                        pub.emit(run_id, "nap", "log", f"live {i}")
                    if i % 10 == 0:
                        await anyio.lowlevel.checkpoint()
                for run_id in runs:
                    pub.emit(run_id, "pipeline", "success", "done")

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                ended: set[str] = set()
                while ended != set(runs):
                    got = await collect(http, f"{gw.ws}/ws/events?cursor={cursor}", timeout=60,
                                        until=lambda c: len({e["run_id"] for e in c.events if e["event"] == "success"}) == 2)
                    assert got.frames[0]["recovered"] is True
                    delivered.extend(got.events)
                    ended |= {e["run_id"] for e in got.events if e["event"] == "success"}
                    cursor = got.last_cursor or cursor
            by_run = _by_run(delivered)
            assert set(by_run) == set(runs)
            for run_id in runs:
                assert by_run[run_id] == journal_of(settings, run_id)
            assert gw.stats.replay_overflows >= 1
    finally:
        pub.close()


async def test_a_run_known_from_a_publisher_whose_journal_is_elsewhere_is_refused_loudly(tmp_path: Path) -> None:
    """The runner writes journals to another directory than the gateway reads (seed 000): the gateway
    learns the run from PUB events and heartbeats, but cannot replay it. A client asking for it gets
    an error frame `journal_missing` naming the missing file and the mismatch, and close 4004 (it used
    to get hello recovered=true and then wait forever)."""
    settings, ports = make_settings(tmp_path)
    elsewhere = tmp_path / "runner-home" / "events"
    elsewhere.mkdir(parents=True)
    pub = FakePublisher(elsewhere, f"tcp://127.0.0.1:{ports.publish}", runner_id="r-elsewhere")
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            await anyio.sleep(0.3)  # past the slow-joiner window
            run_id = pub.begin()
            await _produce(pub, run_id, 3, pause=0)
            last = 6
            with anyio.fail_after(10):
                while (entry := gw.app[INDEX].get(run_id)) is None or entry.frontier < last:
                    pub.heartbeat({run_id: last})  # ended runs stay listed for a while
                    await anyio.sleep(0.1)
            got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=0", timeout=10)
            assert got.close_code == 4004, got
            error = got.frames[-1]
            assert error["type"] == "error" and error["code"] == "journal_missing"
            assert str(settings.journal_dir / f"pipeline_{run_id}.jsonl") in error["message"]
            assert "MISMATCH" in error["message"] and str(elsewhere) in error["message"]
            assert "r-elsewhere" in error["message"]
            assert all(f["type"] != "hello" for f in got.frames)
            # an all-runs resume that names the run says it cannot be served
            cursor = (await collect(http, f"{gw.ws}/ws/events", max_frames=1)).frames[0]["cursor"]
            cur = decode_cursor(cursor, gw.app[HUB].tag)
            named = encode_cursor(cur.j, cur.t, {run_id: 2}, [])
            hello = (await collect(http, f"{gw.ws}/ws/events?cursor={named}", max_frames=1)).frames[0]
            assert hello["recovered"] is False and "does not exist" in hello["reason"]
    finally:
        pub.close()


def _corrupt_line(path: Path, seq: int) -> None:
    """Overwrite the journal line of `seq` in place with garbage of the same length (as QA did)."""
    with open(path, "r+b") as f:
        offset = 0
        for line in f.read().split(b"\n"):
            if line and json.loads(line)["seq"] == seq:
                f.seek(offset)
                f.write(b"#" * len(line))
                return
            offset += len(line) + 1
    raise AssertionError(f"no seq {seq} in {path}")


def _flow(frames: list[dict[str, Any]]) -> list[Any]:
    """What a client met after the hello, in order: seqs, and ("gap", N, M) for journal_gap frames."""
    out: list[Any] = []
    for f in frames[1:]:
        if f["type"] == "events":
            out.extend(e["seq"] for e in f["events"])
        else:
            assert f["type"] == "error" and f["code"] == "journal_gap", f
            out.append(("gap", *f["missing"]))
    return out


def _ended(c: Collected) -> bool:
    return any(e["stage"] == "pipeline" and e["event"] == "success" for e in c.events)


async def _sse_until_end(http: aiohttp.ClientSession, url: str) -> list[tuple[str, dict[str, Any]]]:
    """SSE messages as (event name, data) until the run's success event."""
    out: list[tuple[str, dict[str, Any]]] = []
    with anyio.fail_after(20):
        async with http.get(url) as resp:
            name = "message"
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    out.append((name, data))
                    name = "message"
                    if data.get("type") == "events" and any(e["event"] == "success" for e in data["events"]):
                        return out
    return out


async def test_a_corrupt_journal_line_is_reported_as_journal_gap_never_skipped_silently(tmp_path: Path) -> None:
    """QA's case: seq 5 of a finished journal overwritten with garbage. Replays (one run, all runs,
    SSE) send a `journal_gap` error frame where seq 5 would be and go on; once the gateway knows the
    hole, a hello before it says recovered=false; the events API lists the hole in `gaps`."""
    settings, ports = make_settings(tmp_path)
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            old_cursor = (await collect(http, f"{gw.ws}/ws/events", max_frames=1)).frames[0]["cursor"]
        run_id = pub.begin()
        await _produce(pub, run_id, 8, pause=0)  # seqs 1..11
        path = settings.journal_dir / f"pipeline_{run_id}.jsonl"
        _corrupt_line(path, 5)
        want = [4, ("gap", 5, 5), 6, 7, 8, 9, 10, 11]
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=3")
            assert got.close_code == 1000  # the stream went on after the hole, to the end of the run
            assert _flow(got.frames) == want
            gap = next(f for f in got.frames if f["type"] == "error")
            assert gap == {"type": "error", "code": "journal_gap", "run_id": run_id, "missing": [5, 5],
                           "message": f"events 5..5 of run {run_id} are missing from the journal {path} "
                                      "(corrupt line skipped; see the gateway log)"}
            # the gateway knows the hole now: a hello before it is not "recovered"
            got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=3")
            assert got.frames[0]["recovered"] is False and "5..5" in got.frames[0]["reason"]
            assert _flow(got.frames) == want and got.close_code == 1000
            # resuming past the hole (the cursor after it) is exact again
            got = await collect(http, f"{gw.ws}/ws/events/{run_id}?after_seq=5")
            assert got.frames[0]["recovered"] is True and _flow(got.frames) == [6, 7, 8, 9, 10, 11]
            # the events API
            async with http.get(f"{gw.base}/api/runs/{run_id}/events?after_seq=3") as resp:
                page = json.loads(await resp.text())
            assert [e["seq"] for e in page["events"]] == [4, 6, 7, 8, 9, 10, 11]
            assert page["gaps"] == [[5, 5]] and page["more"] is False and page["next_after_seq"] == 11
            async with http.get(f"{gw.base}/api/runs/{run_id}/events?after_seq=0&limit=3") as resp:
                page = json.loads(await resp.text())
            assert [e["seq"] for e in page["events"]] == [1, 2, 3] and page["gaps"] == []
            async with http.get(f"{gw.base}/api/runs/{run_id}/events?after_seq=4&limit=1") as resp:
                page = json.loads(await resp.text())
            assert [e["seq"] for e in page["events"]] == [6] and page["gaps"] == [[5, 5]]
            # all runs, resumed from a cursor older than the run
            got = await collect(http, f"{gw.ws}/ws/events?cursor={old_cursor}", until=_ended)
            assert got.frames[0]["recovered"] is False and "5..5" in got.frames[0]["reason"]
            assert _flow(got.frames) == [1, 2, 3, *want]
            # SSE: an `event: error` message with the same data, and the stream goes on
            msgs = await _sse_until_end(http, f"{gw.base}/api/events?last_event_id={old_cursor}")
            assert msgs[0][1]["type"] == "hello"
            errors = [data for name, data in msgs if name == "error"]
            assert [e["missing"] for e in errors] == [[5, 5]] and errors[0]["code"] == "journal_gap"
            assert _flow([m[1] for m in msgs]) == [1, 2, 3, *want]
            assert gw.stats.journal_gaps == 1  # one hole, however many clients were told
            async with http.get(gw.base + "/metrics") as resp:
                assert "runwire_gateway_journal_gaps_total 1.0" in await resp.text()
    finally:
        pub.close()


async def test_a_hole_on_the_live_path_is_told_to_live_clients_in_order(tmp_path: Path) -> None:
    """Seq 5 is lost on the wire and its journal line is corrupt, so the hub's gap fill cannot supply
    it: the live clients (one run, all runs) get events 1..4, the journal_gap frame, then 6.. to the end."""
    settings, ports = make_settings(tmp_path)
    pub = _publisher(settings, ports)
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            await anyio.sleep(0.3)  # past the slow-joiner window
            run_id = new_run_id()
            results: dict[str, Collected] = {}

            async def client(name: str, url: str) -> None:
                results[name] = await collect(http, url, until=None if name == "run" else _ended)

            async with anyio.create_task_group() as tg:
                tg.start_soon(client, "run", f"{gw.ws}/ws/events/{run_id}?after_seq=0")  # waits for the run
                tg.start_soon(client, "all", f"{gw.ws}/ws/events")
                await anyio.sleep(0.3)
                pub.begin(run_id)
                pub.emit(run_id, "pipeline", "start", "s")
                pub.emit(run_id, "nap", "log", "3")
                pub.emit(run_id, "nap", "log", "4")
                with anyio.fail_after(10):
                    while (entry := gw.app[INDEX].get(run_id)) is None or entry.frontier < 4:
                        await anyio.sleep(0.02)
                await anyio.sleep(0.3)  # both clients are live by now (a replaying one would meet the hole too)
                path = settings.journal_dir / f"pipeline_{run_id}.jsonl"
                pub.drop = lambda ev: ev.seq == 5
                pub.emit(run_id, "nap", "log", "5 (lost, and its line damaged)")
                _corrupt_line(path, 5)
                pub.drop = lambda ev: False
                for i in range(6, 9):
                    pub.emit(run_id, "nap", "log", str(i))
                pub.emit(run_id, "pipeline", "success", "done")
            for name in ("run", "all"):
                assert _flow(results[name].frames) == [1, 2, 3, 4, ("gap", 5, 5), 6, 7, 8, 9], name
            assert results["run"].close_code == 1000
            assert gw.stats.gap_events_unfilled == 1 and gw.stats.journal_gaps == 1
    finally:
        pub.close()
