"""`/healthz`: are the scheduler and a runner reachable, and do they write the journal directory the
gateway reads? (the first cause in seed 000 was exactly that mismatch). `/metrics`: Prometheus text."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.control import Identity
from shared.errors import RunwireError

from .api import scheduler_call
from .keys import CLUSTER_HEALTH, HUB, REGISTRY, SETTINGS

log = logging.getLogger(__name__)

IDENTITY_TIMEOUT = 2.0


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, ValueError):
        return False


def _mismatch(who: str, theirs: str, ours: Path) -> str:
    return (f"JOURNAL DIRECTORY MISMATCH: {who} writes journals to {theirs} but the gateway reads {ours}; "
            "point every service at one config/RUNWIRE_HOME")


async def _check_scheduler(request: web.Request, journal_dir: Path) -> dict[str, Any]:
    settings = request.app[SETTINGS]
    endpoint = settings.config.scheduler.control
    try:
        info = await scheduler_call(request, Identity(), IDENTITY_TIMEOUT)
    except RunwireError as e:
        return {"ok": False, "endpoint": endpoint, "detail": f"scheduler not reachable on {endpoint}: {e}"}
    theirs = info.journal_dir
    if settings.config.cluster is None and not _same_dir(theirs, journal_dir):
        return {"ok": False, "endpoint": endpoint, "journal_dir": theirs, "detail": _mismatch("the scheduler", theirs, journal_dir)}
    return {"ok": True, "endpoint": endpoint, "journal_dir": theirs, "pid": info.pid,
            "detail": f"scheduler answers on {endpoint}"}


def _check_publishers(request: web.Request, journal_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The runner check, from heartbeats; plus mismatches any publisher (the scheduler too) reports."""
    settings = request.app[SETTINGS]
    stale_after = settings.config.gateway.runner_stale_after
    hub = request.app[HUB]
    now = time.monotonic()
    runners: dict[str, Any] = {}
    mismatches: list[str] = []
    stopped: list[str] = []
    cluster = settings.config.cluster is not None  # each host has its own journal directory
    for pid, seen in hub.publishers.items():
        age = now - seen.at
        # a publisher whose last heartbeat said it was stopping is gone now, not merely late
        fresh = age <= stale_after and not seen.hb.stopping
        same = cluster or _same_dir(seen.hb.journal_dir, journal_dir)
        if fresh and not same:
            mismatches.append(_mismatch(f"{seen.hb.service} {pid}", seen.hb.journal_dir, journal_dir))
        if seen.hb.service != "scheduler":
            if seen.hb.stopping:
                stopped.append(f"runner {pid} stopped ({age:.1f}s ago, its last heartbeat said it was stopping)")
            # Heartbeat.runs lists the runs the runner owns now AND those it ended in the last
            # ENDED_RUNS_KEPT_S seconds: report both counts, as the journal we read knows them
            active = sum(1 for rid in seen.hb.runs if (e := hub.index.get(rid)) is None or not e.ended)
            runners[pid] = {"fresh": fresh, "stopping": seen.hb.stopping, "age_s": round(age, 3),
                            "journal_dir": seen.hb.journal_dir, "same_journal_dir": same,
                            "runs_listed": len(seen.hb.runs), "runs_active": active}
    fresh_ok = [pid for pid, r in runners.items() if r["fresh"] and r["same_journal_dir"]]
    endpoints = ", ".join(settings.config.gateway.subscribe)
    if fresh_ok:
        check = {"ok": True, "runners": runners, "detail": f"runner heartbeat from {', '.join(sorted(fresh_ok))}"}
    elif any(r["fresh"] for r in runners.values()):
        bad = [m for m in mismatches if "runner" in m] or mismatches
        check = {"ok": False, "runners": runners, "detail": "; ".join(bad)}
    elif stopped:
        check = {"ok": False, "runners": runners, "detail": "; ".join(sorted(stopped))}
    else:
        check = {"ok": False, "runners": runners,
                 "detail": f"runner not reachable: no runner heartbeat within {stale_after:g}s on {endpoints}"}
    return check, mismatches


def _check_journal_dir(journal_dir: Path) -> dict[str, Any]:
    if not journal_dir.is_dir():
        return {"ok": False, "path": str(journal_dir), "detail": f"journal directory {journal_dir} does not exist"}
    if not os.access(journal_dir, os.R_OK | os.X_OK):
        return {"ok": False, "path": str(journal_dir), "detail": f"journal directory {journal_dir} is not readable"}
    return {"ok": True, "path": str(journal_dir), "detail": f"reading journals in {journal_dir}"}


async def healthz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    journal_dir = settings.journal_dir
    checks: dict[str, Any] = {}

    async def scheduler() -> None:
        checks["scheduler"] = await _check_scheduler(request, journal_dir)

    cluster = request.app.get(CLUSTER_HEALTH)
    required = ("scheduler", "runner", "journal_dir") if cluster is None else ("scheduler", "runner", "event_stream")
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler)
        if cluster is None:
            checks["journal_dir"] = await anyio.to_thread.run_sync(_check_journal_dir, journal_dir)
        else:
            # the gateway's host has no journals: its source is the event stream; the registry (PostgreSQL)
            # away is shown but does not fail the check (the last known runners are still followed)
            checks.update(cluster())
        checks["runner"], mismatches = _check_publishers(request, journal_dir)
    if mismatches and checks["scheduler"]["ok"]:
        sched = [m for m in mismatches if "scheduler" in m]
        if sched:
            checks["scheduler"] = {**checks["scheduler"], "ok": False, "detail": sched[0]}
    failed = [name for name in required if not checks[name]["ok"]]
    body: dict[str, Any] = {"status": "fail" if failed else "ok", "journal_dir": str(journal_dir),
                            "config_path": str(settings.path), "checks": checks}
    degraded = [name for name in checks if name not in required and not checks[name]["ok"]]
    if degraded:
        body["degraded"] = degraded
    if failed:
        message = "; ".join(f"{name}: {checks[name]['detail']}" for name in failed)
        body["failed"] = failed
        body["error"] = {"code": "unhealthy", "message": message}
        return web.json_response(body, status=503)
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[REGISTRY])
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})
