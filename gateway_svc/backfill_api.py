"""Re-runs and backfills over HTTP, forwarded to the scheduler after the request's terms are checked here
(a 400 naming the field before anyone is asked). The answers are the scheduler's typed replies
(`shared.replies`):

POST /api/runs/{run_id}/rerun  {"from_failed": bool (default false)}
    202 RerunResult {"run_id", "status": "queued", "rerun_of", "from_stage": str|null, "skipped_stages": [..]}
    404 no such run; 409 conflict: the run has not ended, or (from_failed) nothing failed, or an earlier
    stage declares no outputs or its outputs are not present (the message names the stage).
POST /api/schedules/{name}/backfill
    {"from": time, "to": time, "policy": "missing"|"failed"|"all" (missing), "max_parallel": 1..100 (1),
     "dry_run": bool (false)}   times: ISO 8601, a date or a time; without an offset, in the schedule's zone
    202 BackfillResult {"dry_run": false, "schedule", "policy", "slots": [BackfillSlot], "progress": BackfillProgress|null}
    200 the same for a dry run (nothing created; "progress" null)
    BackfillSlot = {"slot": ISO UTC, "action": "run"|"skip", "run_id": str|null, "rerun_of": str|null, "reason": str}
    400 bad_params naming from, to, policy or max_parallel; 404 unknown schedule
GET /api/backfills?limit=   (1..1000, default 50)
    200 BackfillList {"backfills": [BackfillProgress, ...]} newest first
    BackfillProgress = {"backfill_id", "schedule", "start", "end", "policy", "max_parallel", "created_at", "done",
                        "total", "pending", "queued", "running", "success", "failure", "cancelled"}
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

from aiohttp import web

from shared.backfill import check_max_parallel, check_policy, check_window, parse_moment
from shared.control import Backfill, ListBackfills, Rerun
from shared.ids import check_run_id

from .api import json_answer, scheduler_call
from .errors import HttpError
from .keys import SETTINGS
from .params import int_param, json_body

_BACKFILL_FIELDS = ("from", "to", "policy", "max_parallel", "dry_run")


def _unknown_fields(body: dict[str, object], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise HttpError(400, "bad_request", f"unknown field {unknown[0]!r} in the body (expected {', '.join(allowed)})")


def _flag(body: dict[str, object], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise HttpError(400, "bad_request", f"field {name!r}: expected true or false")
    return value


async def rerun_run(request: web.Request) -> web.Response:
    run_id = check_run_id(request.match_info["run_id"])
    settings = request.app[SETTINGS]
    body = await json_body(request, settings.config.gateway.max_body_bytes, required=False)
    _unknown_fields(body, ("from_failed",))
    result = await scheduler_call(request, Rerun(run_id=run_id, from_failed=_flag(body, "from_failed")))
    return json_answer(result, status=202)


async def backfill_schedule(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    name = request.match_info["name"]
    schedule = settings.config.schedules.get(name)
    if schedule is None:
        known = ", ".join(sorted(settings.config.schedules)) or "none"
        raise HttpError(404, "not_found", f"schedule {name[:80]!r} not found (configured: {known})")
    body = await json_body(request, settings.config.gateway.max_body_bytes)
    _unknown_fields(body, _BACKFILL_FIELDS)
    tz = ZoneInfo(schedule.timezone or settings.config.timezone)
    for field in ("from", "to"):
        if field not in body:
            raise HttpError(400, "bad_params", f"field {field!r}: required (an ISO 8601 time)")
    check_window(parse_moment(body["from"], tz, "from"), parse_moment(body["to"], tz, "to"))  # BadParams -> 400
    policy = check_policy(body.get("policy", "missing"))
    max_parallel = check_max_parallel(body.get("max_parallel", 1))
    dry_run = _flag(body, "dry_run")
    req = Backfill(schedule=name, start=str(body["from"]), end=str(body["to"]), policy=policy,
                   max_parallel=max_parallel, dry_run=dry_run)
    result = await scheduler_call(request, req)
    return json_answer(result, status=200 if dry_run else 202)


async def list_backfills(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", default=50, lo=1, hi=1000)
    return json_answer(await scheduler_call(request, ListBackfills(limit=limit)))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/runs/{run_id}/rerun", rerun_run)
    app.router.add_post("/api/schedules/{name}/backfill", backfill_schedule)
    app.router.add_get("/api/backfills", list_backfills)
