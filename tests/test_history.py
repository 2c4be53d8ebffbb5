"""Run history through the real trio: ended runs land in the Parquet archive (written by the gateway),
and GET /api/history, `runwire history` and its table agree with numbers computed here, independently,
from the journals the runs left (skipped slots from a real schedule that overlaps itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.e2e_systems import child_pids
from runwire_history.archive import Archive, archive_dir_of
from runwire_history.ledger import Ledger
from shared.config import load_settings
from tests.harness import Service, write_config

RUNWIRE = str(Path(sys.executable).parent / "runwire")

PIPELINES = """
[pipelines.hist]
[pipelines.hist.params.bad]
type = "str"
default = "none"
[[pipelines.hist.stages]]
name = "prep"
command = ["{python}", "-c", "import time; time.sleep(0.05)"]
[[pipelines.hist.stages]]
name = "work"
fan_out = ["A", "B", "C"]
max_parallel = 3
item_policy = "all"
on_failure = "continue"
command = ["{python}", "-c", "import sys, time; time.sleep(0.02 * ord(sys.argv[1][0]) % 5); sys.exit(sys.argv[1] == sys.argv[2])", "{item}", "{bad}"]
[[pipelines.hist.stages]]
name = "final"
command = ["{python}", "-c", "pass"]

[pipelines.ticker]
[[pipelines.ticker.stages]]
name = "nap"
command = ["{python}", "-c", "import time; time.sleep(1.6)"]

[schedules.tick]
pipeline = "ticker"
every = "1s"
fire_at_start = true
overlap = "skip"
misfire_grace = 30
"""


def _us(ts: str) -> int:
    m = datetime.fromisoformat(ts)
    return int(m.timestamp()) * 1_000_000 + m.microsecond


def quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), written out here."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def journal_events(journal_dir: Path, pipeline: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted(journal_dir.glob("pipeline_*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines()]
        if events[0].get("data", {}).get("pipeline") == pipeline:
            out[events[0]["run_id"]] = events
    return out


def expected_from_journals(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What the history must say, from raw journal lines: outcomes, run/stage/item durations (end
    timestamp minus the span's start timestamp), skipped slots."""
    status: dict[str, int] = {"success": 0, "failure": 0, "cancelled": 0}
    run_d: list[float] = []
    stage_d: dict[str, list[float]] = {}
    stage_ok: dict[str, dict[str, int]] = {}
    item_d: dict[tuple[str, str], list[float]] = {}
    item_fail: dict[tuple[str, str], int] = {}
    skipped = 0
    for events in runs.values():
        if any(e["stage"] == "pipeline" and e["event"] == "skipped" for e in events):
            skipped += 1
            continue
        starts: dict[tuple[str, str | None], int] = {}
        for e in events:
            item = (e.get("data") or {}).get("item")
            key = (e["stage"], item)
            if e["event"] == "start":
                starts[key] = _us(e["timestamp"])
                continue
            if e["event"] not in ("success", "failure", "skipped", "cancelled"):
                continue
            d = (_us(e["timestamp"]) - starts.pop(key)) / 1e6 if key in starts else None
            if e["stage"] == "pipeline":
                status[e["event"]] += 1
                run_d.append(d)
            elif item is None:
                stage_d.setdefault(e["stage"], []).append(d)
                counts = stage_ok.setdefault(e["stage"], {"success": 0, "failure": 0})
                counts[e["event"]] = counts.get(e["event"], 0) + 1
            else:
                item_d.setdefault((e["stage"], item), []).append(d)
                item_fail[(e["stage"], item)] = item_fail.get((e["stage"], item), 0) + (e["event"] == "failure")
    return {"status": status, "run_d": run_d, "stage_d": stage_d, "stage_ok": stage_ok, "item_d": item_d,
            "item_fail": item_fail, "skipped": skipped}


def close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 2e-6)


