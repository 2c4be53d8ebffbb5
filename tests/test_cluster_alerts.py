"""Cluster mode's alert deliveries live in the cluster's PostgreSQL (scheduler_svc/cluster_alerts.py):
a scheduler taking over resumes the delivery the last leader left pending and makes none twice. Two
leader terms in turn (the real `Alerts` on one real database, a real aiohttp webhook on loopback); the
first is cut off right after a failed attempt, as a kill -9 of its scheduler would."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from runwire_cluster.state import ClusterState
from scheduler_svc.alert_rules import rules_of
from scheduler_svc.alerts import Alerts
from scheduler_svc.cluster_alerts import ClusterAlertStore
from scheduler_svc.runbook import RunBook
from scheduler_svc.runs import RunRecord
from shared.config import AlertConfig, ClusterConfig
from tests.cluster_fixtures import Postgres, postgres  # noqa: F401  (fixture)
from tests.harness import free_port
from tests.test_alerts import Hook, serving

pytestmark = pytest.mark.timeout(120)


def failed_run() -> RunRecord:
    return RunRecord(run_id="20261202T120000000000Z-nightly", pipeline="nightly", params={}, phase="ended",
                     outcome="failure", ended_at="2026-12-02T12:00:05+00:00", msg="stage boom failed")


async def until(what: str, check: object, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            await anyio.sleep(0.05)


async def test_a_takeover_resumes_the_pending_delivery_and_repeats_no_alert(
        tmp_path: Path, postgres: Postgres) -> None:  # noqa: F811
    db = await postgres.new_database("alerts")
    async with await ClusterState.connect(ClusterConfig(nats=["nats://unused:4222"], state=db)) as state:
        await state.migrate()
        async with serving(Hook(free_port(), answers=[500])) as hook:
            rules = rules_of({"ops": AlertConfig(url=hook.url, on=["failure"], retries=3, backoff=0.5, timeout=5)})
            run = failed_run()

            def term() -> Alerts:  # a leader's term: its own objects, the cluster's rows
                return Alerts(rules, ClusterAlertStore(state), RunBook(), tmp_path / "events", tmp_path, "")

            first = term()
            async with anyio.create_task_group() as tg:
                await tg.start(first.run)
                first.notice(run)
                await until("the first attempt (answered 500)", lambda: len(hook.requests) == 1)
                tg.cancel_scope.cancel()  # the leader dies before its retry

            second = term()
            async with anyio.create_task_group() as tg:
                await tg.start(second.run)
                second.notice(run)  # the new leader sees the same end (adopted before it was marked ended)
                await until("the retry by the new leader", lambda: len(hook.requests) == 2)
                await anyio.sleep(1.0)  # room for a wrongly made second delivery to show
                tg.cancel_scope.cancel()

    ids = {h["X-Runwire-Alert-Id"] for h, _ in hook.requests}
    assert len(ids) == 1 and len(hook.requests) == 2, hook.requests
    assert [h["X-Runwire-Alert-Attempt"] for h, _ in hook.requests] == ["1", "2"]
    async with await ClusterState.connect(ClusterConfig(nats=["nats://unused:4222"], state=db)) as state:
        async with state.connection() as conn:
            rows = await conn.fetch("SELECT id, attempts, state FROM alert_deliveries")
    assert [(r["attempts"], r["state"]) for r in rows] == [(2, "sent")], rows
