"""The stateless gateway of cluster mode, on a real 3-node JetStream cluster and a real PostgreSQL:
two gateway processes (separate homes, no journal files) on one cluster. The test stands in for a
runner: it appends a run's events to JetStream with RunWriter and, only after the ack, publishes
them on its own ZeroMQ PUB socket, registered in the runner registry with register_runner.

- a WebSocket client on gateway A and one on gateway B each get exactly the run's events, in order,
  although the publisher dropped some of them (and the run's end): filled from JetStream;
- a client of all runs leaves A and resumes on B with A's cursor: recovered, exactly the rest;
- a publisher that joins the registry after the gateways started is followed (its heartbeats
  reach them), and leaving the registry lets it go;
- /api/runs lists the runs from JetStream, on a gateway started after they ended too, and a
  cursor issued by A before those runs began resumes exactly on that gateway;
- with [cluster.curve] the SUB socket presents the cluster's key pair;
- the registry (PostgreSQL) stopped: the last known runners are still followed, /healthz says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import zmq

from runwire_cluster.state import ClusterState
from shared.config import ClusterConfig, settings_from_toml
from shared.curve import CurveAuthenticator, load_keys, write_keypair
from tests.cluster_fixtures import NatsCluster, Postgres, nats_cluster, postgres  # noqa: F401  (the fixtures)
from tests.cluster_gateway_rig import (
    Publisher,
    T,
    beat_and_check,
    cluster_rig,
    count_run,
    follows,
    gateway_config,
    has_frames,
    http_json,
    make_run,
    metric,
    msgspec_json,
    new_run_id,
    numbers,
    run_socket,
    start_gateway,
    wait_until,
)
from tests.harness import Service


@pytest.mark.timeout(240)
async def test_two_gateways_each_deliver_a_run_exactly_and_a_cursor_from_one_resumes_on_the_other(
        tmp_path: Path, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    async with cluster_rig(tmp_path, nats_cluster, postgres) as (stream, state, ctx):
        pub = Publisher(ctx, stream, f"runner-a-{next(numbers)}")
        await pub.register(state)
        a, url_a = await anyio.to_thread.run_sync(start_gateway, tmp_path, "gw-a", nats_cluster, postgres)
        b, url_b = await anyio.to_thread.run_sync(start_gateway, tmp_path, "gw-b", nats_cluster, postgres)
        try:
            async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
                for base in (url_a, url_b):
                    await follows(session, base, pub.runner_id)
                    # the SUB socket is connected when heartbeats come through
                    await wait_until("heartbeats", lambda base=base: beat_and_check(session, base, pub))

                # ---- one run, watched on A and on B; the publisher drops some events and the end
                run = new_run_id("watched")
                events = make_run(run, 40)
                await pub.write(events[:1])  # queued, as the scheduler would, before anyone watches
                on_a = await run_socket(session, tg, f"{url_a.replace('http', 'ws')}/ws/events/{run}")
                on_b = await run_socket(session, tg, f"{url_b.replace('http', 'ws')}/ws/events/{run}")
                dropped = {5, 6, 7, 20, 33}
                for ev in events[1:-3]:
                    await pub.write([ev], publish=ev.seq not in dropped)
                await pub.write(events[-3:], publish=False)  # a lost tail: the heartbeat (or the sweep) tells
                await pub.heartbeat()
                for reader in (on_a, on_b):
                    with anyio.fail_after(T):
                        await reader.closed.wait()
                    assert reader.ws.close_code == 1000, reader.frames
                    assert reader.frames[0]["type"] == "hello" and reader.frames[0]["recovered"] is True
                    assert reader.errors() == []
                    got = reader.events()
                    assert [e["seq"] for e in got] == list(range(1, len(events) + 1))
                    assert got == [json.loads(msgspec_json(e)) for e in events]
                for base in (url_a, url_b):
                    # what the publisher never sent came from JetStream (a gap fill, a lost tail)
                    _, filled = await metric(session, base, "gap_events_filled")
                    assert filled is not None and filled >= len(dropped) + 3

                # ---- all runs: a client on A leaves, resumes on B with A's cursor
                all_a = await run_socket(session, tg, f"{url_a.replace('http', 'ws')}/ws/events")
                await wait_until("hello on A", lambda: has_frames(all_a, 1))
                run2 = new_run_id("resumed")
                events2 = make_run(run2, 30)
                for ev in events2[:12]:
                    await pub.write([ev])
                await wait_until("A delivers run 2's first 12", lambda: count_run(all_a, run2, 12))
                cursor = all_a.last_cursor()
                await all_a.ws.close()
                with anyio.fail_after(T):
                    await all_a.closed.wait()
                seen_on_a = [e for e in all_a.events() if e["run_id"] == run2]
                assert [e["seq"] for e in seen_on_a] == list(range(1, 13))
                for ev in events2[12:20]:
                    await pub.write([ev], publish=ev.seq != 15)  # while the client is away, and one is dropped
                run3 = new_run_id("while-away")
                events3 = make_run(run3, 3)
                await pub.write(events3[:2])
                all_b = await run_socket(session, tg, f"{url_b.replace('http', 'ws')}/ws/events?cursor={cursor}")
                await wait_until("hello on B", lambda: has_frames(all_b, 1))
                hello = all_b.frames[0]
                assert hello["type"] == "hello" and hello["recovered"] is True, hello
                for ev in events2[20:]:
                    await pub.write([ev])
                await pub.write(events3[2:])
                await pub.heartbeat()
                await wait_until("B delivers the rest of runs 2 and 3",
                                 lambda: count_run(all_b, run2, len(events2) - 12, strict=False))
                await wait_until("B delivers run 3", lambda: count_run(all_b, run3, len(events3), strict=False))
                assert [e["seq"] for e in all_b.events() if e["run_id"] == run2] == list(range(13, len(events2) + 1))
                assert [e["seq"] for e in all_b.events() if e["run_id"] == run3] == list(range(1, len(events3) + 1))
                assert all_b.errors() == []
                # the cursor B issues is exact on A too
                cursor_b = all_b.last_cursor()
                await all_b.ws.close()
                back_on_a = await run_socket(session, tg, f"{url_a.replace('http', 'ws')}/ws/events?cursor={cursor_b}")
                await wait_until("hello on A again", lambda: has_frames(back_on_a, 1))
                assert back_on_a.frames[0]["recovered"] is True, back_on_a.frames[0]
                await back_on_a.ws.close()
                tg.cancel_scope.cancel()
        finally:
            pub.close()
            await state.remove_runner(pub.runner_id)
            for svc in (a, b):
                svc.stop()
        for svc in (a, b):
            assert not list((tmp_path / svc.config.parent.name / "home" / "events").glob("*.jsonl"))
            assert "Traceback" not in svc.output(), svc.output()[-4000:]


@pytest.mark.timeout(240)
async def test_a_runner_joining_later_is_followed_and_runs_are_listed_from_the_stream(
        tmp_path: Path, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    async with cluster_rig(tmp_path, nats_cluster, postgres) as (stream, state, ctx):
        first = Publisher(ctx, stream, f"runner-b-{next(numbers)}")
        await first.register(state)
        a, url_a = await anyio.to_thread.run_sync(start_gateway, tmp_path, "gw-a", nats_cluster, postgres)
        b, url_b = await anyio.to_thread.run_sync(start_gateway, tmp_path, "gw-b", nats_cluster, postgres)
        late = Publisher(ctx, stream, f"runner-late-{next(numbers)}")
        c: Service | None = None
        try:
            async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
                for base in (url_a, url_b):
                    await follows(session, base, first.runner_id)
                    assert late.runner_id not in (await http_json(session, f"{base}/healthz"))[1]["checks"]["registry"]["runners"]
                # an all-runs client of A, before any of this test's runs: its cursor will be used on C
                early = await run_socket(session, tg, f"{url_a.replace('http', 'ws')}/ws/events")
                await wait_until("hello on A", lambda: has_frames(early, 1))
                early_cursor = early.last_cursor()
                await early.ws.close()
                await late.register(state)  # joins after both gateways started
                for base in (url_a, url_b):
                    await follows(session, base, late.runner_id)
                    await wait_until("late heartbeats", lambda base=base: beat_and_check(session, base, late))
                # a run of the late runner, watched on B from its start: live from the late publisher
                run = new_run_id("late")
                events = make_run(run, 10)
                on_b = await run_socket(session, tg, f"{url_b.replace('http', 'ws')}/ws/events/{run}")
                for ev in events:
                    await late.write([ev])
                with anyio.fail_after(T):
                    await on_b.closed.wait()
                assert [e["seq"] for e in on_b.events()] == list(range(1, len(events) + 1))
                # a run of the first runner that ends while it is still running, and one left running
                ended = new_run_id("ended")
                ended_events = make_run(ended, 2)
                await first.write(ended_events)
                running = new_run_id("running")
                running_events = make_run(running, 2)[:-1]
                await first.write(running_events)

                async def listed(base: str) -> bool:
                    status, body = await http_json(session, f"{base}/api/runs?limit=1000")
                    assert status == 200
                    got = {r["run_id"]: r["status"] for r in body["runs"]}
                    return got.get(run) == "success" and got.get(ended) == "success" and got.get(running) == "running"

                for base in (url_a, url_b):
                    await wait_until(f"{base} lists the runs", lambda base=base: listed(base))
                # a gateway started now has only the stream to learn them from
                c, url_c = await anyio.to_thread.run_sync(start_gateway, tmp_path, "gw-c", nats_cluster, postgres)
                status, body = await http_json(session, f"{url_c}/api/runs?limit=1000")
                got = {r["run_id"]: r for r in body["runs"]}
                assert got[run]["status"] == "success" and got[run]["last_seq"] == len(events)
                assert got[run]["pipeline"] == "sleepy" and got[run]["trigger"] == "manual"
                assert got[ended]["status"] == "success" and got[running]["status"] == "running"
                # A's cursor from before these runs, on C (started after they were written): exactly them
                resumed = await run_socket(session, tg, f"{url_c.replace('http', 'ws')}/ws/events?cursor={early_cursor}")
                expected = {run: len(events), ended: len(ended_events), running: len(running_events)}
                for rid, n in expected.items():
                    await wait_until(f"C replays {rid}", lambda rid=rid, n=n: count_run(resumed, rid, n))
                assert resumed.frames[0]["type"] == "hello" and resumed.frames[0]["recovered"] is True, resumed.frames[0]
                for rid, n in expected.items():
                    assert [e["seq"] for e in resumed.events() if e["run_id"] == rid] == list(range(1, n + 1))
                assert resumed.errors() == []
                await resumed.ws.close()
                status, detail = await http_json(session, f"{url_c}/api/runs/{running}")
                assert status == 200 and detail["last_seq"] == len(running_events)
                status, page = await http_json(session, f"{url_c}/api/runs/{run}/events?after_seq=3&limit=4")
                assert status == 200 and [e["seq"] for e in page["events"]] == [4, 5, 6, 7] and page["more"] is True
                status, _ = await http_json(session, f"{url_c}/api/runs/no-such-run/events")
                assert status == 404
                # the late runner leaves the registry: the gateways let it go
                await state.remove_runner(late.runner_id)
                for base in (url_a, url_b):
                    await follows(session, base, late.runner_id, present=False)
                tg.cancel_scope.cancel()
        finally:
            first.close()
            late.close()
            await state.remove_runner(first.runner_id)
            await state.remove_runner(late.runner_id)
            for svc in (a, b, c):
                if svc is not None:
                    svc.stop()
        for svc in (a, b):
            assert "Traceback" not in svc.output(), svc.output()[-4000:]


@pytest.mark.timeout(240)
async def test_with_curve_keys_the_gateway_subscribes_encrypted(
        tmp_path: Path, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    """The cluster's key pair in [cluster.curve]: the stand-in runner's PUB is a CURVE server that
    accepts only the pair, and the gateway's SUB presents it (a SUB without it gets nothing)."""
    keys_dir = tmp_path / "keys"
    write_keypair(keys_dir)
    path = gateway_config(tmp_path, "probe", nats_cluster, postgres, keys_dir)
    keys = load_keys(settings_from_toml(path.read_text(), path))
    assert keys is not None
    async with cluster_rig(tmp_path, nats_cluster, postgres) as (stream, state, ctx):
        with CurveAuthenticator(zmq.Context.instance(), keys):
            pub = Publisher(ctx, stream, f"runner-curve-{next(numbers)}", keys)
            await pub.register(state)
            a, url_a = await anyio.to_thread.run_sync(start_gateway, tmp_path, "gw-a", nats_cluster, postgres, keys_dir)
            plain = ctx.socket(zmq.SUB)  # no keys: the handshake fails, nothing arrives
            plain.setsockopt(zmq.LINGER, 0)
            plain.setsockopt(zmq.SUBSCRIBE, b"")
            plain.connect(pub.endpoint)
            try:
                async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
                    await follows(session, url_a, pub.runner_id)
                    await wait_until("heartbeats over CURVE", lambda: beat_and_check(session, url_a, pub))
                    run = new_run_id("curve")
                    events = make_run(run, 5)
                    await pub.write(events[:1])
                    on_a = await run_socket(session, tg, f"{url_a.replace('http', 'ws')}/ws/events/{run}")
                    for ev in events[1:]:
                        await pub.write([ev])
                    with anyio.fail_after(T):
                        await on_a.closed.wait()
                    assert [e["seq"] for e in on_a.events()] == list(range(1, len(events) + 1))
                    _, filled = await metric(session, url_a, "gap_events_filled")
                    # live over CURVE: a SUB that could not connect would have had all of them from the sweep
                    assert filled is not None and filled < len(events)
                    assert await plain.poll(200) == 0
                    tg.cancel_scope.cancel()
            finally:
                plain.close(linger=0)
                pub.close()
                await state.remove_runner(pub.runner_id)
                a.stop()
            assert "Traceback" not in a.output(), a.output()[-4000:]


