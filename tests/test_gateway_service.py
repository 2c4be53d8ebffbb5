"""The gateway as users start it: `python -m gateway_svc` as a real subprocess (tests.harness.Service).
Events come from the test-side `FakePublisher` (journal first, then PUB, per the wire contract)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from gateway_svc.keys import HUB
from gateway_svc.security import check_bind, is_loopback
from gateway_svc.service import GatewayService
from shared.errors import ConfigError
from tests.harness import REPO, Service, write_config
from tests.test_gateway_helpers import FakePublisher, collect, journal_of, make_settings


def test_refuses_a_non_loopback_bind_without_token(tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"'))
    env = {k: v for k, v in os.environ.items() if k not in ("RUNWIRE_TOKEN", "RUNWIRE_HOME", "RUNWIRE_CONFIG")}
    result = subprocess.run([sys.executable, "-m", "gateway_svc", "--config", str(cfg)], capture_output=True,
                            text=True, timeout=30, env=env, cwd=str(REPO))
    assert result.returncode == 2
    assert "gateway.host" in result.stderr and "RUNWIRE_TOKEN" in result.stderr and str(cfg) in result.stderr
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("")
    check_bind("0.0.0.0", "a-token", cfg)  # with a token it may
    try:
        check_bind("10.0.0.1", None, cfg)
        raise AssertionError("accepted")
    except ConfigError:
        pass


async def test_sigterm_closes_streams_with_1001_and_exits_0(tmp_path: Path, services: list[Service]) -> None:
    settings, ports = make_settings(tmp_path)
    gw = Service("gateway_svc", settings.path, tmp_path).start()
    services.append(gw)
    out = gw.output()
    assert str(settings.path) in out and str(settings.journal_dir) in out
    assert f"tcp://127.0.0.1:{ports.publish}" in out
    codes: list[int] = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://127.0.0.1:{ports.http}/ws/events") as ws:
            assert (await ws.receive_json())["type"] == "hello"
            async with anyio.create_task_group() as tg:
                async def stop() -> None:
                    codes.append(await anyio.to_thread.run_sync(gw.stop))  # SIGTERM, then wait
                tg.start_soon(stop)
                with anyio.fail_after(15):
                    msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
    assert codes == [0]
    assert "gateway stopped" in gw.output()


async def test_gateway_killed_mid_run_and_restarted_loses_nothing_for_a_resuming_client(
    tmp_path: Path, services: list[Service]
) -> None:
    settings, ports = make_settings(tmp_path)
    pub = FakePublisher(settings.journal_dir, f"tcp://127.0.0.1:{ports.publish}")
    ws_base = f"ws://127.0.0.1:{ports.http}"
    try:
        gw = Service("gateway_svc", settings.path, tmp_path).start()
        services.append(gw)
        delivered: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            cursor = (await collect(http, f"{ws_base}/ws/events", max_frames=1)).frames[0]["cursor"]
            run_a = pub.begin()
            for i in range(50):
                pub.emit(run_a, "nap", "log", f"a {i}")
            got = await collect(http, f"{ws_base}/ws/events?cursor={cursor}",
                                until=lambda c: len(c.events) >= 20)
            delivered += got.events
            cursor = got.last_cursor
            gw.kill9()
            for i in range(50):
                pub.emit(run_a, "nap", "log", f"a while down {i}")
            run_b = pub.begin()  # started while the gateway was down
            pub.emit(run_b, "pipeline", "start", "s")
            gw2 = Service("gateway_svc", settings.path, tmp_path).start()
            services.append(gw2)
            pub.emit(run_b, "pipeline", "success", "b done")
            pub.emit(run_a, "pipeline", "success", "a done")
            ended: set[str] = set()

            def enough(c: Any) -> bool:  # a few frames (then resume again), or the rest of both runs
                return len(c.frames) >= 3 or ended | {e["run_id"] for e in c.events if e["event"] == "success"} == {run_a, run_b}

            while ended != {run_a, run_b}:
                got = await collect(http, f"{ws_base}/ws/events?cursor={cursor}", until=enough)
                assert got.frames[0]["recovered"] is True
                delivered += got.events
                ended |= {e["run_id"] for e in got.events if e["event"] == "success"}
                cursor = got.last_cursor
        for run_id in (run_a, run_b):
            assert [e for e in delivered if e["run_id"] == run_id] == journal_of(settings, run_id)
    finally:
        pub.close()


async def test_a_failing_hub_stops_the_gateway_with_its_cause(tmp_path: Path) -> None:
    """The hub runs in the gateway's task group: when it fails, the gateway stops serving (no stale
    events) and the failure is what the service raises. The failure is injected around the real hub."""
    settings, _ = make_settings(tmp_path)
    service = GatewayService(settings, host="127.0.0.1")
    hub = service.app[HUB]
    real_run = hub.run

    async def run_then_fail(ctx: Any, *, task_status: Any) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(real_run, ctx)
            task_status.started()
            await anyio.sleep(0.5)
            raise RuntimeError("the hub failed on purpose")

    hub.run = run_then_fail  # type: ignore[method-assign]
    served = False
    with pytest.raises(BaseExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            async with aiohttp.ClientSession() as http, http.get(f"{service.url}/healthz") as resp:
                served = resp.status in (200, 503)
            await anyio.sleep(30)  # the hub's failure cancels this
    assert served
    assert caught.group_contains(RuntimeError, match="the hub failed on purpose")
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(f"{service.url}/healthz"):
            pass


def test_a_taken_port_is_a_bind_error_naming_the_key_and_the_file(tmp_path: Path) -> None:
    cfg, ports = write_config(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.http))
        squatter.listen()
        result = subprocess.run([sys.executable, "-m", "gateway_svc", "--config", str(cfg)], capture_output=True,
                                text=True, timeout=60, cwd=str(REPO))
    assert result.returncode == 1, result.stderr
    assert f"gateway cannot start: gateway.port: cannot bind HTTP on http://127.0.0.1:{ports.http}" in result.stderr
    assert str(cfg) in result.stderr
