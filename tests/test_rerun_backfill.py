"""Re-runs and backfills through the real trio (scheduler, runner, gateway as subprocesses, real journals):
a re-run keeps the parameters and is linked both ways; --from-failed skips the stages whose outputs are
there and is refused when they are not declared or not present; a backfill runs exactly the slots
without runs, never more than max_parallel at once (checked from the journals), carries on across a
scheduler kill -9 without running a slot twice; the HTTP routes' 400s and the CLI's output."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from scheduler_svc.slots import slot_run_id
from shared.config import Settings, load_settings
from shared.events import PIPELINE_STAGE
from shared.journal import JournalWriter, begin_run, list_run_ids, read_events
from tests.harness import Service, write_config
from tests.test_cli import RUNWIRE

PIPELINES = """
[pipelines.steps]
max_concurrent = 4
[pipelines.steps.params.label]
type = "str"
default = "plain"
[[pipelines.steps.stages]]
name = "make"
command = ["{python}", "-c", "import pathlib; p = pathlib.Path('out'); p.mkdir(exist_ok=True); (p / 'made.txt').write_text('x'); open('make-count', 'a').write('{label}\\\\n')"]
outputs = ["out/made.txt"]
[[pipelines.steps.stages]]
name = "check"
command = ["{python}", "-c", "import pathlib, sys; sys.exit(0 if pathlib.Path('ok.flag').exists() else 4)"]

[pipelines.undeclared]
[[pipelines.undeclared.stages]]
name = "first"
command = ["{python}", "-c", "pass"]
[[pipelines.undeclared.stages]]
name = "second"
command = ["{python}", "-c", "import sys; sys.exit(1)"]

[pipelines.nap]
max_concurrent = 4
[pipelines.nap.params.seconds]
type = "float"
default = 0.8
[[pipelines.nap.stages]]
name = "nap"
command = ["{python}", "-c", "import time; time.sleep({seconds})"]

