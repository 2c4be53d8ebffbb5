// The history view (#/history/<pipeline>?since=7d): from GET /api/history, the duration of each recent
// run as a bar (its stages stacked, each bar a link to its run), the success rate and percentiles with
// their trend, the stages, the slowest and the failing items, and skipped slots.

import { api } from "./api.js";
import { store } from "./store.js";
import { el, badge, fmtDuration } from "./util.js";

const SVG = "http://www.w3.org/2000/svg";
const WINDOWS = ["1h", "24h", "7d", "30d", "90d"];
const STAGE_COLOURS = 6; // .hs-0 .. .hs-5 in style.css

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const secs = (v) => (v === null || v === undefined ? "–" : fmtDuration(v * 1000));
const rate = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`);
const pct = (v) => (v === null || v === undefined ? "" : ` (${v > 0 ? "+" : ""}${v.toFixed(1)}%)`);
const pts = (v) => (v === null || v === undefined ? "" : ` (${v > 0 ? "+" : ""}${(v * 100).toFixed(1)} pts)`);

// Stacked bars: one per run, oldest left; a failed or cancelled run gets a mark under its bar.
export function durationChart(runs, stageNames) {
  const width = 720, height = 180, pad = 28, markH = 6;
  const chart = svg("svg", { class: "hist-chart", viewBox: `0 0 ${width} ${height + markH + 4}`, role: "img",
    "aria-label": `duration of the last ${runs.length} runs, stages stacked` });
  const top = Math.max(0.001, ...runs.map((r) => Math.max(r.duration_s || 0,
    Object.values(r.stages).reduce((a, b) => a + (b || 0), 0))));
  const slot = (width - pad) / Math.max(runs.length, 1);
  const bw = Math.max(1, slot * 0.8);
  chart.append(svg("text", { x: 0, y: 10, class: "hist-axis" }, secs(top)), svg("text", { x: 0, y: height, class: "hist-axis" }, "0"));
  runs.forEach((run, i) => {
    const x = pad + i * slot;
    const link = svg("a", { href: `#/runs/${encodeURIComponent(run.run_id)}`, class: "hist-run", "data-run": run.run_id });
    link.append(svg("title", {}, `${run.run_id}: ${run.status}, ${secs(run.duration_s)}\n` +
      stageNames.filter((s) => run.stages[s] != null).map((s) => `${s} ${secs(run.stages[s])}`).join("\n")));
    let y = height;
    stageNames.forEach((name, si) => {
      const d = run.stages[name];
      if (!d) return;
      const h = (d / top) * (height - 14);
      y -= h;
      link.append(svg("rect", { x, y, width: bw, height: Math.max(h, 0.5), class: `hs-${si % STAGE_COLOURS}` }));
    });
    if (run.status !== "success") link.append(svg("rect", { x, y: height + 3, width: bw, height: markH, class: `hist-mark st-${run.status}` }));
    chart.append(link);
  });
  return chart;
}

function itemsTable(rows) {
  return el("table", { class: "runs hist-items" },
    el("thead", null, el("tr", null, ...["stage", "item", "runs", "failures", "success", "p50", "p95", "max", "last failure"]
      .map((h, i) => el("th", { class: i >= 2 && i <= 7 ? "num" : null }, h)))),
    el("tbody", null, ...rows.map((i) => el("tr", null, el("td", null, i.stage), el("td", null, i.item),
      el("td", { class: "num" }, i.runs), el("td", { class: "num" }, i.failures), el("td", { class: "num" }, rate(i.success_rate)),
      el("td", { class: "num" }, secs(i.duration_s.p50)), el("td", { class: "num" }, secs(i.duration_s.p95)),
      el("td", { class: "num" }, secs(i.duration_s.max)), el("td", { class: "muted small" }, i.last_failure || "")))));
}

