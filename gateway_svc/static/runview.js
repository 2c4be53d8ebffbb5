// A run's page (#/runs/<id>): its header, the timeline of stages and items, the latest metrics per
// stage, and the event log. The log comes from /ws/events/<id>?after_seq=N, N being the last seq
// applied, so a reconnect resumes exactly where the page stopped; seq <= N is ignored, a gap reconnects.
// A hole in the journal itself (the gateway's journal_gap frame) is shown, as a banner and as a mark in
// the log where the events are missing, and the log goes on past it.

import { api, ApiError } from "./api.js";
import { Stream } from "./stream.js";
import { store } from "./store.js";
import { reportStream, dropStream } from "./conn.js";
import { newRun, applyEvent, runFromApi, isEnded } from "./runstate.js";
import { renderTimeline } from "./timeline.js";
import { VirtualList } from "./loglist.js";
import { cancelButton } from "./home.js";
import { mountRerunPanel } from "./reruns.js";
import { mountRunAlerts } from "./runalerts.js";
import { el, setText, badge, parseTs, fmtTsWhen, fmtTsClock, tsTitle, zoneLabel, fmtDuration, fmtValue, fmtCount, frameBatcher, debounce, holeCovered, gapRange, KIND_ICON } from "./util.js";

const ROW_HEIGHT = 24;
const KINDS = ["queued", "start", "success", "failure", "skipped", "cancelled", "metric", "log"];
const STAGE_EVENT_KINDS = new Set(["queued", "start", "success", "failure", "skipped", "cancelled"]);

