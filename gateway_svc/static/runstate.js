// A run's state folded from its events: the same rules as shared/runstate.py (one meaning of "running"
// or "failed"), plus per-item metrics. Also turns the API's run objects into the same shape.

import { ITEM_FIELDS, RUN_FIELDS } from "./shapes.js";

export const TERMINAL = new Set(["success", "failure", "cancelled"]);
const STAGE_STATUS = { start: "running", success: "success", failure: "failure", skipped: "skipped", cancelled: "cancelled" };

export function newRun(runId) {
  return {
    run_id: runId, status: "queued", pipeline: "", params: {}, trigger: "manual", schedule: null, slot: null,
    queued_at: null, started_at: null, ended_at: null, msg: "", last_seq: 0,
    stages: new Map(), // name -> stage, in the order stages first appeared
  };
}

function newStage(name) {
  return { name, status: "pending", started_at: null, ended_at: null, msg: "", metrics: {}, items: new Map() };
}

function newItem() {
  return { status: "running", started_at: null, ended_at: null, msg: "", metrics: {} };
}

export function isEnded(run) {
  return TERMINAL.has(run.status);
}

// Fold one event in; the caller guarantees seq order (it drops seq <= last_seq).
export function applyEvent(run, ev) {
  run.last_seq = ev.seq;
  const data = ev.data || {};
  if (ev.stage === "pipeline") {
    if (ev.event === "queued") {
      run.queued_at = ev.timestamp;
      if (data.pipeline !== undefined) run.pipeline = String(data.pipeline);
      if (data.params && typeof data.params === "object") run.params = data.params;
      if (data.trigger !== undefined) run.trigger = String(data.trigger);
      run.schedule = data.schedule || run.schedule;
      run.slot = data.slot || run.slot;
    } else if (ev.event === "start") {
      run.status = "running";
      run.started_at = ev.timestamp;
    } else if (TERMINAL.has(ev.event)) {
      run.status = ev.event;
      run.ended_at = ev.timestamp;
      run.msg = ev.msg || "";
    } else if (ev.event === "skipped") {
      run.msg = ev.msg || run.msg;
    }
    return;
  }
  let stage = run.stages.get(ev.stage);
  if (!stage) run.stages.set(ev.stage, (stage = newStage(ev.stage)));
  const item = data.item;
  if (ev.event === "metric") {
    stage.metrics = { ...stage.metrics, ...data };
    if (item !== undefined && item !== null) {
      const it = itemOf(stage, String(item));
      const { item: _, ...rest } = data;
      it.metrics = { ...it.metrics, ...rest };
    }
    return;
  }
  const status = STAGE_STATUS[ev.event];
  if (!status) return;
  if (item !== undefined && item !== null) {
    const it = itemOf(stage, String(item));
    it.status = status;
    if (ev.event === "start") it.started_at = ev.timestamp;
    else { it.ended_at = ev.timestamp; it.msg = ev.msg || ""; }
    return;
  }
  stage.status = status;
  if (ev.event === "start") stage.started_at = ev.timestamp;
  else { stage.ended_at = ev.timestamp; stage.msg = ev.msg || ""; }
}

function itemOf(stage, name) {
  let it = stage.items.get(name);
  if (!it) stage.items.set(name, (it = newItem()));
  return it;
}

// A RunView (GET /api/runs) or a RunPage (GET /api/runs/{id}, with its stages) -> the dashboard's
// shape. The fields are those of shapes.js, checked against the Structs; a null keeps the default.
export function runFromApi(raw) {
  const run = newRun(String(raw.run_id));
  for (const k of RUN_FIELDS) if (k !== "run_id" && raw[k] !== null) run[k] = raw[k];
  for (const s of raw.stages || []) { // a RunView has none
    const stage = newStage(s.name);
    for (const k of ITEM_FIELDS) if (s[k] !== null) stage[k] = s[k]; // a stage's own status fields are an item's
    stage.metrics = { ...s.metrics };
    for (const [iname, i] of Object.entries(s.items)) {
      const it = newItem();
      for (const k of ITEM_FIELDS) if (i[k] !== null) it[k] = i[k];
      stage.items.set(iname, it);
    }
    run.stages.set(s.name, stage);
  }
  return run;
}