[schedules.minutely]
pipeline = "nap"
every = "1m"
timezone = "UTC"
"""

# a day long past (the clock says 2026 or later): its slots are the backfill's, never the schedule's
DAY = "2024-03-01"


def slot(minute: int) -> str:
    return slot_run_id(datetime.fromisoformat(f"{DAY}T00:{minute:02d}:00+00:00"), "minutely")


def trio(tmp_path: Path, services: list[Service], runner: str = "capacity = 4") -> tuple[Path, Settings, str]:
    cfg, ports = write_config(tmp_path, PIPELINES, scheduler="max_concurrent_runs = 8", runner=runner)
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    return cfg, load_settings(cfg), f"http://127.0.0.1:{ports.http}"


async def rw(cfg: Path, *args: str) -> tuple[int, str, str]:
    """The `runwire` command: (exit status, stdout, stderr)."""
    with anyio.fail_after(60):
        done = await anyio.run_process([RUNWIRE, *args, "--config", str(cfg)], check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as resp:
        return resp.status, json.loads(await resp.text())


async def until_ended(http: aiohttp.ClientSession, base: str, run_id: str, timeout: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, run = await call(http, "GET", f"{base}/api/runs/{run_id}")
        if status == 200 and run["status"] in ("success", "failure", "cancelled"):
            return run  # type: ignore[no-any-return]
        await anyio.sleep(0.1)
    raise AssertionError(f"run {run_id} did not end within {timeout}s")


async def test_rerun_keeps_params_links_both_ways_and_from_failed_skips_done_stages(
        tmp_path: Path, services: list[Service]) -> None:
    cfg, settings, base = trio(tmp_path, services)
    home = settings.home
    async with aiohttp.ClientSession() as http:
        status, launched = await call(http, "POST", f"{base}/api/runs", {"pipeline": "steps", "params": {"label": "L1"}})
        assert status == 202
        orig = launched["run_id"]
        run = await until_ended(http, base, orig)
        assert run["status"] == "failure" and [s["status"] for s in run["stages"]] == ["success", "failure"]

        # in full: the same parameters, a new run linked to the original, the original listing it
        status, full = await call(http, "POST", f"{base}/api/runs/{orig}/rerun", {})
        assert status == 202 and full["rerun_of"] == orig and full["from_stage"] is None and full["skipped_stages"] == []
        again = await until_ended(http, base, full["run_id"])
        assert again["params"] == {"label": "L1"} and again["rerun_of"] == orig and again["status"] == "failure"
        queued = read_events(settings.journal_dir, full["run_id"], limit=1)[0]
        assert queued.data and queued.data["rerun_of"] == orig and queued.data["trigger"] == "rerun"
        assert (home / "make-count").read_text().split() == ["L1", "L1"]

        # from the failed stage: `make` declares outputs and they are there, so it is skipped
        (home / "ok.flag").write_text("")
        status, part = await call(http, "POST", f"{base}/api/runs/{orig}/rerun", {"from_failed": True})
        assert status == 202 and part["from_stage"] == "check" and part["skipped_stages"] == ["make"]
        done = await until_ended(http, base, part["run_id"])
        assert done["status"] == "success" and done["from_stage"] == "check"
        make = [e for e in read_events(settings.journal_dir, part["run_id"]) if e.stage == "make"]
        assert [(e.event, e.msg) for e in make] == [("skipped", f"outputs present from run {orig}")]
        assert (home / "make-count").read_text().split() == ["L1", "L1"]  # not run a third time
        status, page = await call(http, "GET", f"{base}/api/runs/{orig}")
        assert page["reruns"] == sorted([full["run_id"], part["run_id"]])

        # refused: outputs gone, nothing failed, outputs not declared, a run not ended, unknown, bad body
        (home / "out" / "made.txt").unlink()
        status, err = await call(http, "POST", f"{base}/api/runs/{orig}/rerun", {"from_failed": True})
        assert status == 409 and "earlier stage make" in err["error"]["message"] and "out/made.txt" in err["error"]["message"]
        status, err = await call(http, "POST", f"{base}/api/runs/{part['run_id']}/rerun", {"from_failed": True})
        assert status == 409 and "no failed stage" in err["error"]["message"]
        _, launched = await call(http, "POST", f"{base}/api/runs", {"pipeline": "undeclared"})
        await until_ended(http, base, launched["run_id"])
        status, err = await call(http, "POST", f"{base}/api/runs/{launched['run_id']}/rerun", {"from_failed": True})
        assert status == 409 and "earlier stage first declares no outputs" in err["error"]["message"]
        _, slow = await call(http, "POST", f"{base}/api/runs", {"pipeline": "nap", "params": {"seconds": 5}})
        status, err = await call(http, "POST", f"{base}/api/runs/{slow['run_id']}/rerun", {})
        assert status == 409 and "has not ended" in err["error"]["message"]
        status, err = await call(http, "POST", f"{base}/api/runs/20200101T000000000000Z-nope/rerun", {})
        assert status == 404
        status, err = await call(http, "POST", f"{base}/api/runs/{orig}/rerun", {"from_failed": "yes"})
        assert status == 400 and "from_failed" in err["error"]["message"]

    # the CLI
    code, out, err = await rw(cfg, "rerun", orig)
    assert code == 0 and f"re-run of {orig}" in out, (out, err)
    undeclared = launched["run_id"]
    code, out, err = await rw(cfg, "rerun", undeclared, "--from-failed")
    assert code == 1 and "earlier stage first declares no outputs" in err, (out, err)


def _write_slot_run(settings: Settings, minute: int, ends: list[str]) -> None:
    """A slot's run as the schedule would have left it (`start` ... or a skip record)."""
    run_id = slot(minute)
    begin_run(settings.journal_dir, run_id, settings.tz, "nap", {"seconds": 0.8},
              {"trigger": "schedule", "schedule": "minutely", "slot": f"{DAY}T00:{minute:02d}:00Z"})
    with JournalWriter.open(settings.journal_dir, run_id, settings.tz) as w:
        for kind in ends:
            w.append(PIPELINE_STAGE, kind, kind, {"attempt": 1, "runner": "old"} if kind == "start" else None)
        w.sync()


