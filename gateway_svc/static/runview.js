// A run's page (#/runs/<id>): its header, the timeline of stages and items, the latest metrics per
// stage, and the event log. The log comes from /ws/events/<id>?after_seq=N, N being the last seq
// applied, so a reconnect resumes exactly where the page stopped; seq <= N is ignored, a gap reconnects.
// A hole in the journal itself (the gateway's journal_gap frame) is shown, as a banner and as a mark in
// the log where the events are missing, and the log goes on past it.

import { api, ApiError } from "./api.js";
import { Stream } from "./stream.js";
import { store } from "./store.js";
import { reportStream, dropStream } from "./conn.js";
import { runFromApi, isEnded } from "./runstate.js";
import { RunLog, KINDS, STAGE_EVENT_KINDS } from "./runlog.js";
import { everyWhileVisible } from "./visible.js";
import { renderTimeline } from "./timeline.js";
import { VirtualList } from "./loglist.js";
import { cancelButton } from "./home.js";
import { mountRerunPanel } from "./reruns.js";
import { mountRunAlerts } from "./runalerts.js";
import { el, setText, badge, parseTs, fmtTsWhen, fmtTsClock, tsTitle, fmtDuration, fmtValue, fmtCount, frameBatcher, debounce, gapRange, KIND_ICON } from "./util.js";

const ROW_HEIGHT = 24;

export function mountRun(root, runId) {
  // the model (runlog.js): this run's events in seq order, and what the page has done with each; held
  // by window.__runwire.runLogs while the page shows the run, and let go when it is left
  const model = new RunLog(runId);
  window.__runwire.runLogs.set(runId, model);
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
  stageSel.addEventListener("change", () => { model.setFilters({ stage: stageSel.value }); filtersChanged(); });
  textInput.addEventListener("input", debounce(() => { model.setFilters({ text: textInput.value.trim().toLowerCase() }); filtersChanged(); }, 120));

  function toggleKind(k) {
    model.toggleKind(k);
    chips[k].setAttribute("aria-pressed", String(model.filters.kinds.has(k)));
    filtersChanged();
  }

  function filtersChanged() {
    log.setCount(model.filtered.length);
    log.invalidate();
    redraw();
  }

  // The gateway's journal_gap frame (or a `gaps` entry): events N..M are not in the journal. Shown at
  // its place in the log (the model puts it there) and in the banner.
  function noteJournalGap(range, message, opts) {
    if (!model.noteJournalGap(range, message, opts)) return;
    showGaps(message);
  }

  function showGaps(message) {
    log.setCount(model.filtered.length);
    log.invalidate();
    lane.invalidate();
    gapBanner.replaceChildren(el("span", null, model.gapText(),
      "The events after the hole are shown as usual.", message ? el("span", { class: "muted" }, ` (${message})`) : null));
    gapBanner.hidden = false;
    redraw();
  }

  function onEvents(events) {
    const marks = model.marks;
    const { restart, newStages } = model.receive(events);
    for (const name of newStages) stageSel.append(el("option", { value: name }, name));
    if (model.marks !== marks) showGaps("still missing after reconnects");
    if (restart) stream.restart(restart);
    redraw();
  }

  // ---- rendering (batched: at most once per animation frame) ---------------------------------------
  let metricsKey = "";
  const redraw = frameBatcher(() => {
    const run = model.shownRun();
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
    const { total, passing } = model.counts();
    setText(logCount, passing === total ? `${fmtCount(total)} events` : `${fmtCount(passing)} of ${fmtCount(total)} events`);
    logCount.dataset.count = String(total);
    const zones = model.runZones(run);
    setText(logZone, zones.length ? `times in ${zones.join(" / ")}` : "");
    log.setCount(model.filtered.length);
    lane.setCount(model.milestones.length);
  });

  function renderFacts(run, now) {
    const start = parseTs(run.started_at), end = run.ended_at ? parseTs(run.ended_at) : now;
    const zones = model.runZones(run);
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
      stageSel.value = ""; textInput.value = "";
      model.clearFilters();
      for (const k of KINDS) chips[k].setAttribute("aria-pressed", "true");
      filtersChanged();
      pos = model.filtered.findIndex((i) => model.events[i].seq === seq);
    }
    log.scrollToIndex(pos);
  });

  // ---- the stream ---------------------------------------------------------------------------------
  const stream = new Stream({
    name: "run",
    path: () => `/ws/events/${encodeURIComponent(runId)}?after_seq=${model.lastSeq}`,
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
  const stopTicker = everyWhileVisible(() => { if (!isEnded(model.run)) redraw(); }, 1000);
  redraw();

  return {
    unmount() {
      reruns.unmount();
      stream.stop();
      stopTicker();
      dropStream("run");
      // the page is gone: so is its model (a long run's events would otherwise stay in memory)
      if (window.__runwire.runLogs.get(runId) === model) window.__runwire.runLogs.delete(runId);
      model.release();
    },
  };
}
