"""Two schedulers on one database in cluster mode, as real subprocesses with separate homes, on a real
PostgreSQL and a real 3-node JetStream cluster: one leads; an `every` schedule fires each slot once
across both, with none lost when the leader is killed with -9; launches queued through the gateway run
once each across a kill -9 of the leader (on a test runner that speaks the dispatch protocol and writes
the event stream, its DEALER following the leader with the runner's own link); with the database
stopped a launch answers 503, and all recovers once it is back."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import anyio
import asyncpg
import pytest

from runwire_cluster.events import EventStream
from runwire_cluster.state import ClusterState
from shared.config import ClusterConfig
from shared.journal import JournalWriter
from tests.cluster_fixtures import NatsCluster, Postgres, nats_cluster, postgres  # noqa: F401  (fixtures)
from tests.cluster_peers import (  # noqa: F401  (fixtures)
    PeerRunner,
    db,
    db_url,
    gateway_port,
    host_config,
    leader_of,
    leading,
    start_host,
    stream_events,
    two_schedulers,
    until,
    until_match,
)
from tests.harness import SLEEP_PIPELINE, Service

PIPELINE = SLEEP_PIPELINE.replace('description = "one stage that sleeps"\n',
                                  'description = "one stage that sleeps"\nmax_concurrent = 4\n')
assert PIPELINE != SLEEP_PIPELINE
TICKS = SLEEP_PIPELINE + """
[schedules.tick]
pipeline = "sleepy"
every = "1s"
misfire = "catch_up"
catch_up_max = 100
overlap = "allow"
"""


@pytest.mark.timeout(180)
async def test_every_slot_fires_once_across_two_schedulers_and_a_kill_9_of_the_leader(
        tmp_path: Path, nats_cluster: NatsCluster, db_url: str, db: asyncpg.Connection,  # noqa: F811
        services: list[Service]) -> None:
    a, b = await two_schedulers(tmp_path, nats_cluster, db_url, services, TICKS)
    await anyio.sleep(4.0)  # slots fire on a; b stands by
    assert leading(a) == 1 and leading(b) == 0, b.output()[-2000:]
    assert await db.fetchval("SELECT count(*) FROM fire_ledger") >= 2
    a.kill9()
    await until(lambda: leading(b) == 1, 30, "b takes over")
    await anyio.sleep(4.0)  # b fires the slots passed while nobody led (catch_up, inside the grace), then its own
    b.stop()

    rows = await db.fetch("SELECT slot, run_id, claimed_by FROM fire_ledger WHERE schedule = 'tick' ORDER BY slot")
    slots = [r["slot"] for r in rows]
    holders = [r["claimed_by"] for r in rows]
    assert len(set(holders)) == 2, holders  # both fired some
    gaps = [(x, y) for x, y in itertools.pairwise(slots) if (y - x).total_seconds() != 1.0]
    assert gaps == [], f"slots lost across the takeover: {gaps}"
    runs = await db.fetch("SELECT run_id, skip FROM runs ORDER BY run_id")
    assert sorted(r["run_id"] for r in runs) == sorted(r["run_id"] for r in rows)
    assert all(r["skip"] is None for r in runs)
    kinds = await stream_events(nats_cluster, [r["run_id"] for r in rows])
    assert {r: k for r, k in kinds.items() if k != ["queued"]} == {}, "each slot's run: one queued, once"


@pytest.mark.timeout(240)
async def test_launches_run_once_across_a_kill_9_of_the_leading_scheduler(
        tmp_path: Path, nats_cluster: NatsCluster, db_url: str, db: asyncpg.Connection,  # noqa: F811
        services: list[Service]) -> None:
    a, b = await two_schedulers(tmp_path, nats_cluster, db_url, services, PIPELINE)
    port = gateway_port(start_host(tmp_path, "gw", "gateway_svc", nats_cluster, db_url, services))
    runner = PeerRunner(host_config(tmp_path, "r", nats_cluster.urls, db_url), capacity=4, work=0.3)
    launched: list[str] = []

    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http, anyio.create_task_group() as tg:
        await tg.start(runner.run)

        async def launch(n: int) -> None:
            for i in range(n):
                async with http.post("/api/runs", json={"pipeline": "sleepy", "params": {}},
                                     headers={"Idempotency-Key": f"burst-{len(launched)}-{i}"}) as r:
                    assert r.status == 202, await r.text()
                    launched.append((await r.json())["run_id"])

        await launch(30)
        await until(lambda: sum(runner.executed.values()) >= 6, 60, "runs dispatched by a")
        runner.gate = gate = anyio.Event()  # the runs on the runner now stay running across the takeover
        await until(lambda: len(runner.gated) == 4, 60, "4 runs held running on the runner")
        held = set(runner.gated)
        a.kill9()
        await launch(20)  # while nobody leads: queued in the database all the same
        await until(lambda: leading(b) == 1, 30, "b takes over")
        took = await until_match(b, r"took over (\d+) run\(s\) not ended: (\d+) queued, (\d+) awaiting their runners")
        assert int(took[3]) == len(held), took[0]  # the runs running on the runner: adopted, not queued again
        async with http.get("/api/schedules") as r:  # a control call: to the new leader's control socket
            assert r.status == 200, await r.text()
        await anyio.sleep(2.0)  # b hears the runner list them: they stay its runs
        gate.set()
        await until(lambda: all(runner.executed[r] for r in launched), 120, "every launch ran")
        await until(lambda: not runner.running, 30, "the last runs end")
        # a retried POST with a key seen before answers the first run, never a second; the key with
        # other parameters is refused
        async with http.post("/api/runs", json={"pipeline": "sleepy", "params": {}},
                             headers={"Idempotency-Key": "burst-0-0"}) as r:
            assert r.status == 202 and r.headers.get("Idempotent-Replayed") == "true"
            assert (await r.json())["run_id"] == launched[0]
        async with http.post("/api/runs", json={"pipeline": "sleepy", "params": {"seconds": 2}},
                             headers={"Idempotency-Key": "burst-0-0"}) as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
        tg.cancel_scope.cancel()

    assert len(set(launched)) == 50
    assert Counter(runner.executed.values()) == Counter({1: 50}), runner.executed
    assert runner.redispatched == [] and runner.fenced == []
    kinds = await stream_events(nats_cluster, launched)
    assert {r: k for r, k in kinds.items() if k != ["queued", "start", "success"]} == {}
    ended = await db.fetchval("SELECT count(*) FROM runs WHERE outcome = 'success'")
    claimed = await db.fetch("SELECT claimed_by, count(*) AS n FROM launches GROUP BY claimed_by")
    assert ended >= 45, ended  # ends the leader had not yet recorded when stopped are in the stream
    assert len(claimed) == 2 and all(r["claimed_by"] for r in claimed), claimed  # both leaders claimed some


@pytest.mark.timeout(240)
async def test_database_stopped_launch_answers_503_and_all_recovers(
        tmp_path: Path, nats_cluster: NatsCluster, postgres: Postgres, db_url: str,  # noqa: F811
        services: list[Service]) -> None:
    a = start_host(tmp_path, "a", "scheduler_svc", nats_cluster, db_url, services)
    b = start_host(tmp_path, "b", "scheduler_svc", nats_cluster, db_url, services)  # at once: either leads
    port = gateway_port(start_host(tmp_path, "gw", "gateway_svc", nats_cluster, db_url, services))
    runner = PeerRunner(host_config(tmp_path, "r", nats_cluster.urls, db_url))
    first = await leader_of([a, b])

    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http, anyio.create_task_group() as tg:
        await tg.start(runner.run)

        async def launch() -> aiohttp.ClientResponse:
            async with http.post("/api/runs", json={"pipeline": "sleepy"}) as r:
                await r.read()
                return r

        ok = await launch()
        before = (await ok.json())["run_id"]
        await until(lambda: runner.executed[before] == 1, 60, "a run before the outage")
        postgres.stop()
        try:
            down = await launch()
            assert down.status == 503
            body = await down.json()
            assert body["error"]["code"] == "unavailable" and "cluster state" in body["error"]["message"], body
            await until(lambda: "stopped leading" in first.output(), 30, "the leader steps down: it cannot renew")
            await anyio.sleep(6.0)  # past the lease's TTL: nobody leads while the database is away
            again = await launch()
            assert again.status == 503
            assert not runner.executed.keys() - {before}
        finally:
            postgres.start()
        after = None
        for _ in range(100):  # the gateway's pool reconnects
            r = await launch()
            if r.status == 202:
                after = (await r.json())["run_id"]
                break
            await anyio.sleep(0.2)
        assert after is not None
        await until(lambda: runner.executed[after] == 1, 60, "a run after the outage")
        tg.cancel_scope.cancel()
    assert sum(leading(s) for s in (a, b)) >= 2  # led again after the outage


@pytest.mark.timeout(180)
async def test_a_lost_runner_s_run_ends_through_the_fence_and_its_late_write_is_refused(
        tmp_path: Path, nats_cluster: NatsCluster, db_url: str, db: asyncpg.Connection,  # noqa: F811
        services: list[Service]) -> None:
    a = start_host(tmp_path, "a", "scheduler_svc", nats_cluster, db_url, services)
    await leader_of([a])
    runner = PeerRunner(host_config(tmp_path, "r", nats_cluster.urls, db_url), work=0.1)
    runner.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await db.execute("INSERT INTO launches (run_id, pipeline) VALUES ('20260101T000000000000Z-lost', 'sleepy')")
        await until(lambda: bool(runner.gated), 60, "the run runs on the runner")
        runner.silent = True  # no heartbeat from here: the leader declares the runner lost
        await until_match(a, r"runner test-runner lost: no heartbeat", 30)
        kinds: dict[str, list[str]] = {}
        for _ in range(100):
            kinds = await stream_events(nats_cluster, ["20260101T000000000000Z-lost"])
            if kinds["20260101T000000000000Z-lost"][-1] == "failure":
                break
            await anyio.sleep(0.1)
        assert kinds["20260101T000000000000Z-lost"] == ["queued", "start", "failure"]
        runner.gate.set()  # the old runner writes on: its append is refused (fenced)
        await until(lambda: runner.fenced == ["20260101T000000000000Z-lost"], 30, "the late write is fenced")
        tg.cancel_scope.cancel()
    async with await EventStream.connect(ClusterConfig(nats=nats_cluster.urls, state="postgresql://x")) as stream:
        end = (await stream.read("20260101T000000000000Z-lost"))[-1]
    assert end.event == "failure" and end.msg.startswith("runner lost"), end
    outcome = None
    for _ in range(100):  # the leader records ends in the database just after the stream
        outcome = await db.fetchval("SELECT outcome FROM runs WHERE run_id = '20260101T000000000000Z-lost'")
        if outcome is not None:
            break
        await anyio.sleep(0.1)
    assert outcome == "failure"


@pytest.mark.timeout(180)
async def test_a_runner_s_dispatch_link_follows_the_leader(
        tmp_path: Path, nats_cluster: NatsCluster, db_url: str, services: list[Service]) -> None:  # noqa: F811
    """The real runner in cluster mode: its DEALER connects to the leader's dispatch endpoint from the
    database, and to the new leader's after a kill -9 (its runs' event path is the runner's own work)."""
    a, b = await two_schedulers(tmp_path, nats_cluster, db_url, services)
    r = start_host(tmp_path, "r", "runner_svc", nats_cluster, db_url, services)
    await until_match(a, r"runner test-runner connected")
    a.kill9()
    await until(lambda: leading(b) == 1, 30, "b takes over")
    await until_match(b, r"runner test-runner connected")
    moved = await until_match(r, r"DEALER connected to its dispatch (\S+) \(was (\S+)\)")
    assert moved[1] != moved[2]


