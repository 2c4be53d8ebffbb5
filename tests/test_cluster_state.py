"""The shared state on a real PostgreSQL: a slot fires once and a launch is claimed once however many
schedulers ask at once, a lease taken over after expiry fences its old holder, and a database that is
stopped gives ServiceUnavailable, then works again once it is back."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from runwire_cluster.state import MIGRATIONS, ClusterState, describe_url
from shared.config import ClusterConfig
from shared.errors import LeaseLost, ServiceUnavailable
from tests.cluster_fixtures import Postgres, postgres  # noqa: F401  (the fixture)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def db_url(postgres: Postgres) -> str:  # noqa: F811
    """A fresh database of the module's server for each test."""
    return await postgres.new_database("t")


def cluster(url: str) -> ClusterConfig:
    return ClusterConfig(nats=["nats://127.0.0.1:4222"], state=url)


@asynccontextmanager
async def schedulers(url: str, n: int) -> AsyncIterator[list[ClusterState]]:
    """n separate pools: n schedulers on one database."""
    async with AsyncExitStack() as stack:
        states = [await stack.enter_async_context(await ClusterState.connect(cluster(url), max_size=3)) for _ in range(n)]
        await states[0].migrate()
        yield states


async def test_migrations_are_idempotent_and_concurrent_callers_take_turns(db_url: str) -> None:
    async with schedulers(db_url, 3) as states:
        results: list[int] = []

        async def migrate(s: ClusterState) -> None:
            results.append(await s.migrate())

        async with anyio.create_task_group() as tg:
            for s in states:
                tg.start_soon(migrate, s)
        assert results == [len(MIGRATIONS)] * 3
        async with states[0].pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM runwire_schema") == len(MIGRATIONS)


async def test_two_schedulers_claiming_the_same_slots_fire_each_once(db_url: str) -> None:
    slots = [T0 + timedelta(minutes=15 * i) for i in range(200)]
    async with schedulers(db_url, 2) as (a, b):
        won: dict[str, list[datetime]] = {"a": [], "b": []}

        async def claimer(state: ClusterState, me: str) -> None:
            for slot in slots:
                if await state.claim_slot("hourly", slot, f"run-{slot:%H%M}-{me}", me):
                    won[me].append(slot)

        async with anyio.create_task_group() as tg:
            tg.start_soon(claimer, a, "a")
            tg.start_soon(claimer, b, "b")
        assert sorted(won["a"] + won["b"]) == slots  # each slot once, none lost
        assert not set(won["a"]) & set(won["b"])
        winner = "a" if slots[7] in won["a"] else "b"
        assert await b.slot_run("hourly", slots[7]) == f"run-{slots[7]:%H%M}-{winner}"
        assert not await a.claim_slot("hourly", slots[7], "late", "a")  # later claims lose too
        assert await a.claim_slot("other", slots[7], "r", "a")  # the key is (schedule, slot)


async def test_launches_are_claimed_once_by_concurrent_workers(db_url: str) -> None:
    async with schedulers(db_url, 3) as states:
        run_ids = [f"run-{i:04d}" for i in range(300)]
        for r in run_ids:
            assert await states[0].add_launch(r, "demo", {"n": 1, "items": ["a"]})
        assert not await states[1].add_launch(run_ids[0], "demo", {})  # a retried launch: not queued twice
        claimed: list[tuple[str, str]] = []

        async def worker(state: ClusterState, me: str) -> None:
            while batch := await state.claim_launches(me, limit=7):
                claimed.extend((launch.run_id, me) for launch in batch)
                assert batch[0].params == {"n": 1, "items": ["a"]}

        async with anyio.create_task_group() as tg:
            for i in range(6):  # 2 workers on each of 3 pools
                tg.start_soon(worker, states[i % 3], f"w{i}")
        counts = Counter(r for r, _ in claimed)
        assert sorted(counts) == run_ids and set(counts.values()) == {1}
        assert len({w for _, w in claimed}) > 1  # the work was shared, not done by one worker alone