def backfill_runs(settings: Settings) -> dict[str, list[Any]]:
    """run id -> events of every run a backfill queued."""
    out = {}
    for run_id in list_run_ids(settings.journal_dir):
        events = read_events(settings.journal_dir, run_id)
        if events and events[0].data and events[0].data.get("trigger") == "backfill":
            out[run_id] = events
    return out


def max_at_once(runs: dict[str, list[Any]]) -> int:
    """The most backfill runs queued or running at one moment, from the journals' timestamps."""
    edges = []
    for events in runs.values():
        edges.append((datetime.fromisoformat(events[0].timestamp), 1))
        edges.append((datetime.fromisoformat(events[-1].timestamp), -1))
    now = most = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        now += step
        most = max(most, now)
    return most


async def progress(http: aiohttp.ClientSession, base: str, backfill_id: str) -> dict[str, Any]:
    status, page = await call(http, "GET", f"{base}/api/backfills")
    assert status == 200
    found = [b for b in page["backfills"] if b["backfill_id"] == backfill_id]
    assert found, f"backfill {backfill_id} not listed: {page}"
    return found[0]  # type: ignore[no-any-return]


async def until_done(http: aiohttp.ClientSession, base: str, backfill_id: str, timeout: float = 90) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            p = await progress(http, base, backfill_id)
            if p["done"]:
                return p
        except (AssertionError, aiohttp.ClientError):
            pass  # the scheduler restarting
        await anyio.sleep(0.2)
    raise AssertionError(f"backfill {backfill_id} not done within {timeout}s")


