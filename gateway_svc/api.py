"""The gateway's HTTP API (CONTRACT.md "HTTP"): run lists and details from the journals, control
requests forwarded to the scheduler. Every answer is a Struct of `shared.httpapi` (or the scheduler's
typed reply, `shared.replies`); the JSON shapes, for the dashboard and other clients:

GET /api/runs?status=&limit=&include_probes=1&pipeline=&before=
    200 {"runs": [RunSummary, ...], "next_before": "<run_id>" | null}
    newest first (by the time the run was queued); `status` one of queued, running, success, failure,
    cancelled; `limit` 1..1000 (default 100); `before` = a run id: the page after that run
    (`next_before` of the previous page); probe runs (trigger "probe") only with include_probes=1.
    RunSummary = {"run_id": str, "pipeline": str, "status": str, "trigger": "manual"|"schedule"|"rerun"|"backfill"|"probe",
                  "schedule": str|null, "slot": str|null, "params": {...},
                  "queued_at": str|null, "started_at": str|null, "ended_at": str|null,
                  "msg": str (the terminal event's msg), "last_seq": int,
                  "waiting": str|null (queued runs: why, as the scheduler says, e.g. "waiting for a runner";
                                       null for any other run),
                  "rerun_of": str|null (the run this one repeats), "from_stage": str|null (a re-run from a
                                       failed stage: where it started)}

GET /api/runs/{run_id}
    200 {"run_id", "pipeline", "status", "trigger", "schedule", "slot", "params", "queued_at", "started_at",
         "ended_at", "msg", "last_seq", "waiting" (as above),
         "stages": [StageState, ...]   (the pipeline's stages in config order, then any others seen),
         "scheduler": {...} | null     (the scheduler's GetRun answer for a run not ended, when it answers),
         "reruns": [run_id, ...]       (runs whose queued event names this one as rerun_of, oldest first),
         "alerts": [AlertView, ...]    (its alert webhooks, from <home>/alerts/<run_id>.jsonl)}
    AlertView = {"id": str, "alert": str, "kind": str, "outcome": "sent"|"retrying"|"failed",
                 "attempts": int, "status": int|null (HTTP), "error": str|null, "time": str}  (latest attempt)
    StageState = {"name": str, "status": "pending"|"running"|"success"|"failure"|"skipped"|"cancelled",
                  "started_at": str|null, "ended_at": str|null, "msg": str,
                  "metrics": {...latest metric data...},
                  "items": {"<item>": {"status", "started_at", "ended_at", "msg"}}   (fan-out items)}
    400 invalid_run_id, 404 not_found

GET /api/runs/{run_id}/events?after_seq=N&limit=M   (M 1..10000, default 1000)
    200 {"run_id": str, "events": [Event, ...], "next_after_seq": int, "more": bool,
         "gaps": [[N, M], ...]}   (seqs N..M missing from the journal between after_seq and the last
                                   event returned: corrupt lines its reader skipped; usually [])

POST /api/runs  {"pipeline": str, "params": {...}}  -> 202 {"run_id": str, "status": "queued"}
    optional header Idempotency-Key (1-255 visible ASCII, else 400): a retry with the same key within a
    day answers 202 with the first run's id and current status (and `Idempotent-Replayed: true`), never a
    second run; the same key with another pipeline or other params is 409 conflict. 503: no run happens.
POST /api/runs/{run_id}/cancel                      -> 202 {"run_id": str, "status": "cancelling"|...}
GET  /api/pipelines -> 200 {"pipelines": [{"name", "description", "stages": [names],
                              "params": [{"name", "type", "default", "choices", "description"}]}]}
GET  /api/schedules -> 200 {"schedules": [ScheduleInfo, ...]}   (shared/replies.py, as the scheduler answers)
POST /api/schedules/{name}/pause | /resume -> 200 ScheduleInfo (the schedule after the change)

Errors: {"error": {"code": str, "message": str}}: 400 bad input (invalid_run_id, unknown_pipeline,
bad_params, bad_request), 401 unauthorized, 404 not_found, 409 conflict, 413 body_too_large,
502 bad_reply (the scheduler's answer was not of the request's reply type: another version?),
503 unavailable (the scheduler did not answer: nothing was done).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, TypeVar

import anyio
import msgspec
from aiohttp import web

from shared.alertlog import read_attempts, summarize
from shared.config import Settings
from shared.control import (
    Cancel,
    ControlClient,
    GetRun,
    Launch,
    ListRuns,
    ListSchedules,
    Pause,
    Request,
    Resume,
    check_idempotency_key,
)
from shared.errors import ProtocolError, RunwireError
from shared.httpapi import (
    EventsPage,
    Launched,
    ParamView,
    PipelinesPage,
    PipelineView,
    RunPage,
    RunsPage,
    RunView,
    SchedulesPage,
)
from shared.ids import check_run_id
from shared.params import resolve_params
from shared.runstate import RUN_STATUSES, RunState, StageState

from .errors import HttpError
from .keys import HUB, INDEX, SETTINGS, ZMQ
from .params import flag_param, int_param, json_body

if TYPE_CHECKING:
    from .cluster_routes import ClusterRoutes

log = logging.getLogger(__name__)

CLUSTER_ROUTES: web.AppKey[ClusterRoutes] = web.AppKey("cluster_routes")  # cluster mode only (add_routes)
MAX_SEQ = 2**53
_SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_ASIDE_TIMEOUT = 1.0  # seconds for scheduler calls that only add detail to an answer from the journals


R = TypeVar("R", bound=msgspec.Struct)
_json = msgspec.json.Encoder()


def json_answer(body: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, headers=headers, content_type="application/json")


async def scheduler_call(request: web.Request, req: Request[R], timeout: float | None = None) -> R:
    """One request to the scheduler's control socket, answered with its reply type; ServiceUnavailable
    (-> 503) when it does not answer, BadReply (-> 502) when the answer is not of that type."""
    settings = request.app[SETTINGS]
    sched = settings.config.scheduler
    # cluster mode: the leading scheduler's, from the cluster's database
    endpoint = sched.control if settings.config.cluster is None else await request.app[CLUSTER_ROUTES].leader_control()
    async with ControlClient(endpoint, timeout or sched.request_timeout, request.app[ZMQ], request.app[HUB].keys) as client:
        return await client.call(req)


async def _scheduler_aside(request: web.Request, req: Request[R]) -> R | None:
    """A scheduler answer that only adds detail: None (logged) when it does not come."""
    try:
        return await scheduler_call(request, req, _ASIDE_TIMEOUT)
    except RunwireError as e:
        log.debug("scheduler aside %s: %s", type(req).__name__, e)
        return None


def _where(request: web.Request) -> str:
    """Where runs are read, for a 404: the journal directory, or the event stream (cluster mode)."""
    return str(request.app[SETTINGS].journal_dir) if request.app[HUB].source.local else "the event stream"


def _view(st: RunState) -> RunView:
    return RunView(
        run_id=st.run_id, pipeline=st.pipeline, status=st.status, trigger=st.trigger,
        schedule=st.schedule, slot=st.slot, params=st.params,
        queued_at=st.queued_at, started_at=st.started_at, ended_at=st.ended_at,
        msg=st.msg, last_seq=st.last_seq, rerun_of=st.rerun_of, from_stage=st.from_stage,
    )


def _page(settings: Settings, st: RunState) -> RunPage:
    pipeline = settings.config.pipelines.get(st.pipeline)
    order = [s.name for s in pipeline.stages] if pipeline is not None else []
    order += [name for name in st.stages if name not in order]
    return RunPage(**msgspec.structs.asdict(_view(st)),
                   stages=[st.stages.get(name) or StageState(name=name) for name in order])


# ---------------------------------------------------------------------------- runs (from the journals)


async def list_runs(request: web.Request) -> web.Response:
    index = request.app[INDEX]
    status = request.query.get("status") or None
    if status is not None and status not in RUN_STATUSES:
        raise HttpError(400, "bad_request", f"query parameter 'status': expected one of {', '.join(RUN_STATUSES)}")
    limit = int_param(request, "limit", default=100, lo=1, hi=1000)
    include_probes = flag_param(request, "include_probes")
    pipeline = request.query.get("pipeline") or None
    before = request.query.get("before") or None
    if before is not None:
        check_run_id(before)
    runs: list[RunView] = []
    skipping = before is not None
    for entry in index.newest_first():
        if skipping:
            skipping = entry.run_id != before
            continue
        st = entry.state
        if (status is not None and st.status != status) or (pipeline is not None and st.pipeline != pipeline):
            continue
        if st.trigger == "probe" and not include_probes:
            continue
        runs.append(_view(st))
        if len(runs) > limit:
            break
    next_before = runs[limit - 1].run_id if len(runs) > limit else None
    runs = runs[:limit]
    if any(r.status == "queued" for r in runs):
        answer = await _scheduler_aside(request, ListRuns(status="queued", limit=1000))
        if answer is not None:
            waiting = {s.run_id: s.waiting for s in answer.runs}
            for r in runs:
                if r.status == "queued":
                    r.waiting = waiting.get(r.run_id)
    return json_answer(RunsPage(runs=runs, next_before=next_before))


async def get_run(request: web.Request) -> web.Response:
    run_id = check_run_id(request.match_info["run_id"])
    settings, index = request.app[SETTINGS], request.app[INDEX]
    source = request.app[HUB].source
    state = index.cached_detail(run_id)
    if state is None:
        state = await source.fold(run_id)
        if state is None:
            raise HttpError(404, "not_found", f"no run {run_id} in {_where(request)}")
        index.remember_detail(state)
    page = _page(settings, state)
    page.reruns = index.reruns_of(run_id)
    page.alerts = summarize(await anyio.to_thread.run_sync(read_attempts, settings.home, run_id))
    if not state.ended:
        page.scheduler = await _scheduler_aside(request, GetRun(run_id=run_id))
        page.waiting = page.scheduler.waiting if page.scheduler is not None else None
    return json_answer(page)


async def run_events(request: web.Request) -> web.Response:
    run_id = check_run_id(request.match_info["run_id"])
    after_seq = int_param(request, "after_seq", default=0, lo=0, hi=MAX_SEQ)
    limit = int_param(request, "limit", default=1000, lo=1, hi=10_000)
    source = request.app[HUB].source
    if not await source.exists(run_id):
        raise HttpError(404, "not_found", f"no run {run_id} in {_where(request)}")
    events = await source.page(run_id, after_seq, limit + 1)
    more = len(events) > limit
    events = events[:limit]
    next_after = events[-1].seq if events else after_seq
    gaps: list[list[int]] = []
    prev = after_seq
    for ev in events:
        if ev.seq > prev + 1:
            gaps.append([prev + 1, ev.seq - 1])
        prev = ev.seq
    hub = request.app[HUB]
    for lo, hi in gaps:
        hub.note_gap(run_id, lo, hi)
    return json_answer(EventsPage(run_id=run_id, events=events, next_after_seq=next_after, more=more, gaps=gaps))


# ---------------------------------------------------------------------------- control (the scheduler)


async def launch_run(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body = await json_body(request, settings.config.gateway.max_body_bytes)
    name = body.get("pipeline")
    params = body.get("params", {})
    unknown = sorted(set(body) - {"pipeline", "params"})
    if unknown:
        raise HttpError(400, "bad_request", f"unknown field {unknown[0]!r} in the body (expected pipeline, params)")
    if not isinstance(name, str) or not name:
        raise HttpError(400, "bad_request", "field 'pipeline': expected the name of a configured pipeline")
    if not isinstance(params, dict):
        raise HttpError(400, "bad_params", "field 'params': expected an object")
    resolve_params(settings.pipeline(name), params)  # UnknownPipeline / BadParams -> 400 before asking anyone
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        try:
            check_idempotency_key(key)
        except ProtocolError as e:
            raise HttpError(400, "bad_request", f"header {e}") from e
    if settings.config.cluster is None:
        result = await scheduler_call(request, Launch(pipeline=name, params=params, idempotency_key=key))
    else:  # a row in the cluster's launches table; the leading scheduler claims it
        result = await request.app[CLUSTER_ROUTES].launch(name, resolve_params(settings.pipeline(name), params), key)
    headers = {"Idempotent-Replayed": "true"} if result.replayed else None  # a retry: the first run's answer
    return json_answer(Launched(run_id=result.run_id, status=result.status), status=202, headers=headers)


async def cancel_run(request: web.Request) -> web.Response:
    run_id = check_run_id(request.match_info["run_id"])
    settings = request.app[SETTINGS]
    body = await json_body(request, settings.config.gateway.max_body_bytes, required=False)
    reason = body.get("reason", "cancelled via the API")
    if not isinstance(reason, str) or len(reason) > 500:
        raise HttpError(400, "bad_request", "field 'reason': expected a string of at most 500 characters")
    return json_answer(await scheduler_call(request, Cancel(run_id=run_id, reason=reason)), status=202)


def _schedule_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not _SCHEDULE_NAME.match(name):
        raise HttpError(400, "bad_request", f"invalid schedule name {name[:80]!r}")
    return name


async def list_schedules(request: web.Request) -> web.Response:
    result = await scheduler_call(request, ListSchedules())
    return json_answer(SchedulesPage(schedules=result.schedules))


async def pause_schedule(request: web.Request) -> web.Response:
    return json_answer(await scheduler_call(request, Pause(name=_schedule_name(request))))


async def resume_schedule(request: web.Request) -> web.Response:
    return json_answer(await scheduler_call(request, Resume(name=_schedule_name(request))))


# ---------------------------------------------------------------------------- config


async def list_pipelines(request: web.Request) -> web.Response:
    config = request.app[SETTINGS].config
    pipelines = [
        PipelineView(
            name=name, description=p.description, stages=[s.name for s in p.stages],
            params=[ParamView(name=pname, type=spec.type, default=spec.default, choices=spec.choices,
                              description=spec.description)
                    for pname, spec in p.params.items()],
        )
        for name, p in sorted(config.pipelines.items())
    ]
    return json_answer(PipelinesPage(pipelines=pipelines))


def add_routes(app: web.Application) -> None:
    cluster = app[SETTINGS].config.cluster
    if cluster is not None:  # loaded only in cluster mode
        from .cluster_routes import ClusterRoutes
        app[CLUSTER_ROUTES] = routes = ClusterRoutes(cluster)
        app.on_cleanup.append(routes.close)
    app.router.add_get("/api/pipelines", list_pipelines)
    app.router.add_get("/api/runs", list_runs)
    app.router.add_post("/api/runs", launch_run)
    app.router.add_get("/api/runs/{run_id}", get_run)
    app.router.add_get("/api/runs/{run_id}/events", run_events)
    app.router.add_post("/api/runs/{run_id}/cancel", cancel_run)
    app.router.add_get("/api/schedules", list_schedules)
    app.router.add_post("/api/schedules/{name}/pause", pause_schedule)
    app.router.add_post("/api/schedules/{name}/resume", resume_schedule)