async def test_a_lease_taken_over_after_expiry_fences_its_old_holder(db_url: str) -> None:
    async with schedulers(db_url, 2) as (a, b):
        lease_a = await a.acquire_lease("runner:r1", "sched-a", ttl=0.5)
        assert lease_a is not None and lease_a.attempt == 1
        assert await b.acquire_lease("runner:r1", "sched-b", ttl=0.5) is None  # live: not b's
        lease_a = await a.renew_lease(lease_a, ttl=0.5)
        async with a.fenced(lease_a) as conn:  # a write under a current token goes through
            await conn.execute("CREATE TABLE fenced_writes (who text)")
            await conn.execute("INSERT INTO fenced_writes VALUES ('a')")
        # a stops renewing (killed with -9); after expiry b takes over with the next attempt
        deadline = time.monotonic() + 10
        lease_b = None
        while lease_b is None and time.monotonic() < deadline:
            await anyio.sleep(0.1)
            lease_b = await b.acquire_lease("runner:r1", "sched-b", ttl=30)
        assert lease_b is not None and lease_b.attempt == 2 and lease_b.holder == "sched-b"
        with pytest.raises(LeaseLost, match="sched-a's attempt 1 is no longer current.*attempt 2"):
            await a.renew_lease(lease_a, ttl=30)
        with pytest.raises(LeaseLost):
            async with a.fenced(lease_a) as conn:
                await conn.execute("INSERT INTO fenced_writes VALUES ('a, late')")
        async with b.fenced(lease_b) as conn:
            await conn.execute("INSERT INTO fenced_writes VALUES ('b')")
            assert await conn.fetchval("SELECT string_agg(who, ',' ORDER BY who) FROM fenced_writes") == "a,b"
        await a.release_lease(lease_a)  # an old token cannot release the new holder's lease either
        assert await a.acquire_lease("runner:r1", "sched-a", ttl=1) is None
        await b.release_lease(lease_b)  # a clean stop frees it at once
        lease_a2 = await a.acquire_lease("runner:r1", "sched-a", ttl=1)
        assert lease_a2 is not None and lease_a2.attempt == 3


async def test_the_runner_registry(db_url: str) -> None:
    async with schedulers(db_url, 1) as (s,):
        await s.register_runner("r1", "tcp://10.0.0.5:5556", "tcp://10.0.0.5:5558", 4)
        await s.register_runner("r2", "tcp://10.0.0.6:5556", "tcp://10.0.0.6:5558", 2)
        await s.register_runner("r2", "tcp://10.0.0.7:5556", "tcp://10.0.0.7:5558", 8)  # re-registered elsewhere
        runners = await s.runners()
        assert [(r.runner_id, r.publish, r.capacity) for r in runners] == [
            ("r1", "tcp://10.0.0.5:5556", 4), ("r2", "tcp://10.0.0.7:5556", 8)]
        async with s.pool.acquire() as conn:
            await conn.execute("UPDATE runners SET heartbeat_at = now() - interval '1 minute' WHERE runner_id = 'r1'")
        assert [r.runner_id for r in await s.runners(alive_within=30)] == ["r2"]
        assert await s.runner_heartbeat("r1")
        assert [r.runner_id for r in await s.runners(alive_within=30)] == ["r1", "r2"]
        assert await s.remove_runner("r1") and not await s.runner_heartbeat("r1")
        with pytest.raises(asyncpg.CheckViolationError):
            await s.register_runner("r3", "tcp://x:1", "tcp://x:2", 0)


def test_urls_are_described_without_credentials() -> None:
    assert describe_url("postgresql://u:pw@db.example:6543/runwire") == "db.example:6543/runwire"


async def test_a_stopped_database_is_unavailable_then_works_again(postgres: Postgres, db_url: str) -> None:  # noqa: F811
    async with schedulers(db_url, 1) as (s,):
        assert await s.claim_slot("s", T0, "r0", "a")
        postgres.stop("fast")
        try:
            for call in (lambda: s.claim_slot("s", T0 + timedelta(hours=1), "r1", "a"), lambda: s.runners()):
                with pytest.raises(ServiceUnavailable) as e:
                    await call()
                msg = str(e.value)
                assert "cluster.state" in msg and f"127.0.0.1:{postgres.port}" in msg, msg
            with pytest.raises(ServiceUnavailable):
                await ClusterState.connect(cluster(db_url))
        finally:
            postgres.start()
        deadline = time.monotonic() + 20
        while True:  # pooled connections broken by the stop are replaced as calls fail on them
            try:
                assert await s.claim_slot("s", T0 + timedelta(hours=1), "r1", "a")
                break
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                await anyio.sleep(0.1)
        assert not await s.claim_slot("s", T0, "r0-again", "a")  # what was written before is still there
        assert await s.slot_run("s", T0 + timedelta(hours=1)) == "r1"