@pytest.mark.timeout(240)
async def test_the_registry_away_keeps_the_last_known_runners_and_says_so(
        tmp_path: Path, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    """Last in the module: it stops the module's PostgreSQL for a while."""
    async with cluster_rig(tmp_path, nats_cluster, postgres) as (stream, state, ctx):
        pub = Publisher(ctx, stream, f"runner-c-{next(numbers)}")
        await pub.register(state)
        bad = f"runner-bad-{next(numbers)}"
        await state.register_runner(bad, "udp://nowhere:1", "tcp://127.0.0.1:1", 1)  # hostile registry content
        a, url_a = await anyio.to_thread.run_sync(start_gateway, tmp_path, "gw-a", nats_cluster, postgres)
        try:
            async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
                await follows(session, url_a, pub.runner_id)
                _, health = await http_json(session, f"{url_a}/healthz")
                assert bad in health["checks"]["registry"]["refused"] and bad not in health["checks"]["registry"]["runners"]
                await wait_until("heartbeats", lambda: beat_and_check(session, url_a, pub))
                await anyio.to_thread.run_sync(postgres.stop)

                async def registry_down() -> Any:
                    _, body = await http_json(session, f"{url_a}/healthz")
                    return body if not body["checks"]["registry"]["ok"] else None

                body = await wait_until("/healthz shows the registry away", registry_down)
                reg = body["checks"]["registry"]
                assert "not reachable" in reg["detail"] and "last known 1 runner(s)" in reg["detail"]
                assert pub.runner_id in reg["runners"] and "registry" in body["degraded"]
                assert body["checks"]["event_stream"]["ok"] is True
                # the last known runner is still followed: its run streams live
                run = new_run_id("registry-away")
                events = make_run(run, 5)
                await pub.write(events[:1])
                on_a = await run_socket(session, tg, f"{url_a.replace('http', 'ws')}/ws/events/{run}")
                for ev in events[1:]:
                    await pub.write([ev])
                with anyio.fail_after(T):
                    await on_a.closed.wait()
                assert [e["seq"] for e in on_a.events()] == list(range(1, len(events) + 1))
                _, filled = await metric(session, url_a, "gap_events_filled")
                await anyio.to_thread.run_sync(postgres.start)

                async def registry_back() -> bool:
                    _, body = await http_json(session, f"{url_a}/healthz")
                    return bool(body["checks"]["registry"]["ok"])

                await wait_until("/healthz shows the registry back", registry_back)
                tg.cancel_scope.cancel()
        finally:
            pub.close()
            if not postgres.running():
                await anyio.to_thread.run_sync(postgres.start)
            a.stop()
        assert "runner registry" in a.output() and "still following the last known 1 runner(s)" in a.output()
        assert "Traceback" not in a.output(), a.output()[-4000:]
    cfg = ClusterConfig(nats=nats_cluster.urls, state=postgres.url)
    async with await ClusterState.connect(cfg) as fresh:
        await fresh.remove_runner(pub.runner_id)
        await fresh.remove_runner(bad)
