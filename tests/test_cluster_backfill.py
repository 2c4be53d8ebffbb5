"""Backfills in cluster mode, through a real gateway to two schedulers on a real PostgreSQL and a real
3-node JetStream cluster (subprocesses with separate homes): a backfill's plan is in the database, so
the scheduler that takes over after a kill -9 of the leader carries it on and each slot runs once;
the new leader plans from the database's runs (the earlier leader's runs count as ran); a slot that
the fire ledger gives to someone else between the plan and its queueing is not run twice. Re-runs find
a run the earlier leader ran by its row."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest

from scheduler_svc.slots import slot_run_id
from tests.cluster_fixtures import NatsCluster, Postgres, nats_cluster, postgres  # noqa: F401  (fixtures)
from tests.cluster_peers import (  # noqa: F401  (fixtures)
    PeerRunner,
    db,
    db_url,
    gateway_port,
    host_config,
    leading,
    start_host,
    stream_events,
    two_schedulers,
    until,
    until_match,
)
from tests.harness import SLEEP_PIPELINE, Service

HOURLY = SLEEP_PIPELINE.replace('description = "one stage that sleeps"\n',
                                'description = "one stage that sleeps"\nmax_concurrent = 4\n') + """
[schedules.minutely]
pipeline = "sleepy"
every = "1m"
timezone = "UTC"
"""
DAY = "2024-03-01"  # long past: its slots are the backfill's, never the schedule's
SLOTS = 9  # minutes 0..8
WINDOW = {"from": f"{DAY}T00:00:00Z", "to": f"{DAY}T00:{SLOTS - 1:02d}:00Z"}
RAN = {"from": f"{DAY}T00:00:00Z", "to": f"{DAY}T00:{SLOTS - 2:02d}:00Z"}  # all but the last slot


def slot_id(minute: int) -> str:
    return slot_run_id(datetime.fromisoformat(f"{DAY}T00:{minute:02d}:00+00:00"), "minutely")


async def post(http: aiohttp.ClientSession, path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
    async with http.post(path, json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def progress(http: aiohttp.ClientSession, backfill_id: str) -> dict[str, Any] | None:
    """The backfill's progress as the leader lists it (None while nobody leads)."""
    async with http.get("/api/backfills") as r:
        if r.status == 503:
            return None
        assert r.status == 200, await r.text()
        found = [b for b in (await r.json())["backfills"] if b["backfill_id"] == backfill_id]
    assert len(found) == 1, found
    return found[0]  # type: ignore[no-any-return]