function render(body, report) {
  const s = report.summary;
  const stageNames = report.stages.map((st) => st.stage);
  const legend = el("div", { class: "hist-legend small" },
    ...stageNames.map((n, i) => el("span", null, el("span", { class: `hist-swatch hs-${i % STAGE_COLOURS}` }), n)));
  const parts = [
    el("section", { class: "card" }, el("h2", null, `Last ${report.since}`),
      el("p", { class: "hist-summary", id: "hist-summary" },
        `${s.runs} runs: ${s.success} success, ${s.failure} failure, ${s.cancelled} cancelled · success rate `,
        el("strong", null, rate(s.success_rate)), pts(s.change.success_rate),
        ` · p50 ${secs(s.duration_s.p50)}${pct(s.change.p50_pct)} · p95 ${secs(s.duration_s.p95)}${pct(s.change.p95_pct)}`,
        ` · max ${secs(s.duration_s.max)} · previous ${report.since}: ${s.previous.runs} runs`)),
  ];
  if (report.recent_runs.length) {
    parts.push(el("section", { class: "card" }, el("h2", null, `Duration per run (last ${report.recent_runs.length})`),
      durationChart(report.recent_runs, stageNames), legend));
  }
  if (report.stages.length) {
    parts.push(el("section", { class: "card" }, el("h2", null, "Stages"),
      el("table", { class: "runs" }, el("thead", null, el("tr", null,
        ...["stage", "runs", "success", "failure", "skipped", "rate", "p50", "p95", "max", "p50 trend"].map((h, i) => el("th", { class: i ? "num" : null }, h)))),
      el("tbody", null, ...report.stages.map((st) => el("tr", null, el("td", null, st.stage),
        ...[st.runs, st.success, st.failure, st.skipped, rate(st.success_rate), secs(st.duration_s.p50), secs(st.duration_s.p95),
          secs(st.duration_s.max), pct(st.change.p50_pct)].map((v) => el("td", { class: "num" }, v))))))));
  }
  if (report.failing_items.length) parts.push(el("section", { class: "card" }, el("h2", null, "Failing items"), itemsTable(report.failing_items)));
  if (report.slowest_items.length) parts.push(el("section", { class: "card" }, el("h2", null, "Slowest items (p95)"), itemsTable(report.slowest_items)));
  const slots = report.skipped_slots;
  if (slots.count) {
    parts.push(el("section", { class: "card" }, el("h2", null, `Skipped slots: ${slots.count}`),
      el("p", null, slots.by_reason.map((r) => `${r.reason} ${r.count}`).join(" · ")),
      el("ul", { class: "small" }, ...slots.recent.slice(-10).reverse().map((r) => el("li", null, badge("skipped"), " ",
        el("a", { href: `#/runs/${encodeURIComponent(r.run_id)}` }, r.run_id), " ", el("span", { class: "muted" }, r.reason))))));
  }
  if (!s.runs && !slots.count) parts.push(el("p", { class: "empty" }, "No runs of this pipeline in the archive for this window."));
  body.replaceChildren(...parts);
}

export function mountHistory(root, pipeline, since) {
  since = WINDOWS.includes(since) ? since : "7d";
  const names = store.pipelines.map((p) => p.name);
  if (!pipeline && names.length) pipeline = names[0];
  const pipelineSel = el("select", { id: "hist-pipeline", "aria-label": "pipeline" },
    ...[...new Set([...names, pipeline].filter(Boolean))].map((n) => el("option", { value: n }, n)));
  const sinceSel = el("select", { id: "hist-since", "aria-label": "window" }, ...WINDOWS.map((w) => el("option", { value: w }, `last ${w}`)));
  pipelineSel.value = pipeline || "";
  sinceSel.value = since;
  const go = () => { location.hash = `#/history/${encodeURIComponent(pipelineSel.value)}?since=${sinceSel.value}`; };
  pipelineSel.addEventListener("change", go);
  sinceSel.addEventListener("change", go);
  const body = el("div", { class: "hist-body" }, el("p", { class: "muted" }, "Loading…"));
  root.replaceChildren(el("div", { class: "history" },
    el("div", { class: "card-head" }, el("a", { href: "#/" }, "← runs"), el("h1", null, "History"), el("div", { class: "filters" }, pipelineSel, sinceSel)),
    body));
  let live = true;
  if (pipeline) {
    api(`/api/history?pipeline=${encodeURIComponent(pipeline)}&since=${since}`)
      .then((report) => { if (live) render(body, report); })
      .catch((e) => { if (live) body.replaceChildren(el("p", { class: "error" }, `Cannot load the history: ${e.message}`)); });
  } else {
    body.replaceChildren(el("p", { class: "empty" }, "No pipeline configured."));
  }
  return { unmount: () => { live = false; } };
}
