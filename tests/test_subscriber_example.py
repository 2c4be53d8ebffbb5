"""The README's ZeroMQ subscriber example, run as a separate program against the real trio: joining a
run late (its first events long gone from PUB/SUB), it still prints every event exactly once, in order,
because it fills the gap from the gateway."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import aiohttp
import anyio

from shared.config import load_settings
from shared.journal import JournalReader, journal_path
from tests.harness import REPO, Service, write_config

TICKER = """
[pipelines.ticker]
[[pipelines.ticker.stages]]
name = "tick"
command = ["{python}", "-c", "import time\\nfor i in range(60):\\n    print('tick', i, flush=True)\\n    time.sleep(0.1)"]
log_rate = 1000
"""


async def test_late_subscriber_recovers_the_gap_and_prints_each_event_once(tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path, TICKER)
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    base = f"http://127.0.0.1:{ports.http}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/runs", json={"pipeline": "ticker"}) as resp:
            assert resp.status == 202, await resp.text()
            run_id = (await resp.json())["run_id"]
        # join late: wait until the run has written a good part of its events
        with anyio.fail_after(30):
            while True:
                async with http.get(f"{base}/api/runs/{run_id}") as resp:
                    if (await resp.json())["last_seq"] >= 10:
                        break
                await anyio.sleep(0.05)
    with anyio.fail_after(60):
        proc = await anyio.run_process(
            [sys.executable, str(REPO / "examples" / "zmq_subscriber.py"),
             "--pub", f"tcp://127.0.0.1:{ports.publish}", "--pub", f"tcp://127.0.0.1:{ports.scheduler_publish}",
             "--gateway", base, "--run", run_id, "--until-terminal"],
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    printed = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    journal = JournalReader(journal_path(load_settings(cfg).journal_dir, run_id)).read()
    assert [e["seq"] for e in printed] == [e.seq for e in journal] == list(range(1, len(journal) + 1))
    assert printed[-1]["event"] == "success" and printed[-1]["stage"] == "pipeline"
