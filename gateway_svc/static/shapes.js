// The fields the page reads from the gateway's JSON answers, one list per Struct that answers them
// (shared/httpapi.py, shared/replies.py, shared/runstate.py): tests/test_dashboard_shapes.py checks
// that every name here is a field of the Struct named after the list, so a renamed field fails a test.

export const RUN_FIELDS = ["run_id", "status", "pipeline", "trigger", "schedule", "slot", "params", "queued_at", "started_at", "ended_at", "msg", "last_seq", "waiting"]; // RunView
export const RUN_PAGE_FIELDS = ["stages"]; // RunPage (a RunView with its stages, a list in the pipeline's order)
export const STAGE_FIELDS = ["name", "status", "started_at", "ended_at", "msg", "metrics", "items"]; // StageState
export const ITEM_FIELDS = ["status", "started_at", "ended_at", "msg"]; // ItemState
export const RUNS_PAGE_FIELDS = ["runs"]; // RunsPage
export const PIPELINES_PAGE_FIELDS = ["pipelines"]; // PipelinesPage
export const PIPELINE_FIELDS = ["name", "description", "stages", "params"]; // PipelineView
export const PARAM_FIELDS = ["name", "type", "default", "choices", "description"]; // ParamView
export const SCHEDULES_PAGE_FIELDS = ["schedules"]; // SchedulesPage
export const SCHEDULE_FIELDS = ["name", "pipeline", "spec", "timezone", "enabled", "next_fire"]; // ScheduleInfo
export const RERUN_LINK_FIELDS = ["status", "rerun_of", "from_stage", "reruns"]; // RunPage (reruns.js: the links between a run and its re-runs)
export const RERUN_RESULT_FIELDS = ["run_id", "from_stage", "skipped_stages"]; // RerunResult
export const BACKFILL_LIST_FIELDS = ["backfills"]; // BackfillList
export const BACKFILL_FIELDS = ["backfill_id", "schedule", "start", "end", "policy", "max_parallel", "done", "total", "pending", "queued", "running", "success", "failure", "cancelled"]; // BackfillProgress
export const RUN_ALERTS_FIELDS = ["alerts"]; // RunPage (its alert deliveries: gateway_svc/static/runalerts.js)
export const ALERT_FIELDS = ["alert", "kind", "outcome", "attempts", "status", "error", "time"]; // AlertView
export const HEALTH_FIELDS = ["status", "checks", "failed", "error"]; // Health (health.js)
export const HEALTH_CHECKS_FIELDS = ["scheduler", "runner", "journal_dir"]; // HealthChecks (health.js names them)
export const HEALTH_CHECK_FIELDS = ["ok", "detail"]; // HealthCheck
export const HEALTH_ERROR_FIELDS = ["message"]; // HealthError
