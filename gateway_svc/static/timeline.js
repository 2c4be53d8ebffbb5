// A run's timeline: one row for the run, one per stage, one per fan-out item; each a bar from start to
// end (or to now, growing, while running), coloured and patterned by outcome, with its label beside it.

import { el, parseTs, fmtDuration, STATUS } from "./util.js";
import { isEnded } from "./runstate.js";

const NICE_STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];

// stageOrder: configured stage names (pending stages show as empty rows), then any others as they appear.
export function renderTimeline(box, run, stageOrder, now = Date.now()) {
  const t0 = firstTime(run);
  if (!Number.isFinite(t0)) {
    box.replaceChildren(el("p", { class: "muted" }, "Nothing has happened yet."));
    return;
  }
  const runEnd = run.ended_at ? parseTs(run.ended_at) : now;
  const t1 = Math.max(runEnd, t0 + 1000);
  const span = t1 - t0;
  const pos = (t) => ((Math.min(Math.max(t, t0), t1) - t0) / span) * 100;

  const rows = [];
  // the run itself: the queued wait, then the run
  const started = parseTs(run.started_at);
  const runRow = row("run", "run", run.status, [
    Number.isFinite(started) ? seg(pos(parseTs(run.queued_at) || t0), pos(started), "queued", `queued ${fmtDuration(started - t0)}`, false) : null,
    Number.isFinite(started) ? seg(pos(started), pos(runEnd), run.status, fmtDuration(runEnd - started))
      : seg(pos(t0), pos(runEnd), "queued", `queued ${fmtDuration(runEnd - t0)}`),
  ], run.msg);
  rows.push(runRow);

  const names = [...stageOrder, ...run.stages.keys()];
  const seen = new Set();
  for (const name of names) {
    if (seen.has(name)) continue;
    seen.add(name);
    const stage = run.stages.get(name);
    if (!stage) { rows.push(row(name, "stage", isEnded(run) ? "notrun" : "pending", [], "")); continue; }
    const status = shown(stage.status, run);
    rows.push(row(name, "stage", status, [bar(stage, status, pos, runEnd)], stage.msg));
    for (const [iname, it] of stage.items) {
      const istatus = shown(it.status, run);
      rows.push(row(iname, "item", istatus, [bar(it, istatus, pos, runEnd)], it.msg));
    }
  }

  const axis = el("div", { class: "tl-axis" }, ...ticks(span).map((s) =>
    el("span", { class: "tl-tick", style: `left:${(s * 1000 / span) * 100}%` }, s === 0 ? "0" : fmtDuration(s * 1000))));
  box.replaceChildren(el("div", { class: "tl-head" }, el("span"), axis), ...rows);
}

function firstTime(run) {
  let t = parseTs(run.queued_at);
  if (!Number.isFinite(t)) t = parseTs(run.started_at);
  if (!Number.isFinite(t)) {
    for (const s of run.stages.values()) {
      const ts = parseTs(s.started_at);
      if (Number.isFinite(ts) && !(ts >= t)) t = ts;
    }
  }
  return t;
}

// A stage still "running" when its run has ended was interrupted (e.g. the runner was lost).
function shown(status, run) {
  if (!isEnded(run)) return status;
  return status === "running" ? "unfinished" : status === "pending" ? "notrun" : status;
}

function bar(x, status, pos, runEnd) {
  const start = parseTs(x.started_at);
  let end = parseTs(x.ended_at);
  if (!Number.isFinite(start)) {
    // skipped without a start: a marker at its end
    return Number.isFinite(end) ? seg(pos(end), pos(end), status, STATUS[status]?.label || status) : null;
  }
  if (!Number.isFinite(end)) end = runEnd; // running: grows to now
  return seg(pos(start), pos(end), status, fmtDuration(end - start));
}

function seg(left, right, status, label, showLabel = true) {
  const width = Math.max(right - left, 0);
  // the timeline is redrawn often; a negative delay keeps the running stripes' motion continuous
  const phase = status === "running" ? `;animation-delay:-${(Date.now() % 1000) / 1000}s` : "";
  return el("div", {
    class: `tl-bar st-${status}`,
    style: `left:${left}%;width:max(${width}%, 3px)${phase}`,
    title: label,
  }, showLabel ? el("span", { class: "tl-bar-label" }, label) : null);
}

function row(name, kind, status, bars, msg) {
  const s = STATUS[status] || { icon: "?", label: status };
  return el("div", { class: `tl-row tl-${kind}`, dataset: { name, kind, status } },
    el("div", { class: "tl-name", title: msg ? `${name}: ${s.label} — ${msg}` : `${name}: ${s.label}` },
      el("span", { class: `tl-icon st-${status}`, "aria-hidden": "true" }, s.icon),
      el("span", { class: "tl-text" }, name), el("span", { class: "tl-status" }, s.label)),
    el("div", { class: "tl-track" }, ...bars.filter(Boolean)));
}

function ticks(spanMs) {
  const spanS = spanMs / 1000;
  const step = NICE_STEPS_S.find((s) => spanS / s <= 6) || 86400 * Math.ceil(spanS / 86400 / 6);
  const out = [];
  for (let s = 0; s <= spanS; s += step) out.push(s);
  return out;
}