@pytest.mark.timeout(180)
async def test_a_leader_paused_past_its_lease_is_fenced_when_it_resumes(
        tmp_path: Path, nats_cluster: NatsCluster, db_url: str, db: asyncpg.Connection,  # noqa: F811
        services: list[Service]) -> None:
    a, b = await two_schedulers(tmp_path, nats_cluster, db_url, services, TICKS)
    await until_match(a, r"FIRE slot")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        await until(lambda: leading(b) == 1, 30, "b takes over from the paused leader")
        await until_match(b, r"FIRE slot")
        seen = len(a.output())
    finally:
        os.kill(a.pid, signal.SIGCONT)
    await until(lambda: "stopped leading" in a.output()[seen:], 30, "a learns it no longer leads")
    await anyio.sleep(3.0)
    after = a.output()[seen:]
    assert "FIRE slot" not in after and "dispatched to runner" not in after, after[-3000:]
    assert leading(a) == 1 and leading(b) == 1  # a stands by: b's lease is live
    b.stop()
    rows = await db.fetch("SELECT slot, run_id FROM fire_ledger WHERE schedule = 'tick' ORDER BY slot")
    gaps = [(x, y) for x, y in itertools.pairwise([r["slot"] for r in rows]) if (y - x).total_seconds() != 1.0]
    assert gaps == []
    kinds = await stream_events(nats_cluster, [r["run_id"] for r in rows])
    assert {r: k for r, k in kinds.items() if k != ["queued"]} == {}


