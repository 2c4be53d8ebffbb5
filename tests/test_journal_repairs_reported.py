"""Journal repairs are never silent: a torn last line that the restarted runner cuts off, and a corrupt
line that the gateway skips, are logged by the process that met them and counted on /metrics."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import anyio

from shared.config import load_settings
from shared.ids import new_run_id
from shared.journal import JournalWriter, begin_run, journal_path
from tests.harness import Service, write_config


def _metric(text: str, name: str, process: str) -> float | None:
    m = re.search(rf'^{name}{{process="{re.escape(process)}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


async def test_torn_and_corrupt_lines_are_logged_and_counted(tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path)
    settings = load_settings(cfg)
    tz = settings.tz
    # a run "test-runner" was executing when it crashed mid-write, and a line in it went bad on disk
    run_id = new_run_id()
    begin_run(settings.journal_dir, run_id, tz, "sleepy", {"seconds": 0.2}, {"trigger": "manual"})
    with JournalWriter.open(settings.journal_dir, run_id, tz) as w:
        w.append("pipeline", "start", "started", {"runner": "test-runner", "attempt": 1, "pid": 1})
    path = journal_path(settings.journal_dir, run_id)
    with open(path, "ab") as f:
        f.write(b"#### not an event ####\n")
        f.write(b'{"run_id":"' + run_id.encode() + b'","seq":3,"timesta')

    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    runner, gateway = services[1], services[2]
    runner.wait_for("repaired a torn last line")
    assert str(path) in runner.output()

    base = f"http://127.0.0.1:{ports.http}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/runs/{run_id}/events") as resp:
            events = (await resp.json())["events"]
        # the runner ended the interrupted run; the corrupt line is skipped, not delivered
        assert [e["seq"] for e in events] == [1, 2, 3]
        assert events[-1]["event"] == "failure" and "restarted" in events[-1]["msg"]
        gateway.wait_for(r"skipped corrupt line at byte \d+")
        with anyio.fail_after(20):
            while True:
                async with http.get(f"{base}/metrics") as resp:
                    text = await resp.text()
                torn = _metric(text, "runwire_journal_torn_lines_repaired_total", "test-runner")
                corrupt = _metric(text, "runwire_journal_corrupt_lines_skipped_total", "gateway")
                if torn == 1.0 and corrupt is not None and corrupt >= 1:
                    break
                await anyio.sleep(0.2)
