"""`/healthz`: are the scheduler and a runner reachable, and do they write the journal directory the
gateway reads? (the first cause in seed 000 was exactly that mismatch). `/metrics`: Prometheus text."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import anyio
import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.control import Identity
from shared.errors import RunwireError
from shared.httpapi import (
    EventStreamHealth,
    Health,
    HealthChecks,
    HealthError,
    JournalDirHealth,
    RegistryHealth,
    RunnerHealth,
    RunnersHealth,
    SchedulerHealth,
)

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


async def _check_scheduler(request: web.Request, journal_dir: Path) -> SchedulerHealth:
    settings = request.app[SETTINGS]
    endpoint = settings.config.scheduler.control
    try:
        info = await scheduler_call(request, Identity(), IDENTITY_TIMEOUT)
    except RunwireError as e:
        return SchedulerHealth(ok=False, endpoint=endpoint, detail=f"scheduler not reachable on {endpoint}: {e}")
    theirs = info.journal_dir
    if settings.config.cluster is None and not _same_dir(theirs, journal_dir):
        return SchedulerHealth(ok=False, endpoint=endpoint, journal_dir=theirs, detail=_mismatch("the scheduler", theirs, journal_dir))
    return SchedulerHealth(ok=True, endpoint=endpoint, journal_dir=theirs, pid=info.pid, detail=f"scheduler answers on {endpoint}")


def _check_publishers(request: web.Request, journal_dir: Path) -> tuple[RunnersHealth, list[str]]:
    """The runner check, from heartbeats; plus mismatches any publisher (the scheduler too) reports."""
    settings = request.app[SETTINGS]
    stale_after = settings.config.gateway.runner_stale_after
    hub = request.app[HUB]
    now = time.monotonic()
    runners: dict[str, RunnerHealth] = {}
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
            runners[pid] = RunnerHealth(fresh=fresh, stopping=seen.hb.stopping, age_s=round(age, 3),
                                        journal_dir=seen.hb.journal_dir, same_journal_dir=same,
                                        runs_listed=len(seen.hb.runs), runs_active=active)
    fresh_ok = [pid for pid, r in runners.items() if r.fresh and r.same_journal_dir]
    endpoints = ", ".join(settings.config.gateway.subscribe)
    if fresh_ok:
        check = RunnersHealth(ok=True, runners=runners, detail=f"runner heartbeat from {', '.join(sorted(fresh_ok))}")
    elif any(r.fresh for r in runners.values()):
        bad = [m for m in mismatches if "runner" in m] or mismatches
        check = RunnersHealth(ok=False, runners=runners, detail="; ".join(bad))
    elif stopped:
        check = RunnersHealth(ok=False, runners=runners, detail="; ".join(sorted(stopped)))
    else:
        check = RunnersHealth(ok=False, runners=runners,
                              detail=f"runner not reachable: no runner heartbeat within {stale_after:g}s on {endpoints}")
    return check, mismatches


def _check_journal_dir(journal_dir: Path) -> JournalDirHealth:
    path = str(journal_dir)
    if not journal_dir.is_dir():
        return JournalDirHealth(ok=False, path=path, detail=f"journal directory {journal_dir} does not exist")
    if not os.access(journal_dir, os.R_OK | os.X_OK):
        return JournalDirHealth(ok=False, path=path, detail=f"journal directory {journal_dir} is not readable")
    return JournalDirHealth(ok=True, path=path, detail=f"reading journals in {journal_dir}")


async def healthz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    journal_dir = settings.journal_dir
    scheduler: list[SchedulerHealth] = []

    async def check_scheduler() -> None:
        scheduler.append(await _check_scheduler(request, journal_dir))

    cluster = request.app.get(CLUSTER_HEALTH)
    journal_check: JournalDirHealth | None = None
    event_stream: EventStreamHealth | None = None
    registry: RegistryHealth | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(check_scheduler)
        runner_check, mismatches = _check_publishers(request, journal_dir)
        if cluster is None:
            journal_check = await anyio.to_thread.run_sync(_check_journal_dir, journal_dir)
        else:
            # the gateway's host has no journals: its source is the event stream; the registry (PostgreSQL)
            # away is shown but does not fail the check (the last known runners are still followed)
            event_stream, registry = cluster()
    checks = HealthChecks(scheduler=scheduler[0], runner=runner_check, journal_dir=journal_check,
                          event_stream=event_stream, registry=registry)
    if mismatches and checks.scheduler.ok:
        sched = [m for m in mismatches if "scheduler" in m]
        if sched:
            checks.scheduler = msgspec.structs.replace(checks.scheduler, ok=False, detail=sched[0])
    present = {name: check for name in HealthChecks.__struct_fields__ if (check := getattr(checks, name)) is not None}
    required = ("scheduler", "runner", "journal_dir") if cluster is None else ("scheduler", "runner", "event_stream")
    failed = [name for name in required if not present[name].ok]
    degraded = [name for name, check in present.items() if name not in required and not check.ok]
    error = (HealthError(code="unhealthy", message="; ".join(f"{name}: {present[name].detail}" for name in failed))
             if failed else None)
    body = Health(status="fail" if failed else "ok", journal_dir=str(journal_dir), config_path=str(settings.path),
                  checks=checks, failed=failed, degraded=degraded, error=error)
    return web.Response(body=msgspec.json.encode(body), status=503 if failed else 200, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[REGISTRY])
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})