export function mountRun(root, runId) {
  // ---- the model: this run's events in seq order, and what the page has done with each ----------
  const model = {
    run: newRun(runId),
    fetched: null, // GET /api/runs/<id>, shown until the first events arrive
    events: [],
    appliedSeqs: [], // the seq of every event applied, in order (tests compare it with the journal)
    receivedSeqs: [], // every seq received over the wire, duplicates included
    duplicates: 0,
    gaps: [], // seq gaps seen on the wire (each answered by a reconnect from the last applied seq)
    journalGaps: [], // [[N, M], ...]: events missing from the journal itself, as the gateway reported them
    marks: 0, // journal-gap marks among `events` (rows that are not events)
    kindCounts: Object.fromEntries(KINDS.map((k) => [k, 0])),
    stageNames: new Set(),
    filtered: [], // indices into events that pass the filters
    milestones: [], // indices of stage events (never drowned by log lines)
    error: null,
    zones: new Set(), // the zones ("UTC-06:00") the events' timestamps are written in
  };
  window.__runwire.runLogs.set(runId, model);

  const filters = { stage: "", kinds: new Set(KINDS), text: "" };
  let selectedSeq = null;

  // ---- layout ----------------------------------------------------------------------------------------
  const title = el("h1", { class: "mono run-id" }, runId);
  const statusBox = el("span", { class: "run-status" });
  const actions = el("span", { class: "actions" });
  const facts = el("dl", { class: "facts" });
  const runMsg = el("p", { class: "run-msg" });
  const gapBanner = el("div", { class: "run-banner", id: "journal-gap", role: "alert", hidden: true });
  const alertsBox = el("ul", { id: "run-alerts" }); mountRunAlerts(alertsBox, runId); // its own module and element
  const header = el("section", { class: "card run-head" },
    el("div", { class: "run-title" }, el("a", { href: "#/", class: "back" }, "← runs"), title, statusBox, actions),
    facts, runMsg, gapBanner, alertsBox);

  const timelineBox = el("div", { class: "timeline", id: "timeline" });
  const metricsBox = el("div", { class: "metrics", id: "metrics" });

  const stageSel = el("select", { id: "log-stage", "aria-label": "filter by stage" }, el("option", { value: "" }, "all stages"));
  const textInput = el("input", { id: "log-text", type: "search", placeholder: "filter text…", "aria-label": "filter by text" });
  const chips = Object.fromEntries(KINDS.map((k) => [k, el("button", {
    class: `chip kind-${k}`, "aria-pressed": "true", dataset: { kind: k }, title: `show/hide ${k} events`,
    onclick: () => toggleKind(k),
  })]));
  const followBox = el("input", { type: "checkbox", id: "log-follow", checked: true });
  const logCount = el("span", { class: "muted small", id: "log-count" });
  // times are shown as the events write them (the config's zone, as the CLI shows them), not the browser's
  const logZone = el("span", { class: "muted small", id: "log-zone", title: "event times as written in the journal, in the run's configured zone" });
  const detail = el("pre", { class: "event-detail", id: "event-detail", hidden: true });

  const log = new VirtualList({ rowHeight: ROW_HEIGHT, renderRow: renderLogRow, onFollowChange: (on) => { followBox.checked = on; } });
  log.viewport.classList.add("log-view");
  log.viewport.id = "log";
  const lane = new VirtualList({ rowHeight: ROW_HEIGHT, renderRow: renderLaneRow, onFollowChange: () => {} });
  lane.viewport.classList.add("lane-view");
  lane.viewport.id = "stage-events";

  const logCard = el("section", { class: "card log-card" },
    el("div", { class: "card-head" }, el("h2", null, "Events"), logCount, logZone,
      el("label", { class: "small follow" }, followBox, " follow")),
    el("div", { class: "log-filters" }, stageSel, el("div", { class: "chips", role: "group", "aria-label": "event kinds" }, ...Object.values(chips)), textInput),
    el("div", { class: "log-lanes" },
      el("div", { class: "lane" }, el("h3", null, "Stage events"), lane.viewport),
      el("div", { class: "lane lane-log" }, el("h3", null, "All events"), log.viewport)),
    detail);

  root.replaceChildren(el("div", { class: "run-page", dataset: { runId } },
    header,
    el("div", { class: "run-grid" },
      el("section", { class: "card" }, el("h2", null, "Timeline"), timelineBox),
      el("section", { class: "card" }, el("h2", null, "Latest metrics"), metricsBox)),
    logCard));
  const reruns = mountRerunPanel(header, runId);

  followBox.addEventListener("change", () => log.setFollow(followBox.checked));
  stageSel.addEventListener("change", () => { filters.stage = stageSel.value; refilter(); });
  textInput.addEventListener("input", debounce(() => { filters.text = textInput.value.trim().toLowerCase(); refilter(); }, 120));

  function toggleKind(k) {
    if (filters.kinds.has(k)) filters.kinds.delete(k);
    else filters.kinds.add(k);
    chips[k].setAttribute("aria-pressed", String(filters.kinds.has(k)));
    refilter();
  }

  // ---- applying events ---------------------------------------------------------------------------
  function matches(ev) {
    if (ev.gap) return true; // a hole in the journal stays in view whatever the filters
    if (filters.stage && ev.stage !== filters.stage) return false;
    if (!filters.kinds.has(ev.event)) return false;
    if (filters.text) {
      ev._hay ??= `${ev.stage} ${ev.event} ${ev.msg || ""} ${ev.data ? JSON.stringify(ev.data) : ""}`.toLowerCase();
      if (!ev._hay.includes(filters.text)) return false;
    }
    return true;
  }

  function refilter() {
    model.filtered = [];
    for (let i = 0; i < model.events.length; i++) if (matches(model.events[i])) model.filtered.push(i);
    log.setCount(model.filtered.length);
    log.invalidate();
    redraw();
  }

  // A run's events are indexed by position in `events`; after a mark is inserted mid-log they are rebuilt.
  function reindex() {
    model.milestones = [];
    model.events.forEach((ev, i) => { if (ev.gap || STAGE_EVENT_KINDS.has(ev.event)) model.milestones.push(i); });
    refilter();
    lane.invalidate();
  }

  // The gateway's journal_gap frame (or a `gaps` entry): events N..M are not in the journal. Shown once
  // (a reconnect replays the frame), at its place in the log, and in the banner.
  // `reported: false`: a seq gap that reconnects did not fill (a gateway without journal_gap frames).
  function noteJournalGap(range, message, { reported = true } = {}) {
    if (!range || model.journalGaps.some(([n, m]) => n === range[0] && m === range[1])) return;
    model.journalGaps.push(range);
    const [n, m] = range;
    const mark = { gap: range, seq: null, stage: "", event: "gap", timestamp: null,
      msg: reported ? `⚠ events ${n}–${m} missing from the journal` : `⚠ events ${n}–${m} not delivered by the gateway`,
      detail: message || "" };
    let at = model.events.findIndex((e) => !e.gap && e.seq > m);
    if (at < 0) at = model.events.length;
    model.events.splice(at, 0, mark);
    model.marks++;
    if (at === model.events.length - 1) {
      model.milestones.push(at);
      model.filtered.push(at);
    } else {
      reindex();
    }
    const list = model.journalGaps.map(([a, b]) => (a === b ? `event ${a}` : `events ${a}–${b}`)).join(", ");
    gapBanner.replaceChildren(el("span", null,
      `⚠ This run's log is missing ${list} (the gateway ${reported ? "reports a hole in the journal" : "did not deliver them"}): ` +
      `${model.journalGaps.length > 1 ? "they are" : "it is"} marked in the log below. `,
      "The events after the hole are shown as usual.", message ? el("span", { class: "muted" }, ` (${message})`) : null));
    gapBanner.hidden = false;
    redraw();
  }

  function onEvents(events) {
    for (const ev of events) {
      model.receivedSeqs.push(ev.seq);
      if (ev.run_id !== runId) continue;
      const last = model.run.last_seq;
      if (ev.seq <= last) { model.duplicates++; continue; } // the server promises exactly-once; be sure
      if (ev.seq !== last + 1 && !holeCovered(model.journalGaps, last + 1, ev.seq - 1)) {
        // a gap: never show a log with a hole; reconnect from the last applied seq to refill it. If the
        // same hole comes back after reconnects, the gateway cannot fill it: show it rather than loop.
        model.gaps.push([last + 1, ev.seq - 1]);
        const again = model.gaps.filter(([n]) => n === last + 1).length;
        if (again > 3) {
          noteJournalGap([last + 1, ev.seq - 1], "still missing after 3 reconnects", { reported: false });
        } else {
          stream.restart(`gap: seq ${last + 1}..${ev.seq - 1} missing`);
          break;
        }
      }
      applyEvent(model.run, ev);
      const index = model.events.push(ev) - 1;
      model.appliedSeqs.push(ev.seq);
      const zone = zoneLabel(ev.timestamp);
      if (zone) model.zones.add(zone);
      model.kindCounts[ev.event] = (model.kindCounts[ev.event] || 0) + 1;
      if (ev.stage !== "pipeline" && !model.stageNames.has(ev.stage)) {
        model.stageNames.add(ev.stage);
        stageSel.append(el("option", { value: ev.stage }, ev.stage));
      }
      if (STAGE_EVENT_KINDS.has(ev.event)) model.milestones.push(index);
      if (matches(ev)) model.filtered.push(index);
    }
    redraw();
  }

  // ---- rendering (batched: at most once per animation frame) ---------------------------------------
  let metricsKey = "";
  const redraw = frameBatcher(() => {
    const run = model.run.last_seq > 0 || !model.fetched ? model.run : model.fetched;
    const now = Date.now();
    statusBox.replaceChildren(badge(run.status));
    if (actions.dataset.ended !== String(isEnded(run))) {
      actions.dataset.ended = String(isEnded(run));
      actions.replaceChildren(isEnded(run) ? "" : cancelButton(runId));
    }
    renderFacts(run, now);
    const waiting = run.status === "queued" && model.fetched && model.fetched.waiting ? `queued: ${model.fetched.waiting}` : "";
    setText(runMsg, model.error || run.msg || waiting);
    runMsg.className = `run-msg${model.error || run.status === "failure" ? " error" : ""}`;
    const pipeline = store.pipelines.find((p) => p.name === run.pipeline);
    renderTimeline(timelineBox, run, pipeline ? pipeline.stages : [], now);
    const key = JSON.stringify([...run.stages.values()].map((s) => [s.name, s.status, s.metrics, [...s.items].map(([n, i]) => [n, i.metrics])]));
    if (key !== metricsKey) { metricsKey = key; renderMetrics(run); }
    for (const k of KINDS) setText(chips[k], `${KIND_ICON[k]} ${k} ${fmtCount(model.kindCounts[k])}`);
    // marks always pass the filters: counted out of both
    const total = model.events.length - model.marks, passing = model.filtered.length - model.marks;
    setText(logCount, passing === total ? `${fmtCount(total)} events` : `${fmtCount(passing)} of ${fmtCount(total)} events`);
    logCount.dataset.count = String(total);
    const zones = runZones(run);
    setText(logZone, zones.length ? `times in ${zones.join(" / ")}` : "");
    log.setCount(model.filtered.length);
    lane.setCount(model.milestones.length);
  });

  // the zones of this run's times: its events' (as received), or the fetched run's before any arrive
  function runZones(run) {
    if (model.zones.size) return [...model.zones];
    return [...new Set([run.queued_at, run.started_at, run.ended_at].map(zoneLabel).filter(Boolean))];
  }

  function renderFacts(run, now) {
    const start = parseTs(run.started_at), end = run.ended_at ? parseTs(run.ended_at) : now;
    const zones = runZones(run);
    const rows = [
      ["pipeline", run.pipeline || "—"],
      ["trigger", run.trigger === "schedule" ? `schedule ${run.schedule || ""}${run.slot ? ` (slot ${run.slot})` : ""}` : run.trigger],
      ["queued", run.queued_at ? fmtTsWhen(run.queued_at, now) : "—", tsTitle(run.queued_at)],
      ["started", run.started_at ? fmtTsWhen(run.started_at, now) : "—", tsTitle(run.started_at)],
      ["ended", run.ended_at ? fmtTsWhen(run.ended_at, now) : "—", tsTitle(run.ended_at)],
      ["times in", zones.length ? zones.join(" / ") : "—", "the zone the run's events are written in (the config's timezone), as the CLI shows them"],
      ["duration", Number.isFinite(start) ? fmtDuration(end - start) : "—"],
      ["params", Object.keys(run.params || {}).length ? Object.entries(run.params).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") : v}`).join("  ") : "—"],
    ];
    if (facts.children.length !== rows.length * 2) {
      facts.replaceChildren(...rows.flatMap(([k]) => [el("dt", null, k), el("dd", { dataset: { fact: k } })]));
    }
    rows.forEach(([, v, title], i) => {
      const dd = facts.children[i * 2 + 1];
      setText(dd, v);
      if (title !== undefined && dd.title !== title) dd.title = title;
    });
  }

  function renderMetrics(run) {
    const cards = [];
    for (const stage of run.stages.values()) {
      const entries = Object.entries(stage.metrics).filter(([k]) => k !== "item");
      const items = [...stage.items].filter(([, it]) => Object.keys(it.metrics || {}).length);
      if (!entries.length && !items.length) continue;
      cards.push(el("div", { class: "metric-stage", dataset: { stage: stage.name } },
        el("h3", null, stage.name),
        items.length ? null : metricTable(entries),
        items.length ? el("table", { class: "metric-items" },
          el("thead", null, el("tr", null, el("th", null, "item"), ...itemKeys(items).map((k) => el("th", { class: "num" }, k)))),
          el("tbody", null, items.map(([name, it]) => el("tr", null, el("td", null, name),
            ...itemKeys(items).map((k) => el("td", { class: "num" }, k in it.metrics ? fmtValue(k, it.metrics[k]) : "")))))) : null));
    }
    metricsBox.replaceChildren(...(cards.length ? cards : [el("p", { class: "muted" }, "No metrics yet.")]));
  }

  function metricTable(entries) {
    return el("dl", { class: "metric-list" }, entries.flatMap(([k, v]) => [el("dt", null, k), el("dd", { class: "num" }, fmtValue(k, v))]));
  }

  function itemKeys(items) {
    const keys = new Set();
    for (const [, it] of items) for (const k of Object.keys(it.metrics)) keys.add(k);
    return [...keys];
  }

  function renderLogRow(node, index) {
    const ev = model.events[model.filtered[index]];
    if (!ev) { node.replaceChildren(); return; }
    fillRow(node, ev, true);
  }

  function renderLaneRow(node, index) {
    const ev = model.events[model.milestones[index]];
    if (!ev) { node.replaceChildren(); return; }
    fillRow(node, ev, false);
  }

  function fillRow(node, ev, full) {
    if (ev.gap) {
      node.className = "vl-row ev gap-mark";
      delete node.dataset.seq;
      node.dataset.gap = ev.gap.join("-");
      node.title = ev.detail ? `${ev.msg}: ${ev.detail}` : ev.msg;
      node.replaceChildren(...[full ? el("span", { class: "ev-seq" }, ev.gap[0]) : null,
        el("span", { class: "ev-msg" }, ev.msg)].filter(Boolean));
      return;
    }
    delete node.dataset.gap;
    const milestone = STAGE_EVENT_KINDS.has(ev.event);
    const status = ev.event === "start" ? "running" : ev.event;
    node.className = `vl-row ev kind-${ev.event}${milestone ? ` milestone st-${status}` : ""}${ev.seq === selectedSeq ? " selected" : ""}`;
    node.dataset.seq = String(ev.seq);
    const item = ev.data && ev.data.item !== undefined ? String(ev.data.item) : "";
    let text = ev.msg || "";
    if (ev.event === "metric") {
      const pairs = Object.entries(ev.data || {}).filter(([k]) => k !== "item").map(([k, v]) => `${k}=${fmtValue(k, v)}`).join(" ");
      text = text ? `${text} · ${pairs}` : pairs;
    }
    node.title = text;
    node.replaceChildren(...[
      full ? el("span", { class: "ev-seq" }, ev.seq) : null,
      el("span", { class: "ev-time", title: tsTitle(ev.timestamp) }, fmtTsClock(ev.timestamp, full)),
      el("span", { class: "ev-stage" }, item ? `${ev.stage}/${item}` : ev.stage),
      el("span", { class: "ev-kind" }, `${KIND_ICON[ev.event] || ""} ${ev.event}`),
      el("span", { class: "ev-msg" }, text)].filter(Boolean));
  }

  function select(seq) {
    selectedSeq = seq;
    const ev = model.events.find((e) => e.seq === seq);
    if (!ev) return;
    const { _hay, ...shown } = ev;
    detail.textContent = JSON.stringify(shown, null, 2);
    detail.hidden = false;
    log.invalidate();
    lane.invalidate();
  }

  log.viewport.addEventListener("click", (e) => {
    const row = e.target.closest(".vl-row");
    if (row && row.dataset.seq) select(Number(row.dataset.seq));
  });
  lane.viewport.addEventListener("click", (e) => {
    const row = e.target.closest(".vl-row");
    if (!row || !row.dataset.seq) return;
    const seq = Number(row.dataset.seq);
    select(seq);
    let pos = model.filtered.findIndex((i) => model.events[i].seq === seq);
    if (pos < 0) { // hidden by the filters: clear them so the event can be shown in context
      filters.stage = ""; stageSel.value = ""; filters.text = ""; textInput.value = "";
      for (const k of KINDS) { filters.kinds.add(k); chips[k].setAttribute("aria-pressed", "true"); }
      refilter();
      pos = model.filtered.findIndex((i) => model.events[i].seq === seq);
    }
    log.scrollToIndex(pos);
  });

  // ---- the stream ---------------------------------------------------------------------------------
  const stream = new Stream({
    name: "run",
    path: () => `/ws/events/${encodeURIComponent(runId)}?after_seq=${model.run.last_seq}`,
    onHello: () => {},
    onEvents,
    onJournalGap: (frame) => { if (!frame.run_id || frame.run_id === runId) noteJournalGap(gapRange(frame.missing), frame.message); },
    onState: (state, d) => {
      reportStream("run", state, d);
      if (state === "failed") { model.error = `Event stream stopped: ${d.reason}`; redraw(); }
    },
    isComplete: () => isEnded(model.run),
  });
  stream.start();

  api(`/api/runs/${encodeURIComponent(runId)}`).then((raw) => {
    model.fetched = runFromApi(raw);
    redraw();
  }, (e) => {
    // other failures (gateway restarting) show in the connection state; the stream brings the run
    if (e instanceof ApiError && e.status === 404) model.error = `No run ${runId}: ${e.message}`;
    redraw();
  });

  // bars of running stages grow with time, not only with events
  const ticker = setInterval(() => { if (!isEnded(model.run)) redraw(); }, 1000);
  redraw();

  return {
    unmount() {
      reruns.unmount();
      stream.stop();
      clearInterval(ticker);
      dropStream("run");
    },
  };
}
