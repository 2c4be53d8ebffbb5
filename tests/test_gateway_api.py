"""The gateway's HTTP API and its input checks, against the real gateway app on a real port.

The control routes talk to a REAL scheduler (`python -m scheduler_svc` as a subprocess); runner
heartbeats come from the test-side `FakePublisher` (the wire contract's Heartbeat on a raw PUB socket).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec

from gateway_svc.keys import HUB
from shared.httpapi import Health, JournalDirHealth
from shared.ids import new_run_id
from shared.journal import journal_path
from tests.harness import Service
from tests.test_gateway_helpers import FakePublisher, collect, make_settings, running_gateway


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return json.loads(await resp.text())


async def test_token_is_required_on_api_ws_and_sse_but_not_healthz(tmp_path: Path) -> None:
    settings, _ = make_settings(tmp_path)
    settings = dataclasses.replace(settings, token="s3cret-token")
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        for path in ("/api/runs", "/api/pipelines", "/api/events", "/metrics"):
            async with http.get(gw.base + path) as resp:
                assert resp.status == 401, path
                body = await _json(resp)
                assert body["error"]["code"] == "unauthorized"
            async with http.get(gw.base + path, headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401, path
        async with http.post(gw.base + "/api/runs", json={"pipeline": "sleepy"}) as resp:
            assert resp.status == 401
        async with http.get(gw.base + "/api/runs", headers={"Authorization": "Bearer s3cret-token"}) as resp:
            assert resp.status == 200
        # ?token= only where browsers cannot set a header (WebSocket, SSE): elsewhere it is refused even
        # when right (and with a right header too), saying to use the header
        for path in ("/api/pipelines", "/api/runs", "/metrics"):
            for headers in ({}, {"Authorization": "Bearer s3cret-token"}):
                async with http.get(gw.base + path + "?token=s3cret-token", headers=headers) as resp:
                    assert resp.status == 401, path
                    message = (await _json(resp))["error"]["message"]
                    assert "Authorization: Bearer" in message and "logs" in message
        async with http.post(gw.base + "/api/runs?token=s3cret-token", json={"pipeline": "sleepy"}) as resp:
            assert resp.status == 401
        async with http.get(gw.base + "/api/events?token=s3cret-token") as resp:
            assert resp.status == 200  # EventSource cannot set headers
            assert b"hello" in await resp.content.readuntil(b"hello")
        try:
            await http.ws_connect(f"{gw.ws}/ws/events")
            raise AssertionError("a WebSocket without token was accepted")
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 401
        got = await collect(http, f"{gw.ws}/ws/events?token=s3cret-token", max_frames=1)
        assert got.frames[0]["type"] == "hello"
        async with http.get(gw.base + "/healthz") as resp:
            assert resp.status in (200, 503)  # open: its answer, not a 401
        async with http.get(gw.base + "/") as resp:
            assert resp.status == 200


async def test_bad_run_ids_are_400_and_touch_no_file(tmp_path: Path) -> None:
    settings, _ = make_settings(tmp_path)
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"run_id": "x"}\n')
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        bad = ["..%2F..%2Fsecret", "..", "%2E%2E", "a%00b", "-leading-dash", "x" * 200, "a%20b", "a;b"]
        for rid in bad:
            for suffix in ("", "/events"):
                url = aiohttp.client.URL(f"{gw.base}/api/runs/{rid}{suffix}", encoded=True)
                async with http.get(url) as resp:
                    body = await _json(resp)
                    assert resp.status == 400, (rid, resp.status, body)
                    assert body["error"]["code"] == "invalid_run_id"
            url = aiohttp.client.URL(f"{gw.base}/api/runs/{rid}/cancel", encoded=True)
            async with http.post(url) as resp:
                assert resp.status == 400, rid
        async with http.get(aiohttp.client.URL(f"{gw.base}/api/runs/..%2F..%2Fsecret", encoded=True)) as resp:
            assert resp.status == 400
            assert (await _json(resp))["error"]["code"] == "invalid_run_id"
        try:
            await http.ws_connect(aiohttp.client.URL(f"{gw.ws}/ws/events/..%2Fsecret", encoded=True))
            raise AssertionError("accepted")
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 400
        for query in ("after_seq=-1", "after_seq=abc", "after_seq=99999999999999999999999", "limit=0", "limit=100000"):
            async with http.get(f"{gw.base}/api/runs/{new_run_id()}/events?{query}") as resp:
                assert resp.status == 400, query
        for query in ("limit=0", "limit=1001", "status=bogus", "include_probes=maybe"):
            async with http.get(f"{gw.base}/api/runs?{query}") as resp:
                assert resp.status == 400, query
        async with http.get(f"{gw.base}/api/runs/{new_run_id()}") as resp:
            assert resp.status == 404
            assert (await _json(resp))["error"]["code"] == "not_found"


async def test_oversized_and_malformed_bodies(tmp_path: Path) -> None:
    settings, _ = make_settings(tmp_path, gateway="max_body_bytes = 1024")
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        big = {"pipeline": "sleepy", "params": {"seconds": 0.1}, "pad": "x" * 5000}
        async with http.post(gw.base + "/api/runs", json=big) as resp:
            assert resp.status == 413
            assert (await _json(resp))["error"]["code"] == "body_too_large"

        async def chunks() -> Any:  # no Content-Length: refused while reading
            for _ in range(10):
                yield b"x" * 512

        async with http.post(gw.base + "/api/runs", data=chunks()) as resp:
            assert resp.status == 413
        for body in (b"not json", b"[1,2]", b'{"pipeline": 3}', b'{"pipeline": "sleepy", "params": []}',
                     b'{"pipeline": "sleepy", "extra": 1}'):
            async with http.post(gw.base + "/api/runs", data=body, headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400, body
                assert "error" in await _json(resp)
        # unknown pipeline and bad params are refused before the scheduler is asked (none runs here)
        async with http.post(gw.base + "/api/runs", json={"pipeline": "nope"}) as resp:
            assert resp.status == 400 and (await _json(resp))["error"]["code"] == "unknown_pipeline"
        async with http.post(gw.base + "/api/runs", json={"pipeline": "sleepy", "params": {"seconds": "soon"}}) as resp:
            assert resp.status == 400 and (await _json(resp))["error"]["code"] == "bad_params"


async def test_websocket_client_messages_ping_and_garbage(tmp_path: Path) -> None:
    settings, _ = make_settings(tmp_path)
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{gw.ws}/ws/events") as ws:
            assert (await ws.receive_json())["type"] == "hello"
            await ws.send_str('{"type": "ping"}')
            assert await ws.receive_json() == {"type": "pong"}
            await ws.send_str("garbage {")
            frame = await ws.receive_json()
            assert frame["type"] == "error" and frame["code"] == "bad_message"
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4400
        async with http.ws_connect(f"{gw.ws}/ws/events") as ws:
            await ws.receive_json()
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive_json())["code"] == "bad_message"


async def test_healthz_names_a_down_scheduler_and_a_journal_directory_mismatch(tmp_path: Path) -> None:
    settings, ports = make_settings(tmp_path)
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}", runner_id="r1")
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            # no heartbeat yet, no scheduler
            async with http.get(gw.base + "/healthz") as resp:
                body = await _json(resp)
                assert resp.status == 503
                assert set(body["failed"]) == {"scheduler", "runner"}
                assert f"127.0.0.1:{ports.control}" in body["checks"]["scheduler"]["detail"]
                assert "scheduler" in body["error"]["message"]
                # the answer is the Health Struct, every key present (a renamed field fails here)
                health = msgspec.convert(body, Health)
                assert set(body) == set(Health.__struct_fields__) and health.checks.runner.runners == {}
                assert set(body["checks"]["journal_dir"]) == set(JournalDirHealth.__struct_fields__)
                assert body["checks"]["event_stream"] is None and body["degraded"] == []  # single-host mode
            # the runner heartbeats with the same directory: only the scheduler fails
            with anyio.fail_after(10):
                while "r1" not in gw.app[HUB].publishers:
                    pub.heartbeat()
                    await anyio.sleep(0.1)
            async with http.get(gw.base + "/healthz") as resp:
                body = await _json(resp)
                assert resp.status == 503 and body["failed"] == ["scheduler"], body
                assert body["checks"]["runner"]["ok"] is True
            # now it says it writes elsewhere: the seed-000 cause, named loudly with both directories
            pub.journal_dir_claim = str(tmp_path / "elsewhere" / "events")
            with anyio.fail_after(10):
                while True:
                    pub.heartbeat()
                    await anyio.sleep(0.1)
                    async with http.get(gw.base + "/healthz") as resp:
                        body = await _json(resp)
                    if not body["checks"]["runner"]["ok"]:
                        break
            detail = body["checks"]["runner"]["detail"]
            assert "MISMATCH" in detail and str(tmp_path / "elsewhere" / "events") in detail
            assert str(settings.journal_dir) in detail
            assert resp.status == 503 and "runner" in body["failed"]
    finally:
        pub.close()


async def test_healthz_says_a_runner_that_sent_its_stopping_heartbeat_is_down_at_once(tmp_path: Path) -> None:
    """A clean stop ends with a heartbeat saying `stopping`: the runner is down from then on, not after
    runner_stale_after (set far beyond this test's length, so only `stopping` can fail the check). The
    heartbeat lists ended runs too: healthz counts them apart from the active ones."""
    settings, ports = make_settings(tmp_path, gateway="runner_stale_after = 600")
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}", runner_id="r1")
    try:
        ended = pub.begin()
        pub.emit(ended, "pipeline", "start", "s")
        ended_last = pub.emit(ended, "pipeline", "success", "done").seq
        active = pub.begin()
        pub.emit(active, "pipeline", "start", "s")
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            hub = gw.app[HUB]
            runs = {ended: ended_last, active: pub.writers[active].last_seq}
            with anyio.fail_after(10):
                while "r1" not in hub.publishers:
                    pub.heartbeat(runs)
                    await anyio.sleep(0.1)
            async with http.get(gw.base + "/healthz") as resp:
                body = await _json(resp)
            runner = body["checks"]["runner"]
            assert runner["ok"] is True, body
            assert runner["runners"]["r1"]["runs_listed"] == 2 and runner["runners"]["r1"]["runs_active"] == 1
            assert active in hub.claimed_runs()
            with anyio.fail_after(10):
                while not hub.publishers["r1"].hb.stopping:
                    pub.heartbeat(runs, stopping=True)
                    await anyio.sleep(0.1)
            async with http.get(gw.base + "/healthz") as resp:
                body = await _json(resp)
            assert resp.status == 503 and "runner" in body["failed"], body
            assert "runner r1 stopped" in body["checks"]["runner"]["detail"]
            assert body["checks"]["runner"]["runners"]["r1"]["stopping"] is True
            assert not hub.claimed_runs()  # the journal sweep covers its runs' tails now
            # a runner that starts again is up again
            with anyio.fail_after(10):
                while hub.publishers["r1"].hb.stopping:
                    pub.heartbeat(runs)
                    await anyio.sleep(0.1)
            async with http.get(gw.base + "/healthz") as resp:
                assert (await _json(resp))["checks"]["runner"]["ok"] is True
    finally:
        pub.close()


async def test_control_routes_against_a_real_scheduler(tmp_path: Path, services: list[Service]) -> None:
    settings, ports = make_settings(tmp_path, body=_PIPELINES)
    sched = Service("scheduler_svc", settings.path, tmp_path).start()
    services.append(sched)
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.base + "/api/runs", json={"pipeline": "sleepy", "params": {"seconds": 0.1}}) as resp:
            assert resp.status == 202, await resp.text()
            body = await _json(resp)
            assert body["status"] == "queued"
            run_id = body["run_id"]
        # no runner: the run waits, and the list says why (the scheduler's reason)
        with anyio.fail_after(10):
            while True:
                async with http.get(gw.base + "/api/runs?status=queued") as resp:
                    runs = (await _json(resp))["runs"]
                if runs:
                    break
                await anyio.sleep(0.1)
        assert runs[0]["run_id"] == run_id and runs[0]["pipeline"] == "sleepy"
        assert runs[0]["waiting"] and "runner" in runs[0]["waiting"]
        async with http.get(f"{gw.base}/api/runs/{run_id}") as resp:
            detail = await _json(resp)
            assert detail["status"] == "queued" and [s["name"] for s in detail["stages"]] == ["nap"]
            assert detail["stages"][0]["status"] == "pending" and detail["scheduler"]["run_id"] == run_id
        async with http.post(f"{gw.base}/api/runs/{run_id}/cancel") as resp:
            assert resp.status == 202, await resp.text()
        with anyio.fail_after(10):
            while True:
                async with http.get(f"{gw.base}/api/runs?status=cancelled") as resp:
                    if [r["run_id"] for r in (await _json(resp))["runs"]] == [run_id]:
                        break
                await anyio.sleep(0.1)
        async with http.post(f"{gw.base}/api/runs/{run_id}/cancel") as resp:
            assert resp.status == 409 and (await _json(resp))["error"]["code"] == "conflict"
        async with http.post(f"{gw.base}/api/runs/{new_run_id()}/cancel") as resp:
            assert resp.status == 404
        async with http.get(gw.base + "/api/schedules") as resp:
            schedules = (await _json(resp))["schedules"]
            assert [s["name"] for s in schedules] == ["nightly"]
        async with http.post(gw.base + "/api/schedules/nightly/pause") as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(gw.base + "/api/schedules/nightly/resume") as resp:
            assert resp.status == 200
        async with http.post(gw.base + "/api/schedules/nope/pause") as resp:
            assert resp.status == 404
        async with http.post(gw.base + "/api/schedules/..%2Fx/pause") as resp:
            assert resp.status in (400, 404)
        # the scheduler goes away: a launch is a 503 naming the cause, never a 2xx
        sched.stop()
        async with http.post(gw.base + "/api/runs", json={"pipeline": "sleepy"}) as resp:
            body = await _json(resp)
            assert resp.status == 503 and body["error"]["code"] == "unavailable"
            assert f"127.0.0.1:{ports.control}" in body["error"]["message"]
        async with http.get(gw.base + "/api/schedules") as resp:
            assert resp.status == 503
        async with http.get(gw.base + "/api/runs") as resp:  # lists come from the journals: still served
            assert resp.status == 200 and len((await _json(resp))["runs"]) == 1


async def test_a_run_the_scheduler_has_ended_is_not_shown_waiting(tmp_path: Path, services: list[Service]) -> None:
    """The gateway's view of a run may lag the scheduler's (a lost or slow PUB message, until a sweep or a
    heartbeat mends it): its detail then asks the scheduler. A run the scheduler has ended waits for
    nothing; its `waiting` stays null. (The scheduler's `reason` once carried both why a queued run
    waits and why an ended run ended, and the gateway took either for `waiting`: a cancelled run showed
    "waiting: cancelled via the API".) Here the lag is made to last: the gateway does not subscribe to
    the scheduler's PUB, and a publisher's heartbeat claims the run, so no sweep reads its tail."""
    settings, ports = make_settings(tmp_path, body=_PIPELINES)
    gateway_cfg = msgspec.structs.replace(settings.config.gateway, subscribe=[f"tcp://127.0.0.1:{ports.publish}"])
    settings = dataclasses.replace(settings, config=msgspec.structs.replace(settings.config, gateway=gateway_cfg))
    services.append(Service("scheduler_svc", settings.path, tmp_path).start())
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}", runner_id="r1")
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            with anyio.fail_after(10):
                while True:  # the scheduler is up once it takes the launch
                    async with http.post(gw.base + "/api/runs", json={"pipeline": "sleepy"}) as resp:
                        if resp.status == 202:
                            run_id = (await _json(resp))["run_id"]
                            break
                    await anyio.sleep(0.1)
            hub = gw.app[HUB]
            with anyio.fail_after(10):
                while run_id not in hub.claimed_runs() or hub.index.get(run_id) is None:
                    pub.heartbeat({run_id: 1})
                    await anyio.sleep(0.1)
            async with http.get(f"{gw.base}/api/runs/{run_id}") as resp:
                queued = await _json(resp)
            assert queued["status"] == "queued" and "runner" in queued["waiting"], queued  # no runner: it waits
            async with http.post(f"{gw.base}/api/runs/{run_id}/cancel") as resp:
                assert resp.status == 202 and (await _json(resp))["status"] == "cancelled"
            pub.heartbeat({run_id: 1})
            async with http.get(f"{gw.base}/api/runs/{run_id}") as resp:
                detail = await _json(resp)
            assert detail["status"] == "queued", detail  # the gateway's view lags, as set up
            assert detail["scheduler"]["status"] == "cancelled", detail
            assert detail["waiting"] is None, detail
    finally:
        pub.close()


_PIPELINES = """
[pipelines.sleepy]
description = "one stage that sleeps"
[pipelines.sleepy.params.seconds]
type = "float"
default = 0.2
[pipelines.sleepy.params.mode]
type = "str"
default = "fast"
choices = ["fast", "slow"]
[[pipelines.sleepy.stages]]
name = "nap"
command = ["{python}", "-c", "import time; time.sleep({seconds})"]

[schedules.nightly]
pipeline = "sleepy"
cron = "0 3 * * *"
"""


async def test_pipelines_runs_list_and_paged_events(tmp_path: Path) -> None:
    settings, ports = make_settings(tmp_path, body=_PIPELINES)
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    try:
        ended = pub.begin()
        pub.emit(ended, "pipeline", "start", "s")
        for i in range(25):
            pub.emit(ended, "nap", "metric", "", {"elapsed_s": i, "rows": i})
        pub.emit(ended, "pipeline", "success", "done")
        probe = pub.begin(pipeline="doctor-probe", trigger="probe")
        pub.emit(probe, "pipeline", "success", "probe")
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            live = pub.begin()  # after start: learnt of live
            pub.emit(live, "pipeline", "start", "s")
            pub.emit(live, "nap", "start", "")
            async with http.get(gw.base + "/api/pipelines") as resp:
                (p,) = (await _json(resp))["pipelines"]
                assert p["name"] == "sleepy" and p["stages"] == ["nap"]
                assert {"name": "mode", "type": "str", "default": "fast", "choices": ["fast", "slow"],
                        "description": ""} in p["params"]
            with anyio.fail_after(10):
                while True:
                    async with http.get(gw.base + "/api/runs") as resp:
                        runs = (await _json(resp))["runs"]
                    if runs and runs[0]["status"] == "running":
                        break
                    await anyio.sleep(0.1)
            assert [r["run_id"] for r in runs] == [live, ended]  # newest first, no probe
            assert runs[1]["status"] == "success" and runs[1]["last_seq"] == 28 and runs[1]["msg"] == "done"
            async with http.get(gw.base + "/api/runs?include_probes=1&limit=2") as resp:
                page = await _json(resp)
                assert [r["run_id"] for r in page["runs"]] == [live, probe] and page["next_before"] == probe
            async with http.get(f"{gw.base}/api/runs?include_probes=1&before={probe}") as resp:
                assert [r["run_id"] for r in (await _json(resp))["runs"]] == [ended]
            async with http.get(f"{gw.base}/api/runs/{live}") as resp:
                detail = await _json(resp)
                assert detail["status"] == "running" and detail["stages"][0]["status"] == "running"
            async with http.get(f"{gw.base}/api/runs/{ended}") as resp:
                detail = await _json(resp)
                assert detail["stages"][0]["metrics"] == {"elapsed_s": 24, "rows": 24}
            seqs: list[int] = []
            after = 0
            while True:
                async with http.get(f"{gw.base}/api/runs/{ended}/events?after_seq={after}&limit=10") as resp:
                    page = await _json(resp)
                seqs += [e["seq"] for e in page["events"]]
                after = page["next_after_seq"]
                if not page["more"]:
                    break
            assert seqs == list(range(1, 29))
            async with http.get(gw.base + "/metrics") as resp:
                text = await resp.text()
                assert resp.headers["Content-Type"].startswith("text/plain")
                for name in ("runwire_gateway_events_in_total", "runwire_gateway_gaps_filled_total",
                             "runwire_gateway_duplicates_dropped_total", "runwire_gateway_slow_consumer_closes_total",
                             "runwire_journal_corrupt_lines_skipped_total", 'runwire_gateway_connections_open{kind="ws_all"}'):
                    assert name in text, name
    finally:
        pub.close()


async def test_ended_runs_whose_journals_are_removed_leave_the_list(tmp_path: Path) -> None:
    """The journal is the truth: an ended run whose journal is deleted (old probe journals, a clean-up by
    hand) leaves the run list at the next sweep; a run not ended stays (its journal may be on its way)."""
    settings, ports = make_settings(tmp_path, body=_PIPELINES)
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    try:
        kept = pub.begin()
        pub.emit(kept, "pipeline", "success", "done")
        removed = pub.begin()
        pub.emit(removed, "pipeline", "success", "done")
        running = pub.begin()
        pub.emit(running, "pipeline", "start", "s")
        async with running_gateway(settings), aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{ports.http}"

            async def listed() -> list[str]:
                async with http.get(base + "/api/runs") as resp:
                    return [r["run_id"] for r in (await _json(resp))["runs"]]

            assert set(await listed()) == {kept, removed, running}
            journal_path(settings.journal_dir, removed).unlink()
            journal_path(settings.journal_dir, running).unlink()
            with anyio.fail_after(15):
                while removed in await listed():
                    await anyio.sleep(0.2)
            assert set(await listed()) == {kept, running}
            async with http.get(f"{base}/api/runs/{removed}") as resp:
                assert resp.status == 404
    finally:
        pub.close()
