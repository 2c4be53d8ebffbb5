"""End to end as a user runs it: the Procfile under honcho starts the trio as real processes; the demo
pipeline is launched over HTTP, followed over WebSocket to its terminal event, and its output files
and journal are checked. Then Ctrl-C (SIGINT to honcho) stops everything cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import aiohttp
import anyio
import polars as pl

from shared.config import Settings, load_settings
from shared.journal import JournalReader, journal_path
from tests.harness import REPO, Ports, demo_config

BIN = Path(sys.executable).parent


def _honcho(cfg: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RUNWIRE_CONFIG": str(cfg), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RUNWIRE_HOME", None)
    env.pop("RUNWIRE_TOKEN", None)
    return subprocess.Popen(
        [str(BIN / "honcho"), "start", "-f", str(REPO / "Procfile"), "-d", str(REPO)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


async def _wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    last = ""
    with anyio.move_on_after(timeout):
        async with aiohttp.ClientSession() as http:
            while proc.poll() is None:
                try:
                    async with http.get(f"{base}/healthz") as resp:
                        last = f"{resp.status} {await resp.text()}"
                        if resp.status == 200:
                            return
                except aiohttp.ClientError as e:
                    last = str(e)
                await anyio.sleep(0.2)
    raise AssertionError(f"trio not healthy ({last}); honcho output:\n{log.read_text(errors='replace')[-5000:]}")


async def test_procfile_trio_runs_the_demo_pipeline_end_to_end(tmp_path: Path) -> None:
    cfg, ports = demo_config(tmp_path)
    settings = load_settings(cfg)
    subprocess.run([str(BIN / "runwire"), "demo-data", "--config", str(cfg), "--days", "5"], check=True,
                   capture_output=True, timeout=120)
    raw = sorted((settings.data_dir / "raw").glob("*.csv"))
    assert raw, "demo-data wrote no CSV"

    log = tmp_path / "honcho.log"
    with open(log, "wb") as log_file:
        await _run_demo(cfg, ports, settings, log, log_file)


async def _run_demo(cfg: Path, ports: Ports, settings: Settings, log: Path, log_file: BinaryIO) -> None:
    proc = _honcho(cfg, log_file)
    base = f"http://127.0.0.1:{ports.http}"
    try:
        await _wait_healthy(base, proc, log)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/runs", json={"pipeline": "market-data"}) as resp:
                assert resp.status == 202, await resp.text()
                run_id = (await resp.json())["run_id"]
            seen = []
            with anyio.fail_after(110):
                async with http.ws_connect(f"{base}/ws/events/{run_id}?after_seq=0") as ws:
                    async for msg in ws:
                        frame = json.loads(msg.data)
                        if frame["type"] == "events":
                            seen.extend(frame["events"])
                        assert frame["type"] != "error", frame
                    assert ws.close_code == 1000
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)  # honcho's own status after a Ctrl-C is not 0; each service's is checked below
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"honcho did not stop on Ctrl-C:\n{log.read_text(errors='replace')[-3000:]}") from None
    output = log.read_text(errors="replace")
    for name in ("scheduler", "runner", "gateway"):
        assert f"{name}.1 stopped (rc=0)" in output, output[-3000:]  # a clean exit on Ctrl-C, not a kill
    # every service said where its journal is, absolutely, at start
    assert output.count(str(settings.journal_dir)) >= 3, output[-3000:]

    journal = JournalReader(journal_path(settings.journal_dir, run_id)).read()
    assert [e["seq"] for e in seen] == list(range(1, len(journal) + 1))
    assert seen == [json.loads(json.dumps(__import__("msgspec").to_builtins(e))) for e in journal]
    assert seen[0]["event"] == "queued" and seen[-1]["stage"] == "pipeline"
    assert seen[-1]["event"] == "success", seen[-1]
    assert sum(1 for e in seen if e["stage"] == "pipeline" and e["event"] in ("success", "failure", "cancelled")) == 1
    stages = {e["stage"] for e in seen if e["event"] == "success"}
    assert {"translator", "analyzer", "merger"} <= stages

    processed = sorted((settings.data_dir / "processed").glob("*.parquet"))
    assert processed and not list((settings.data_dir / "raw").glob("*.csv"))
    assert pl.read_parquet(processed[0]).height > 0
    monthly = sorted((settings.data_dir / "analyzer_runs").rglob("*_an_*_*.parquet"))
    assert monthly, "merger wrote no monthly files"
    report = json.loads((settings.reports_dir / f"{run_id}.json").read_text())
    assert report
    assert journal_path(settings.journal_dir, run_id).read_bytes().endswith(b"\n")
