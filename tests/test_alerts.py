"""Alerts end to end: the real scheduler and runner as subprocesses, webhooks received by a real aiohttp
server on loopback (one answering 200, one 500 then 200, a closed port), the attempts as recorded in
`<home>/alerts/<run_id>.jsonl` and served by the gateway's run detail.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from aiohttp import web

from shared.alertlog import read_attempts
from shared.control import Cancel, ControlClient, GetRun, Launch, ListRuns
from tests.harness import Service, free_port
from tests.test_scheduler_service import SLOW, run_status, setup, wait_until

BROKEN = SLOW + """
[pipelines.broken]
[[pipelines.broken.stages]]
name = "fine"
command = ["{python}", "-c", "pass"]
[[pipelines.broken.stages]]
name = "boom"
command = ["{python}", "-c", "import sys; sys.exit(3)"]
"""


class Hook:
    """A webhook receiver: answers `answers` in turn (then 200) and keeps every request."""

    def __init__(self, port: int, answers: list[int] | None = None) -> None:
        self.port = port
        self.answers = list(answers or [])
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), json.loads(await request.read())))
        status = self.answers.pop(0) if self.answers else 200
        return web.Response(status=status, text="boom" if status >= 300 else "ok")

    def bodies(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [b for _, b in self.requests if kind is None or b["kind"] == kind]


@asynccontextmanager
async def serving(hook: Hook) -> AsyncIterator[Hook]:
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", hook.port).start()
        yield hook
    finally:
        await runner.cleanup()


def alert_section(name: str, url: str, on: list[str], *extra: str) -> str:
    """An `[alerts.<name>]` table with quick retries; `extra`: more TOML lines."""
    lines = [f"[alerts.{name}]", f'url = "{url}"', f"on = {json.dumps(on)}", "backoff = 0.3", "backoff_max = 0.6",
             "timeout = 2", *extra]
    return "\n" + "\n".join(lines) + "\n"


def start(tmp_path: Path, services: list[Service], body: str, runner: bool = True) -> tuple[Path, Any, Service]:
    cfg, settings = setup(tmp_path, body)
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(sched)
    if runner:
        services.append(Service("runner_svc", cfg, tmp_path).start())
    return cfg, settings, sched


async def test_a_failed_run_alerts_with_its_failed_stages_and_the_gateway_shows_it(
        tmp_path: Path, services: list[Service]) -> None:
    async with serving(Hook(free_port())) as hook:
        body = BROKEN + alert_section("ops", hook.url, ["failure", "cancelled"], 'pipelines = ["broken", "slow"]',
                                      'headers = { Authorization = "Bearer hook-secret" }')
        body += alert_section("sleepy-only", hook.url, ["failure"], 'pipelines = ["sleepy"]')
        cfg, settings, _ = start(tmp_path, services, body)
        gateway = Service("gateway_svc", cfg, tmp_path).start()
        services.append(gateway)
        async with ControlClient(settings.config.scheduler.control) as client:
            ok = (await client.call(Launch(pipeline="sleepy", params={"seconds": 0.1}))).run_id
            await wait_until("success", lambda: run_status(client, ok, "success"))
            run_id = (await client.call(Launch(pipeline="broken", params={}))).run_id
            await wait_until("failure", lambda: run_status(client, run_id, "failure"))
            await wait_until("the failure's webhook", lambda: hook.bodies("failure"))
            [(headers, b)] = [r for r in hook.requests if r[1]["kind"] == "failure"]
            port = settings.config.gateway.port
            assert b["run_id"] == run_id and b["pipeline"] == "broken" and b["outcome"] == "failure"
            assert b["alert"] == "ops" and b["failed_stages"] == ["boom"]
            assert b["url"] == f"http://127.0.0.1:{port}/#/runs/{run_id}"
            assert b["text"].startswith(f"runwire: run {run_id} of broken failed in boom: ") and b["url"] in b["text"]
            assert headers["X-Runwire-Alert-Id"] == b["id"] == f"{run_id}.ops.failure"
            assert headers["Authorization"] == "Bearer hook-secret" and headers["X-Runwire-Alert-Attempt"] == "1"

            slow = (await client.call(Launch(pipeline="slow", params={"seconds": 30.0}))).run_id
            await wait_until("running", lambda: run_status(client, slow, "running"))
            await client.call(Cancel(run_id=slow))
            await wait_until("the cancel's webhook", lambda: hook.bodies("cancelled"))
            assert hook.bodies("cancelled")[0]["run_id"] == slow

        [attempt] = await wait_until("the attempt recorded", lambda: read_attempts(settings.home, run_id))
        assert (attempt.attempt, attempt.status, attempt.outcome, attempt.error) == (1, 200, "sent", None)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/api/runs/{run_id}") as resp:
                detail = await resp.json()
        assert [(a["alert"], a["kind"], a["outcome"], a["attempts"], a["status"]) for a in detail["alerts"]] == [
            ("ops", "failure", "sent", 1, 200)]
        assert len(hook.requests) == 2  # the successful run and the other alert's pipeline sent nothing


async def test_a_down_endpoint_gets_its_retries_recorded_and_runs_go_on(tmp_path: Path, services: list[Service]) -> None:
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    body = BROKEN + alert_section("ops", down, ["failure"], "retries = 2")
    _, settings, _ = start(tmp_path, services, body)
    async with ControlClient(settings.config.scheduler.control) as client:
        run_id = (await client.call(Launch(pipeline="broken", params={}))).run_id
        await wait_until("failure", lambda: run_status(client, run_id, "failure"))
        nxt = (await client.call(Launch(pipeline="sleepy", params={"seconds": 0.1}))).run_id
        await wait_until("the next run", lambda: run_status(client, nxt, "success"))
    attempts = await wait_until("three attempts", lambda: (a := read_attempts(settings.home, run_id)) and
                                a[-1].outcome == "failed" and a)
    assert [(a.attempt, a.outcome, a.status) for a in attempts] == [(1, "retrying", None), (2, "retrying", None),
                                                                   (3, "failed", None)]
    assert all("Cannot connect" in (a.error or "") for a in attempts), attempts


async def test_a_500_then_200_records_two_attempts_one_sent(tmp_path: Path, services: list[Service]) -> None:
    async with serving(Hook(free_port(), answers=[500])) as hook:
        _, settings, _ = start(tmp_path, services, BROKEN + alert_section("ops", hook.url, ["failure"]))
        async with ControlClient(settings.config.scheduler.control) as client:
            run_id = (await client.call(Launch(pipeline="broken", params={}))).run_id
            await wait_until("failure", lambda: run_status(client, run_id, "failure"))
        attempts = await wait_until("the success", lambda: (a := read_attempts(settings.home, run_id)) and
                                    a[-1].outcome == "sent" and a)
        assert [(a.attempt, a.status, a.outcome) for a in attempts] == [(1, 500, "retrying"), (2, 200, "sent")]
        assert attempts[0].error == "HTTP 500: boom"
        assert [h["X-Runwire-Alert-Attempt"] for h, _ in hook.requests] == ["1", "2"]
        assert {h["X-Runwire-Alert-Id"] for h, _ in hook.requests} == {f"{run_id}.ops.failure"}


async def test_a_long_run_alerts_once_while_it_runs(tmp_path: Path, services: list[Service]) -> None:
    async with serving(Hook(free_port())) as hook:
        body = SLOW + alert_section("slowpoke", hook.url, ["long_run"], 'long_run_after = "2s"')
        _, settings, _ = start(tmp_path, services, body)
        async with ControlClient(settings.config.scheduler.control) as client:
            run_id = (await client.call(Launch(pipeline="slow", params={"seconds": 30.0}))).run_id
            [b] = await wait_until("the long-run webhook", lambda: hook.bodies("long_run"))
            assert (await client.call(GetRun(run_id=run_id))).status == "running"
            assert b["run_id"] == run_id and b["outcome"] == "running" and b["running_for_s"] >= 2.0
            assert "has been running for" in b["text"]
            await anyio.sleep(2.0)  # several more looks at the run: it was alerted already
            assert len(hook.bodies("long_run")) == 1
            await client.call(Cancel(run_id=run_id))
            await wait_until("cancelled", lambda: run_status(client, run_id, "cancelled"))


async def test_a_skipped_slot_and_a_lost_runner_alert(tmp_path: Path, services: list[Service]) -> None:
    async with serving(Hook(free_port())) as hook:
        body = SLOW + """