async def test_backfill_missing_runs_exactly_the_slots_without_runs_within_max_parallel(
        tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path, PIPELINES, scheduler="max_concurrent_runs = 8", runner="capacity = 4")
    settings = load_settings(cfg)
    settings.journal_dir.mkdir(parents=True)
    _write_slot_run(settings, 1, ["start", "success"])
    _write_slot_run(settings, 2, ["skipped", "cancelled"])  # recorded skipped by the schedule: never ran
    _write_slot_run(settings, 3, ["start", "failure"])
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    base = f"http://127.0.0.1:{ports.http}"
    window = {"from": f"{DAY}T00:00:00Z", "to": f"{DAY}T00:07:00Z"}
    async with aiohttp.ClientSession() as http:
        status, dry = await call(http, "POST", f"{base}/api/schedules/minutely/backfill", {**window, "dry_run": True})
        assert status == 200 and dry["dry_run"] and dry["progress"] is None
        assert [s["action"] for s in dry["slots"]] == ["run", "skip", "run", "skip", "run", "run", "run", "run"]
        assert "ended success" in dry["slots"][1]["reason"] and "never started" in dry["slots"][2]["reason"]
        assert backfill_runs(settings) == {} and (await call(http, "GET", f"{base}/api/backfills"))[1]["backfills"] == []

        status, made = await call(http, "POST", f"{base}/api/schedules/minutely/backfill", {**window, "max_parallel": 2})
        assert status == 202 and made["progress"]["total"] == 6 and made["progress"]["max_parallel"] == 2
        status, second = await call(http, "POST", f"{base}/api/schedules/minutely/backfill", window)
        assert status == 202 and second["progress"] is None  # every slot has a run, or one on its way
        assert all(s["action"] == "skip" for s in second["slots"])
        p = await until_done(http, base, made["progress"]["backfill_id"])
        assert (p["total"], p["success"], p["pending"], p["running"]) == (6, 6, 0, 0)

        runs = backfill_runs(settings)
        assert sorted(runs) == sorted([slot(0), slot(2) + ".r1", slot(4), slot(5), slot(6), slot(7)])
        assert runs[slot(2) + ".r1"][0].data["rerun_of"] == slot(2)  # type: ignore[index]
        assert all(events[-1].event == "success" for events in runs.values())
        assert max_at_once(runs) == 2

        # nothing is left to fill; policy failed re-runs the failed slot, linked to its run
        status, third = await call(http, "POST", f"{base}/api/schedules/minutely/backfill", window)
        assert status == 202 and third["progress"] is None
        status, failed = await call(http, "POST", f"{base}/api/schedules/minutely/backfill", {**window, "policy": "failed"})
        assert [s["run_id"] for s in failed["slots"] if s["action"] == "run"] == [slot(3) + ".r1"]
        await until_done(http, base, failed["progress"]["backfill_id"])
        status, page = await call(http, "GET", f"{base}/api/runs/{slot(3)}")
        assert page["reruns"] == [slot(3) + ".r1"]

        # bad terms: 400s naming the field, before the scheduler is asked; an unknown schedule is a 404
        for body, field in [({**window, "from": "yesterday"}, "from"), ({**window, "to": "2024-02-30"}, "to"),
                            ({"from": window["to"], "to": window["from"]}, "before from"),
                            ({**window, "policy": "some"}, "policy"), ({**window, "max_parallel": 0}, "max_parallel"),
                            ({**window, "max_parallel": "2"}, "max_parallel"), ({"to": window["to"]}, "'from'"),
                            ({**window, "dry_run": 1}, "dry_run"), ({**window, "extra": 1}, "extra")]:
            status, err = await call(http, "POST", f"{base}/api/schedules/minutely/backfill", body)
            assert status == 400 and field in err["error"]["message"], (body, err)
        status, err = await call(http, "POST", f"{base}/api/schedules/nope/backfill", window)
        assert status == 404 and "minutely" in err["error"]["message"]
        status, err = await call(http, "GET", f"{base}/api/backfills?limit=x")
        assert status == 400 and "limit" in err["error"]["message"]

    # the CLI: a dry run lists each slot and why; backfills lists the progress
    code, out, err = await rw(cfg, "backfill", "minutely", "--from", f"{DAY}T00:00:00Z", "--to", f"{DAY}T00:07:00Z",
                              "--policy", "all", "--dry-run")
    assert code == 0, (out, err)
    assert "dry run: 8 of 8 slots would run (policy all); nothing created" in out
    assert f"{slot(1)}.r1" in out and "ended success (policy all)" in out
    code, out, err = await rw(cfg, "backfills")
    assert code == 0 and made["progress"]["backfill_id"] in out and "SUCCESS" in out, (out, err)
    code, out, err = await rw(cfg, "backfill", "minutely", "--from", "soon", "--to", f"{DAY}T00:07:00Z")
    assert code == 1 and "from 'soon'" in err, (out, err)


async def test_a_scheduler_kill9_mid_backfill_carries_on_without_running_a_slot_twice(
        tmp_path: Path, services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path, PIPELINES, scheduler="max_concurrent_runs = 8", runner="capacity = 4")
    settings = load_settings(cfg)
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(sched)
    for module in ("runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    base = f"http://127.0.0.1:{ports.http}"
    async with aiohttp.ClientSession() as http:
        status, made = await call(http, "POST", f"{base}/api/schedules/minutely/backfill",
                                  {"from": f"{DAY}T00:00:00Z", "to": f"{DAY}T00:05:00Z"})
        assert status == 202 and made["progress"]["total"] == 6
        end = time.monotonic() + 60
        while len(backfill_runs(settings)) < 3 and time.monotonic() < end:
            await anyio.sleep(0.05)
        sched.kill9()
        await anyio.sleep(0.5)
        sched2 = Service("scheduler_svc", cfg, tmp_path).start()
        services.append(sched2)
        p = await until_done(http, base, made["progress"]["backfill_id"])
        assert (p["total"], p["success"]) == (6, 6)
    runs = backfill_runs(settings)
    assert sorted(runs) == [slot(m) for m in range(6)]  # each slot its own run, none repeated as .r1
    for events in runs.values():
        pipe = [e.event for e in events if e.stage == PIPELINE_STAGE]
        assert pipe.count("queued") == 1 and pipe.count("start") == 1 and pipe[-1] == "success", pipe
    assert max_at_once(runs) == 1
    assert "backfills carried on after the restart" in sched2.output()
