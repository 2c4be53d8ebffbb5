"""Each service, once it serves, freezes what it holds out of the garbage collector's scans
(shared/gcpauses.py: a full collection of the gateway's start-up objects paused it ~28 ms); the
gateway's /metrics shows the frozen objects and every generation's collections and longest pause."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from tests.harness import Service, write_config


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def test_services_freeze_their_start_up_objects_and_the_gateway_shows_gc_pauses(
        tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path)
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        svc = Service(module, cfg, tmp_path).start()
        services.append(svc)
        line = svc.wait_for(r"(\d+) objects held since start frozen out of the garbage collector's scans")
        assert int(line.group(1)) > 10_000, line.group(0)  # the modules' objects at least
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{ports.http}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert _metric(text, "runwire_gc_frozen_objects") > 10_000
    for gen in range(3):
        assert _metric(text, f'runwire_gc_collections_total{{generation="{gen}"}}') >= 0
        assert 0 <= _metric(text, f'runwire_gc_longest_pause_seconds{{generation="{gen}"}}') < 10
