"""A 503 means the run will not happen, and a retry with the same Idempotency-Key never makes a second
run: the control client leaves the server a margin before it gives up, the scheduler checks a launch's
deadline again once the run is durably queued, and keys map to their first run for a day, across a
restart. Real scheduler (a subprocess, or in this process where time must be steered), real gateway.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio

from scheduler_svc.launches import EXPIRED
from scheduler_svc.service import Scheduler
from shared.config import Settings, load_settings
from shared.control import ControlClient, Launch, Reply, check_idempotency_key, deadline_margin, encode
from shared.errors import ProtocolError, ServiceUnavailable
from shared.journal import list_run_ids, read_events
from shared.replies import LaunchResult
from tests.harness import SLEEP_PIPELINE, Service, free_port, write_config
from tests.test_gateway_helpers import running_gateway


def settings_for(tmp: Path, scheduler: str = "") -> Settings:
    cfg, _ = write_config(tmp, SLEEP_PIPELINE, scheduler=scheduler)
    return load_settings(cfg)


def runs_with_key(settings: Settings, key: str) -> dict[str, list[tuple[str, str, str]]]:
    """run id -> its pipeline events, for every journal whose queued event carries `key`."""
    out = {}
    for run_id in list_run_ids(settings.journal_dir):
        events = read_events(settings.journal_dir, run_id)
        if events and (events[0].data or {}).get("idempotency_key") == key:
            out[run_id] = [(e.stage, e.event, e.msg) for e in events if e.stage == "pipeline"]
    return out


async def post_launch(http: aiohttp.ClientSession, base: str, body: dict[str, Any],
                      key: str | None) -> tuple[int, dict[str, Any], Any]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    async with http.post(base + "/api/runs", json=body, headers=headers) as resp:
        return resp.status, json.loads(await resp.text()), resp.headers


# ---------------------------------------------------------------------------- the key and the client


def test_idempotency_keys_are_visible_ascii_up_to_255() -> None:
    assert check_idempotency_key("a" * 255) == "a" * 255
    assert check_idempotency_key("order-42/retry:ok_~!") == "order-42/retry:ok_~!"
    for bad in ["", "a" * 256, "with space", "tab\there", "caf\u00e9", "nul\x00", "del\x7f", None, 42]:
        with pytest.raises(ProtocolError, match="Idempotency-Key"):
            check_idempotency_key(bad)


@pytest.fixture
def zctx() -> Iterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


async def test_the_server_may_use_its_whole_deadline_even_after_a_slow_connect(zctx: zmq.asyncio.Context) -> None:
    """The deadline is fixed when the call starts and sent a margin before the client gives up: a server
    that answers just after the deadline it was given (it had committed by then) is still heard."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    timeout = 5.0
    started = time.time()
    seen: dict[str, float] = {}
    answered = anyio.Event()

    async def late_server() -> None:
        await anyio.sleep(1.5)  # the client waits this long to connect
        sock = zctx.socket(zmq.ROUTER)
        sock.bind(endpoint)
        try:
            routing, payload = await sock.recv_multipart()
            req = msgspec.msgpack.decode(payload)  # as any server would read it
            seen["deadline"] = req["deadline"]
            await anyio.sleep(max(0.0, req["deadline"] - time.time()) + 0.25)  # answers just after it
            reply = Reply(id=req["id"], ok=True, result={"run_id": "r", "status": "queued"})
            await sock.send_multipart([routing, encode(reply)])
            await answered.wait()  # (a close with linger 0 would drop the reply still queued)
        finally:
            sock.close(linger=0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(late_server)
        try:
            async with ControlClient(endpoint, timeout, zctx) as client:
                assert await client.call(Launch(pipeline="sleepy")) == LaunchResult(run_id="r", status="queued")
        finally:
            answered.set()
    # fixed when the call started (not after the wait to connect), a margin before the client gives up
    assert started + timeout - deadline_margin(timeout) <= seen["deadline"] < started + timeout


# ---------------------------------------------------------------------------- the deadline at the commit


async def test_a_launch_whose_deadline_passes_while_it_is_queued_ends_cancelled_and_never_runs(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    sched = Scheduler(settings)
    launches = sched.control.launches
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        # the deadline is 10 s away when the request is read, gone once the `queued` event is durable
        t0 = time.time()
        launches.now = lambda: t0 + (20.0 if any(True for _ in list_run_ids(settings.journal_dir)) else 0.0)
        with pytest.raises(ServiceUnavailable, match="expired before it was acknowledged"):
            await launches.launch(Launch(pipeline="sleepy", idempotency_key="k-1", deadline=t0 + 10.0))
        [first] = runs_with_key(settings, "k-1").items()
        assert first[1][0][1] == "queued" and first[1][-1][1] == "cancelled" and EXPIRED in first[1][-1][2]
        assert [e for e in first[1] if e[1] == "start"] == []
        assert first[0] not in sched.book.queue and first[0] not in sched.book.active
        # the key was never acknowledged: a retry in time launches (once), and is answered from then on
        launches.now = time.time
        again = await launches.launch(Launch(pipeline="sleepy", idempotency_key="k-1", deadline=time.time() + 10))
        assert again.status == "queued" and again.run_id != first[0] and again.run_id in sched.book.queue
        third = await launches.launch(Launch(pipeline="sleepy", idempotency_key="k-1", deadline=time.time() + 10))
        assert third == LaunchResult(run_id=again.run_id, status="queued", replayed=True)
        assert len(runs_with_key(settings, "k-1")) == 2  # the expired one (cancelled) and the one run
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------------------- scheduler + gateway


async def test_same_key_same_run_other_body_409_bad_header_400_concurrent_one_run_and_restart(
        tmp_path: Path, services: list[Service]) -> None:
    settings = settings_for(tmp_path)
    sched = Service("scheduler_svc", settings.path, tmp_path).start()
    services.append(sched)
    body = {"pipeline": "sleepy", "params": {"seconds": 0.1}}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        status, first, headers = await post_launch(http, gw.base, body, "order-1")
        assert status == 202 and first["status"] == "queued" and "Idempotent-Replayed" not in headers
        status, again, headers = await post_launch(http, gw.base, body, "order-1")
        assert status == 202 and again == first and headers["Idempotent-Replayed"] == "true"
        assert list(runs_with_key(settings, "order-1")) == [first["run_id"]]

        status, err, _ = await post_launch(http, gw.base, {"pipeline": "sleepy", "params": {"seconds": 0.2}}, "order-1")
        assert status == 409 and err["error"]["code"] == "conflict" and "order-1" in err["error"]["message"]
        status, _, _ = await post_launch(http, gw.base, body, None)  # no key: a new run each time
        assert status == 202

        for bad in ["x" * 256, "two words", ""]:
            status, err, _ = await post_launch(http, gw.base, body, bad)
            assert status == 400 and err["error"]["code"] == "bad_request", (bad, err)
            assert "Idempotency-Key" in err["error"]["message"]

        answers = []
        async with anyio.create_task_group() as tg:
            async def one() -> None:
                answers.append(await post_launch(http, gw.base, body, "order-2"))
            for _ in range(6):
                tg.start_soon(one)
        assert {a[0] for a in answers} == {202}
        assert len({a[1]["run_id"] for a in answers}) == 1 and len(runs_with_key(settings, "order-2")) == 1

        # the key survives a restart (kill -9: nothing is flushed at exit) ...
        sched.kill9()
        sched = Service("scheduler_svc", settings.path, tmp_path).start()
        services.append(sched)
        status, after, headers = await post_launch(http, gw.base, body, "order-1")
        assert status == 202 and after["run_id"] == first["run_id"] and headers["Idempotent-Replayed"] == "true"
        # ... and the loss of the state file: the key is in the run's queued event, and journals are the truth
        sched.stop()
        for f in settings.state_dir.glob("scheduler.sqlite3*"):
            f.unlink()
        sched = Service("scheduler_svc", settings.path, tmp_path).start()
        services.append(sched)
        status, after, _ = await post_launch(http, gw.base, body, "order-2")
        assert status == 202 and after["run_id"] == answers[0][1]["run_id"]
        status, _, _ = await post_launch(http, gw.base, {"pipeline": "sleepy", "params": {"seconds": 0.3}}, "order-2")
        assert status == 409
    assert len(runs_with_key(settings, "order-1")) == 1 and len(runs_with_key(settings, "order-2")) == 1


async def test_a_503_during_a_scheduler_stall_means_the_run_never_happens(tmp_path: Path,
                                                                          services: list[Service]) -> None:
    """The scheduler is stopped while launches with keys are in flight, at several moments: each answer is
    202 or 503; a key answered 503 has no run that runs, except when the stop fell between the
    scheduler's last deadline check and its answer leaving (the run was queued in time, the answer came
    late: a known gap, see the README): then the retry with the key answers that run, replayed. Either
    way the retry with the key gives exactly one run."""
    settings = settings_for(tmp_path, scheduler="request_timeout = 1.0")
    sched = Service("scheduler_svc", settings.path, tmp_path).start()
    services.append(sched)
    services.append(Service("runner_svc", settings.path, tmp_path).start())
    body = {"pipeline": "sleepy", "params": {"seconds": 0.05}}
    answered: dict[str, int] = {}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        for i in range(8):
            key = f"stall-{i}"
            async with anyio.create_task_group() as tg:
                async def launch(key: str = key) -> None:
                    answered[key] = (await post_launch(http, gw.base, body, key))[0]
                tg.start_soon(launch)
                await anyio.sleep(0.002 * i)  # from before the request arrives to after it is committed
                os.kill(sched.pid, signal.SIGSTOP)
                try:
                    await anyio.sleep(1.5)  # beyond the gateway's request_timeout
                finally:
                    os.kill(sched.pid, signal.SIGCONT)
        assert set(answered.values()) <= {202, 503}, answered
        await anyio.sleep(2.0)  # what the scheduler would still do with a late request, it has done now
        late: dict[str, str] = {}  # key answered 503 -> its run queued in time, answered too late
        for key, status in answered.items():
            runs = runs_with_key(settings, key)
            if status == 503:
                for run_id, events in runs.items():
                    if events[-1][1] == "cancelled" and EXPIRED in events[-1][2]:
                        assert "start" not in [e[1] for e in events], (key, run_id, events)
                    else:
                        assert key not in late, (key, runs)  # at most one
                        late[key] = run_id
            else:
                assert len(runs) == 1
        for key in answered:  # every client retries once
            status, reply, headers = await post_launch(http, gw.base, body, key)
            assert status == 202
            if key in late:
                assert reply["run_id"] == late[key] and headers.get("Idempotent-Replayed") == "true", (key, reply)
        with anyio.fail_after(60):
            for key in answered:
                while True:
                    ran = {r: ev for r, ev in runs_with_key(settings, key).items() if ev[-1][1] != "cancelled"}
                    if len(ran) == 1 and next(iter(ran.values()))[-1][1] == "success":
                        break
                    assert len(ran) <= 1, (key, ran)
                    await anyio.sleep(0.1)