[schedules.tick]
pipeline = "slow"
every = "2s"
fire_at_start = true
overlap = "skip"
params = { seconds = 20.0 }
""" + alert_section("ops", hook.url, ["skipped", "runner_lost"])
        cfg, settings = setup(tmp_path, body)
        services.append(Service("scheduler_svc", cfg, tmp_path).start())
        runner = Service("runner_svc", cfg, tmp_path).start()
        services.append(runner)
        async with ControlClient(settings.config.scheduler.control) as client:
            skipped = (await wait_until("a skipped slot's webhook", lambda: hook.bodies("skipped")))[0]
            assert skipped["run_id"].endswith("-tick") and skipped["schedule"] == "tick"
            assert skipped["outcome"] == "cancelled" and "overlap" in skipped["msg"]
            assert skipped["text"].startswith("runwire: schedule tick skipped its slot ")
            running = [r for r in (await client.call(ListRuns(limit=100))).runs if r.status == "running"]
            assert len(running) == 1
            runner.kill9()
            [lost] = await wait_until("the runner-lost webhook", lambda: hook.bodies("runner_lost"))
            assert lost["run_id"] == running[0].run_id and lost["outcome"] == "failure"
            assert lost["msg"].startswith("runner lost: no heartbeat from test-runner")


async def test_a_delivery_interrupted_by_kill9_resumes_after_restart_and_is_not_repeated(
        tmp_path: Path, services: list[Service]) -> None:
    hook = Hook(free_port())  # not listening yet: the first attempts fail
    body = BROKEN + alert_section("ops", hook.url, ["failure"], "retries = 50")
    cfg, settings, sched = start(tmp_path, services, body)
    async with ControlClient(settings.config.scheduler.control) as client:
        run_id = (await client.call(Launch(pipeline="broken", params={}))).run_id
        await wait_until("failure", lambda: run_status(client, run_id, "failure"))
    await wait_until("two failed attempts", lambda: len(read_attempts(settings.home, run_id)) >= 2)
    sched.kill9()
    before = read_attempts(settings.home, run_id)
    async with serving(hook):
        services.append(Service("scheduler_svc", cfg, tmp_path).start())
        await wait_until("the webhook after the restart", lambda: hook.requests)
        attempts = await wait_until("sent", lambda: (a := read_attempts(settings.home, run_id)) and
                                    a[-1].outcome == "sent" and a)
        assert attempts[:len(before)] == before and all(a.outcome == "retrying" for a in before)
        numbers = [a.attempt for a in attempts]
        assert numbers == sorted(set(numbers)) and numbers[0] == 1  # numbered on across the restart
        [(headers, b)] = hook.requests
        assert headers["X-Runwire-Alert-Id"] == b["id"] == f"{run_id}.ops.failure"
        assert int(headers["X-Runwire-Alert-Attempt"]) == attempts[-1].attempt
        # a clean restart after the success: nothing is sent again
        services[-1].stop()
        services.append(Service("scheduler_svc", cfg, tmp_path).start())
        await anyio.sleep(2.0)
        assert len(hook.requests) == 1