@pytest.mark.timeout(240)
async def test_a_backfill_carries_on_across_a_kill_9_of_the_leader_and_each_slot_runs_once(
        tmp_path: Path, nats_cluster: NatsCluster, db_url: str, db: asyncpg.Connection,  # noqa: F811
        services: list[Service]) -> None:
    a, b = await two_schedulers(tmp_path, nats_cluster, db_url, services, HOURLY)
    # the gateway knows the schedules (their zones)
    port = gateway_port(start_host(tmp_path, "gw", "gateway_svc", nats_cluster, db_url, services, HOURLY))
    runner = PeerRunner(host_config(tmp_path, "r", nats_cluster.urls, db_url), capacity=4, work=1.0)
    last = slot_id(SLOTS - 1)

    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http, anyio.create_task_group() as tg:
        await tg.start(runner.run)
        dry = await post(http, "/api/schedules/minutely/backfill", {**WINDOW, "dry_run": True}, 200)
        assert [s["run_id"] for s in dry["slots"]] == [slot_id(m) for m in range(SLOTS)], dry
        made = await post(http, "/api/schedules/minutely/backfill", {**WINDOW, "max_parallel": 2}, 202)
        bf = made["progress"]["backfill_id"]
        assert made["progress"]["total"] == SLOTS, made
        # the fire ledger gives the last slot to someone else after the plan was made (as the schedule
        # driver of a scheduler claims a slot): the backfill must not run it too
        await db.execute("INSERT INTO fire_ledger (schedule, slot, run_id, claimed_by) VALUES ($1, $2, $3, 'elsewhere')",
                         "minutely", datetime.fromisoformat(f"{DAY}T00:{SLOTS - 1:02d}:00+00:00"), last)
        await until(lambda: sum(runner.executed.values()) >= 3, 60, "the first backfill runs dispatched by a")
        a.kill9()
        await until(lambda: leading(b) == 1, 30, "b takes over")
        await until_match(b, rf"backfills carried on after the restart: {bf} \(\d+ of {SLOTS} runs to queue\)")

        done: dict[str, Any] = {}

        async def finished() -> None:
            while True:
                p = await progress(http, bf)
                if p is not None and p["done"]:
                    done.update(p)
                    return
                await anyio.sleep(0.2)

        with anyio.fail_after(120):
            await finished()
        assert re.search(rf"slot {DAY}T00:{SLOTS - 1:02d}:00Z of schedule minutely was claimed by elsewhere", b.output() + a.output())

        # the new leader plans from the database: every slot ran (the earlier leader's runs too)
        again = await post(http, "/api/schedules/minutely/backfill", RAN, 202)
        assert [s["action"] for s in again["slots"]] == ["skip"] * (SLOTS - 1), again
        assert again["progress"] is None
        rerun = await post(http, "/api/schedules/minutely/backfill", {**RAN, "policy": "all", "dry_run": True}, 200)
        assert [(s["action"], s["run_id"], s["rerun_of"]) for s in rerun["slots"]] == \
            [("run", f"{slot_id(m)}.r1", slot_id(m)) for m in range(SLOTS - 1)], rerun
        # a re-run of a run that ended in a's term: found by its row; from the failed stage: refused, why
        async with http.post(f"/api/runs/{slot_id(0)}/rerun", json={}) as r:
            assert r.status == 202, await r.text()
            rerun_id = (await r.json())["run_id"]
        async with http.post(f"/api/runs/{slot_id(0)}/rerun", json={"from_failed": True}) as r:
            assert r.status == 409 and "not available in cluster mode" in await r.text()
        async with http.post("/api/runs/no-such-run/rerun", json={}) as r:
            assert r.status == 404 and "not found in the cluster's runs" in await r.text()
        await until(lambda: runner.executed[rerun_id] == 1 and not runner.running, 60, "the re-run ran")
        tg.cancel_scope.cancel()

    ran = [slot_id(m) for m in range(SLOTS - 1)]
    of_day = Counter({r: n for r, n in runner.executed.items() if r.startswith(DAY.replace("-", ""))})  # not today's slots, nor the re-run
    assert of_day == Counter(ran), runner.executed  # each once; the claimed slot never
    assert runner.redispatched == [] and runner.fenced == []
    assert done["success"] == SLOTS - 1 and done["total"] == SLOTS, done
    kinds = await stream_events(nats_cluster, ran + [last])
    assert {r: k for r, k in kinds.items() if k != ["queued", "start", "success"]} == {last: []}, kinds
    ledger = await db.fetch("SELECT run_id, claimed_by FROM fire_ledger WHERE schedule = 'minutely' AND slot < $1 "
                          "ORDER BY slot", datetime.fromisoformat(f"{DAY}T01:00:00+00:00"))
    assert [r["run_id"] for r in ledger] == ran + [last]
    assert len({r["claimed_by"] for r in ledger[:-1]}) == 2, ledger  # a queued some, b the rest
    rows = await db.fetch("SELECT backfill_id, count(*) FILTER (WHERE queued) AS queued, count(*) AS n "
                          "FROM backfill_runs GROUP BY backfill_id")
    assert [(r["backfill_id"], r["queued"], r["n"]) for r in rows] == [(bf, SLOTS, SLOTS)]