@pytest.mark.timeout(120)
async def test_the_leader_s_own_journals_go_by_keep_days_once_the_database_says_their_runs_ended(
        tmp_path: Path, nats_cluster: NatsCluster, db_url: str, db: asyncpg.Connection,  # noqa: F811
        services: list[Service]) -> None:
    """A scheduler host's journals hold only what it wrote (`queued`): the end is in the run's row."""
    async with await ClusterState.connect(ClusterConfig(nats=nats_cluster.urls, state=db_url)) as state:
        await state.migrate()
    config = host_config(tmp_path, "a", nats_cluster.urls, db_url)
    config.write_text(config.read_text().replace("[scheduler]\n", "[scheduler]\nkeep_days = 1\n", 1))
    events = tmp_path / "a" / "home" / "events"
    files = {}
    for run_id, age_days, outcome in (("old-ended", 3, "success"), ("old-unknown", 3, None), ("new-ended", 0, "failure")):
        writer = JournalWriter.create(events, run_id, ZoneInfo("UTC"))
        writer.append_many([("pipeline", "queued", "", {"pipeline": "sleepy", "params": {}})])
        writer.close()
        old = time.time() - age_days * 86400
        os.utime(writer.path, (old, old))
        files[run_id] = writer.path
        if outcome is not None:
            await db.execute("INSERT INTO runs (run_id, pipeline, created_by, outcome) VALUES ($1, 'sleepy', 'test', $2)",
                             run_id, outcome)
    a = Service("scheduler_svc", config, tmp_path).start()
    services.append(a)
    await until_match(a, r"retention: removed 1 run\(s\) ended in the cluster")
    assert {r: p.exists() for r, p in files.items()} == {"old-ended": False, "old-unknown": True, "new-ended": True}
