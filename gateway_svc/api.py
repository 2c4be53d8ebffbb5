"""The gateway's HTTP API (CONTRACT.md "HTTP"): run lists and details from the journals, control
requests forwarded to the scheduler. JSON shapes, for the dashboard and other clients:

GET /api/runs?status=&limit=&include_probes=1&pipeline=&before=
    200 {"runs": [RunSummary, ...], "next_before": "<run_id>" | null}
    newest first (by the time the run was queued); `status` one of queued, running, success, failure,
    cancelled; `limit` 1..1000 (default 100); `before` = a run id: the page after that run
    (`next_before` of the previous page); probe runs (trigger "probe") only with include_probes=1.
    RunSummary = {"run_id": str, "pipeline": str, "status": str, "trigger": "manual"|"schedule"|"probe",
                  "schedule": str|null, "slot": str|null, "params": {...},
                  "queued_at": str|null, "started_at": str|null, "ended_at": str|null,
                  "msg": str (the terminal event's msg), "last_seq": int,
                  "waiting": str|null (queued runs: why, as the scheduler says, e.g. "waiting for a runner")}

GET /api/runs/{run_id}
    200 {"run_id", "pipeline", "status", "trigger", "schedule", "slot", "params", "queued_at", "started_at",
         "ended_at", "msg", "last_seq", "waiting" (as above),
         "stages": [StageState, ...]   (the pipeline's stages in config order, then any others seen),
         "scheduler": {...} | null     (the scheduler's GetRun answer for a run not ended, when it answers)}
    StageState = {"name": str, "status": "pending"|"running"|"success"|"failure"|"skipped"|"cancelled",
                  "started_at": str|null, "ended_at": str|null, "msg": str,
                  "metrics": {...latest metric data...},
                  "items": {"<item>": {"status", "started_at", "ended_at", "msg"}}   (fan-out items)}
    400 invalid_run_id, 404 not_found

GET /api/runs/{run_id}/events?after_seq=N&limit=M   (M 1..10000, default 1000)
    200 {"run_id": str, "events": [Event, ...], "next_after_seq": int, "more": bool}

POST /api/runs  {"pipeline": str, "params": {...}}  -> 202 {"run_id": str, "status": "queued"}
POST /api/runs/{run_id}/cancel                      -> 202 {"run_id": str, "status": "cancelling"|...}
GET  /api/pipelines -> 200 {"pipelines": [{"name", "description", "stages": [names],
                              "params": [{"name", "type", "default", "choices", "description"}]}]}
GET  /api/schedules -> 200 {"schedules": [...as the scheduler answers ListSchedules...]}
POST /api/schedules/{name}/pause | /resume -> 200 {...the scheduler's answer...}

Errors: {"error": {"code": str, "message": str}}: 400 bad input (invalid_run_id, unknown_pipeline,
bad_params, bad_request), 401 unauthorized, 404 not_found, 409 conflict, 413 body_too_large,
503 unavailable (the scheduler did not answer: nothing was done).
"""