async def _wait_all_ended(http: aiohttp.ClientSession, base: str, count: int) -> list[dict[str, Any]]:
    with anyio.fail_after(60):
        while True:
            async with http.get(f"{base}/api/runs?limit=1000") as resp:
                runs = (await resp.json())["runs"]
            if len(runs) >= count and all(r["status"] in ("success", "failure", "cancelled") for r in runs):
                return runs
            await anyio.sleep(0.1)


async def test_history_of_real_runs_matches_their_journals(tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path, PIPELINES)
    settings = load_settings(cfg)
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    base = f"http://127.0.0.1:{ports.http}"
    async with aiohttp.ClientSession() as http:
        for bad in ("none", "none", "B", "none", "C"):
            async with http.post(f"{base}/api/runs", json={"pipeline": "hist", "params": {"bad": bad}}) as resp:
                assert resp.status == 202, await resp.text()
        await anyio.sleep(3.5)  # the 1 s schedule of a 1.6 s run: some slots fire, the overlapping ones are skipped
        async with http.post(f"{base}/api/schedules/tick/pause") as resp:
            assert resp.status == 200
        runs = await _wait_all_ended(http, base, 5)
        ids = {r["run_id"] for r in runs}
        archive_dir = archive_dir_of(settings.home)
        with anyio.fail_after(20):
            while True:  # the gateway archives each run at its end
                with Ledger(archive_dir) as ledger:
                    if ledger.run_ids() >= ids:
                        break
                await anyio.sleep(0.1)
        hist = journal_events(settings.journal_dir, "hist")
        ticker = journal_events(settings.journal_dir, "ticker")
        assert len(hist) == 5 and len(ticker) >= 2
        exp = expected_from_journals(hist)
        exp_ticker = expected_from_journals(ticker)
        assert exp_ticker["skipped"] >= 1, "the overlapping schedule skipped no slot"

        async with http.get(f"{base}/api/history", params={"pipeline": "hist", "since": "1h"}) as resp:
            assert resp.status == 200, await resp.text()
            report = await resp.json()
        s = report["summary"]
        assert (s["success"], s["failure"], s["cancelled"]) == (3, 2, 0) == tuple(exp["status"].values())
        assert s["runs"] == 5 and s["success_rate"] == 0.6
        assert s["previous"]["runs"] == 0
        for q, key in ((0.5, "p50"), (0.95, "p95")):
            assert close(s["duration_s"][key], quantile(exp["run_d"], q)), (key, s, exp["run_d"])
        assert close(s["duration_s"]["max"], max(exp["run_d"]))
        stages = {st["stage"]: st for st in report["stages"]}
        assert sorted(stages) == ["final", "prep", "work"]
        for name, durations in exp["stage_d"].items():
            assert stages[name]["success"] == exp["stage_ok"][name]["success"]
            assert stages[name]["failure"] == exp["stage_ok"][name].get("failure", 0)
            assert close(stages[name]["duration_s"]["p95"], quantile(durations, 0.95))
        assert stages["work"]["failure"] == 2
        items = {(i["stage"], i["item"]): i for i in report["items"]}
        assert set(items) == set(exp["item_d"])
        for key, durations in exp["item_d"].items():
            assert items[key]["runs"] == 5 and items[key]["failures"] == exp["item_fail"][key]
            assert close(items[key]["duration_s"]["p50"], quantile(durations, 0.5))
        assert {(i["stage"], i["item"]) for i in report["failing_items"]} == {("work", "B"), ("work", "C")}
        assert len(report["recent_runs"]) == 5 and {r["run_id"] for r in report["recent_runs"]} == set(hist)
        assert all(set(r["stages"]) == {"prep", "work", "final"} for r in report["recent_runs"])

        async with http.get(f"{base}/api/history", params={"pipeline": "ticker", "since": "1h"}) as resp:
            slots = (await resp.json())["skipped_slots"]
        assert slots["count"] == exp_ticker["skipped"]
        assert slots["by_reason"] == [{"reason": "overlap", "count": exp_ticker["skipped"]}]

        async with http.get(f"{base}/api/history", params={"pipeline": "hist", "since": "1h", "stage": "work"}) as resp:
            focused = await resp.json()
        assert [st["stage"] for st in focused["stages"]] == ["work"]

    # the CLI: --json is the route's answer, the table names the stages and the failing items
    out = subprocess.run([RUNWIRE, "history", "hist", "--since", "1h", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["summary"]["runs"] == 5 and cli["items"] == report["items"]
    table = subprocess.run([RUNWIRE, "history", "hist", "--since", "1h", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, table.stderr
    text = table.stdout
    assert "runs 5  success 3  failure 2" in text and "success rate 60.0%" in text
    for line_start in ("STAGE", "final", "prep", "work"):
        assert any(line.startswith(line_start) for line in text.splitlines()), (line_start, text)
    failing = text.split("failing items:")[1].splitlines()
    assert any(line.split()[:2] == ["work", "B"] for line in failing) and any(line.split()[:2] == ["work", "C"] for line in failing)
    bad = subprocess.run([RUNWIRE, "history", "hist", "--since", "7x", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "--since" in bad.stderr and "7x" in bad.stderr

    # the archive outlives the journals (as after retention): the same numbers from the archive alone
    for path in settings.journal_dir.glob("pipeline_*.jsonl"):
        path.unlink()
    again = subprocess.run([RUNWIRE, "history", "hist", "--since", "1h", "--json", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=30)
    assert json.loads(again.stdout)["summary"] == cli["summary"]
    rebuilt = Archive(archive_dir_of(settings.home), settings.journal_dir).sync()
    assert rebuilt.archived == [] and rebuilt.lost_runs == []


async def test_the_archiver_works_in_a_worker_process_whose_log_lines_reach_the_gateways(
        tmp_path: Path, services: list[Service]) -> None:
    """The archive is written in a worker process (the GIL stays with the event path); what it logs is
    not lost: a damaged Parquet file found by the sync at start is said in the gateway's own output,
    and its run archived again from the journal."""
    from tests.test_history_archive import ended_run  # one way to write an ended run's journal

    cfg, _ = write_config(tmp_path, PIPELINES)
    settings = load_settings(cfg)
    settings.journal_dir.mkdir(parents=True, exist_ok=True)
    run_id = ended_run(settings.journal_dir)
    archive_dir = archive_dir_of(settings.home)
    assert Archive(archive_dir, settings.journal_dir).archive_run(run_id)
    with Ledger(archive_dir) as ledger:
        name = next(f.name for f in ledger.files() if f.name.endswith(f"run-{run_id}.parquet"))
    damaged = archive_dir / name
    damaged.write_bytes(damaged.read_bytes()[:50])

    gateway = Service("gateway_svc", cfg, tmp_path).start()
    services.append(gateway)
    line = gateway.wait_for(r"gateway ERROR runwire_history\.archive: archive file \S+ is damaged", timeout=60)
    assert name in line.group(0)
    with anyio.fail_after(30):
        while True:  # set aside, and archived again from the journal
            with Ledger(archive_dir) as ledger:
                if ledger.has_run(run_id) and (archive_dir / name).exists():
                    break
            await anyio.sleep(0.1)
    gateway.wait_for(r"gateway INFO gateway_svc\.archiver: archive .*: 1 run\(s\) archived from journals")
    workers = _children(gateway.pid, "anyio.to_process")
    assert workers, "no archive worker process under the gateway"
    gateway.kill9()  # a worker outlives no gateway: its end of the pipe closes
    with anyio.fail_after(20):
        while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers):
            await anyio.sleep(0.1)


def _children(ppid: int, needle: str) -> list[int]:
    found = []
    for pid in child_pids(ppid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(pid)
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
