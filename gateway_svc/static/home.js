// The home view: runs newest first (live, filterable by status and pipeline), the launch form and the
// schedules with pause/resume.

import { api } from "./api.js";
import { store, changed, loadSchedules } from "./store.js";
import { isEnded } from "./runstate.js";
import { mountBackfills } from "./reruns.js";
import { everyWhileVisible } from "./visible.js";
import { el, setText, badge, parseTs, fmtTsWhen, tsTitle, zoneLabel, fmtDuration, fmtRelative, toast, STATUS } from "./util.js";

const MAX_ROWS = 300;
const FILTER_KEY = "runwire.filters";

export function mountHome(root) {
  const filters = loadFilters();
  const statusSel = el("select", { id: "filter-status", "aria-label": "filter by status" },
    el("option", { value: "" }, "any status"),
    ...["queued", "running", "success", "failure", "cancelled"].map((s) => el("option", { value: s }, `${STATUS[s].icon} ${s}`)));
  const pipelineSel = el("select", { id: "filter-pipeline", "aria-label": "filter by pipeline" });
  statusSel.value = filters.status;
  const onFilter = () => {
    filters.status = statusSel.value;
    filters.pipeline = pipelineSel.value;
    saveFilters(filters);
    render();
  };
  statusSel.addEventListener("change", onFilter);
  pipelineSel.addEventListener("change", onFilter);

  const tbody = el("tbody");
  // run times are shown as the events write them (the config's zone, as the CLI shows them)
  const startedZone = el("span", { class: "zone muted", id: "runs-zone" });
  const emptyNote = el("p", { class: "empty" });
  const countNote = el("span", { class: "muted" });
  const runsCard = el("section", { class: "card runs-card" },
    el("div", { class: "card-head" },
      el("h2", null, "Runs"), countNote,
      el("div", { class: "filters" }, statusSel, pipelineSel)),
    el("div", { class: "table-wrap" },
      el("table", { class: "runs", id: "runs-table" },
        el("thead", null, el("tr", null,
          el("th", null, "status"), el("th", null, "run"), el("th", null, "pipeline"), el("th", null, "trigger"),
          el("th", { title: "times as written in the runs' events, in the configured zone (not this browser's)" }, "started ", startedZone),
          el("th", { class: "num" }, "duration"), el("th", null, ""))),
        tbody)),
    emptyNote);

  const launch = launchCard();
  const schedules = schedulesCard();
  const aside = el("aside", null, launch.node, schedules.node);
  root.replaceChildren(el("div", { class: "home" }, runsCard, aside));
  const backfills = mountBackfills(aside);

  const rows = new Map(); // run_id -> {tr, cells}

  function render() {
    // pipeline filter options: the configured pipelines plus any seen in runs
    const names = new Set(store.pipelines.map((p) => p.name));
    for (const r of store.runs.values()) if (r.pipeline && r.trigger !== "probe") names.add(r.pipeline);
    const want = ["", ...[...names].sort()];
    if (pipelineSel.options.length !== want.length || want.some((n, i) => pipelineSel.options[i].value !== n)) {
      pipelineSel.replaceChildren(...want.map((n) => el("option", { value: n }, n || "any pipeline")));
    }
    pipelineSel.value = names.has(filters.pipeline) ? filters.pipeline : "";

    const all = [...store.runs.values()].filter((r) => r.trigger !== "probe");
    const shown = all
      .filter((r) => (!filters.status || r.status === filters.status) && (!filters.pipeline || r.pipeline === filters.pipeline))
      .sort(newestFirst)
      .slice(0, MAX_ROWS);
    const now = Date.now();
    const zones = [...new Set(shown.map((r) => zoneLabel(r.started_at || r.queued_at)).filter(Boolean))];
    setText(startedZone, zones.length ? `(${zones.join(" / ")})` : "");
    const keep = new Set();
    shown.forEach((run, i) => {
      keep.add(run.run_id);
      let row = rows.get(run.run_id);
      if (!row) rows.set(run.run_id, (row = makeRow(run)));
      updateRow(row, run, now);
      if (tbody.children[i] !== row.tr) tbody.insertBefore(row.tr, tbody.children[i] || null);
    });
    for (const [id, row] of rows) if (!keep.has(id)) { row.tr.remove(); rows.delete(id); }
    setText(countNote, all.length ? `${shown.length} of ${all.length}` : "");
    setText(emptyNote, store.listError ? `Cannot load runs: ${store.listError}`
      : !store.listLoaded ? "Loading runs…"
      : shown.length ? "" : all.length ? "No run matches these filters." : "No runs yet. Launch one, or wait for a schedule.");
    emptyNote.hidden = !emptyNote.textContent;
    emptyNote.classList.toggle("error", Boolean(store.listError));
    launch.render();
    schedules.render();
  }

  store.listeners.add(render);
  render();
  // durations of running runs and "next fire in" tick without events
  const stopTicker = everyWhileVisible(render, 1000);
  return { unmount() { store.listeners.delete(render); stopTicker(); backfills.unmount(); } };
}

function newestFirst(a, b) {
  const ta = parseTs(a.queued_at || a.started_at), tb = parseTs(b.queued_at || b.started_at);
  if (Number.isFinite(ta) && Number.isFinite(tb) && ta !== tb) return tb - ta;
  return a.run_id < b.run_id ? 1 : a.run_id > b.run_id ? -1 : 0; // run ids sort by creation time
}

function makeRow(run) {
  const href = `#/runs/${encodeURIComponent(run.run_id)}`;
  const cells = {
    status: el("td"), id: el("td", { class: "mono" }, el("a", { href }, run.run_id)),
    pipeline: el("td"), trigger: el("td"), started: el("td"), duration: el("td", { class: "num" }), actions: el("td", { class: "actions" }),
  };
  const tr = el("tr", { dataset: { runId: run.run_id } }, ...Object.values(cells));
  return { tr, cells, status: null, ended: null };
}

function updateRow(row, run, now) {
  const { cells } = row;
  if (row.status !== run.status) {
    cells.status.replaceChildren(badge(run.status));
    row.tr.dataset.status = run.status;
    row.status = run.status;
  }
  setText(cells.pipeline, run.pipeline || "—");
  setText(cells.trigger, run.trigger === "schedule" ? `↻ ${run.schedule || "schedule"}` : run.trigger === "manual" ? "manual" : run.trigger);
  cells.trigger.title = run.slot ? `slot ${run.slot}` : "";
  const start = parseTs(run.started_at);
  setText(cells.started, run.started_at ? fmtTsWhen(run.started_at, now) : run.queued_at ? `queued ${fmtTsWhen(run.queued_at, now)}` : "—");
  // a queued run says why it waits (the gateway's `waiting`, as the scheduler put it); else the full time
  const title = run.status === "queued" && run.waiting ? run.waiting : tsTitle(run.started_at || run.queued_at);
  if (cells.started.title !== title) cells.started.title = title;
  const end = run.ended_at ? parseTs(run.ended_at) : now;
  setText(cells.duration, Number.isFinite(start) ? fmtDuration(end - start) : run.status === "queued" ? `(${fmtDuration(now - parseTs(run.queued_at))})` : "—");
  const ended = isEnded(run);
  if (row.ended !== ended) {
    row.ended = ended;
    cells.actions.replaceChildren(ended ? "" : cancelButton(run.run_id));
  }
}

export function cancelButton(runId) {
  return el("button", {
    class: "btn btn-small btn-danger", title: `cancel run ${runId}`,
    onclick: async (ev) => {
      const btn = ev.currentTarget;
      btn.disabled = true;
      try {
        await api(`/api/runs/${encodeURIComponent(runId)}/cancel`, { method: "POST" });
        toast(`Cancel requested for ${runId}.`);
      } catch (e) {
        toast(`Cancel failed: ${e.message}`, "error");
        btn.disabled = false;
      }
    },
  }, "cancel");
}

// ---- launch -----------------------------------------------------------------------------------------
function launchCard() {
  const pipelineSel = el("select", { id: "launch-pipeline", name: "pipeline" });
  const desc = el("p", { class: "muted small" });
  const fields = el("div", { class: "fields" });
  const error = el("div", { class: "form-error", role: "alert", hidden: true });
  const submit = el("button", { class: "btn btn-primary", type: "submit", id: "launch-submit" }, "▶ Launch");
  const form = el("form", { id: "launch-form", onsubmit: onSubmit }, el("label", null, "pipeline", pipelineSel), desc, fields, error, submit);
  const node = el("section", { class: "card" }, el("h2", null, "Launch a run"), form);
  let shownFor = null;
  pipelineSel.addEventListener("change", () => renderFields());

  function selected() { return store.pipelines.find((p) => p.name === pipelineSel.value); }

  function renderFields() {
    const p = selected();
    shownFor = p ? p.name : null;
    setText(desc, p ? p.description : "");
    fields.replaceChildren(...(p ? p.params.map(paramField) : []));
    error.hidden = true;
  }

  async function onSubmit(ev) {
    ev.preventDefault();
    const p = selected();
    if (!p) return;
    error.hidden = true;
    let params;
    try {
      params = readParams(p, fields);
    } catch (e) {
      showError(e.message);
      return;
    }
    submit.disabled = true;
    try {
      const res = await api("/api/runs", { method: "POST", body: { pipeline: p.name, params } });
      toast(`Run ${res.run_id} queued.`);
      location.hash = `#/runs/${encodeURIComponent(res.run_id)}`;
    } catch (e) {
      // 400 (bad params, unknown pipeline) and 503 (scheduler cannot take it): the server's words, plainly
      showError(e.status ? `${e.status}: ${e.message}` : e.message);
    } finally {
      submit.disabled = false;
    }
  }

  function showError(text) {
    error.textContent = text;
    error.hidden = false;
  }

  return {
    node,
    render() {
      const names = store.pipelines.map((p) => p.name);
      if (pipelineSel.options.length !== names.length || names.some((n, i) => pipelineSel.options[i].value !== n)) {
        const keep = pipelineSel.value;
        pipelineSel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
        if (names.includes(keep)) pipelineSel.value = keep;
      }
      if (pipelineSel.value !== shownFor) renderFields();
      submit.disabled = !names.length;
      if (store.pipelinesError && !names.length) showError(`Cannot load pipelines: ${store.pipelinesError}`);
    },
  };
}

function paramField(spec) {
  const id = `param-${spec.name}`;
  const help = spec.description ? el("span", { class: "muted small" }, spec.description) : null;
  const type = spec.type || "str";
  let input;
  if (type === "bool") {
    input = el("input", { type: "checkbox", id, name: spec.name, checked: Boolean(spec.default) });
    return el("div", { class: "field field-bool", dataset: { param: spec.name, type } }, el("label", null, input, ` ${spec.name}`), help);
  }
  if (type === "list" && Array.isArray(spec.choices)) {
    const chosen = new Set(Array.isArray(spec.default) ? spec.default.map(String) : []);
    const boxes = spec.choices.map((c) => el("label", { class: "choice" },
      el("input", { type: "checkbox", name: spec.name, value: String(c), checked: chosen.has(String(c)) }), ` ${c}`));
    return el("fieldset", { class: "field", dataset: { param: spec.name, type } }, el("legend", null, spec.name), el("div", { class: "choices" }, boxes), help);
  }
  if (Array.isArray(spec.choices)) {
    input = el("select", { id, name: spec.name }, ...spec.choices.map((c) => el("option", { value: String(c) }, String(c))));
    if (spec.default !== undefined && spec.default !== null) input.value = String(spec.default);
  } else {
    const value = spec.default === undefined || spec.default === null ? "" : Array.isArray(spec.default) ? spec.default.join(", ") : String(spec.default);
    input = el("input", {
      id, name: spec.name, value,
      type: type === "int" || type === "float" ? "number" : "text",
      step: type === "float" ? "any" : type === "int" ? "1" : undefined,
      placeholder: type === "list" ? "comma, separated" : spec.pattern ? spec.pattern : undefined,
    });
  }
  return el("div", { class: "field", dataset: { param: spec.name, type } }, el("label", { for: id }, spec.name), input, help);
}

function readParams(pipeline, fields) {
  const params = {};
  for (const spec of pipeline.params) {
    const box = fields.querySelector(`[data-param="${CSS.escape(spec.name)}"]`);
    const type = spec.type || "str";
    if (type === "bool") params[spec.name] = box.querySelector("input").checked;
    else if (type === "list" && Array.isArray(spec.choices)) {
      params[spec.name] = [...box.querySelectorAll("input:checked")].map((i) => {
        const orig = spec.choices.find((c) => String(c) === i.value);
        return orig === undefined ? i.value : orig;
      });
    } else {
      const raw = box.querySelector("input, select").value.trim();
      if (raw === "") continue; // the server applies the default
      if (type === "int" || type === "float") {
        const n = Number(raw);
        if (!Number.isFinite(n) || (type === "int" && !Number.isInteger(n))) throw new Error(`${spec.name}: expected ${type === "int" ? "an integer" : "a number"}, got ${raw}`);
        params[spec.name] = n;
      } else if (type === "list") params[spec.name] = raw.split(",").map((s) => s.trim()).filter(Boolean);
      else params[spec.name] = raw;
    }
  }
  return params;
}

// ---- schedules -------------------------------------------------------------------------------------
function schedulesCard() {
  const list = el("ul", { class: "schedules", id: "schedules" });
  const note = el("p", { class: "muted small" });
  const node = el("section", { class: "card" }, el("h2", null, "Schedules"), list, note);
  const items = new Map();

  return {
    node,
    render() {
      const now = Date.now();
      const keep = new Set();
      store.schedules.forEach((s, i) => {
        keep.add(s.name);
        let it = items.get(s.name);
        if (!it) items.set(s.name, (it = scheduleItem(s.name)));
        it.update(s, now);
        if (list.children[i] !== it.li) list.insertBefore(it.li, list.children[i] || null);
      });
      for (const [name, it] of items) if (!keep.has(name)) { it.li.remove(); items.delete(name); }
      setText(note, store.schedulesError ? `Cannot load schedules: ${store.schedulesError}` : store.schedules.length ? "" : "No schedules configured.");
      note.classList.toggle("error", Boolean(store.schedulesError));
    },
  };
}

function scheduleItem(name) {
  const state = el("span");
  const title = el("strong", null, name);
  const meta = el("div", { class: "muted small" });
  const next = el("div", { class: "small" });
  const btn = el("button", { class: "btn btn-small" });
  const li = el("li", { dataset: { schedule: name } }, el("div", { class: "sched-head" }, title, state, btn), meta, next);
  let enabled = null;
  btn.addEventListener("click", async () => {
    const action = enabled ? "pause" : "resume";
    btn.disabled = true;
    try {
      await api(`/api/schedules/${encodeURIComponent(name)}/${action}`, { method: "POST" });
      toast(`Schedule ${name} ${action === "pause" ? "paused" : "resumed"}.`);
      await loadSchedules();
    } catch (e) {
      toast(`Could not ${action} ${name}: ${e.message}`, "error");
    } finally {
      btn.disabled = false;
      changed();
    }
  });
  return {
    li,
    update(s, now) {
      enabled = s.enabled;
      li.dataset.enabled = String(enabled);
      if (state.dataset.enabled !== String(enabled)) {
        // the pause icon is drawn in CSS: U+23F8 is in no font a stock Debian Chromium has (a box)
        state.dataset.enabled = String(enabled);
        state.className = `badge ${enabled ? "st-running" : "st-cancelled"}`;
        state.replaceChildren(el("span", { class: `icon${enabled ? "" : " icon-pause"}`, "aria-hidden": "true" }, enabled ? "●" : ""),
          enabled ? "active" : "paused");
      }
      setText(btn, enabled ? "pause" : "resume");
      setText(meta, [s.pipeline, s.spec, s.timezone].filter(Boolean).join(" · "));
      const nextRaw = s.next_fire;
      const nextTs = parseTs(nextRaw);
      // as the scheduler writes it: the schedule's own zone
      setText(next, !enabled ? "paused: no runs until resumed"
        : Number.isFinite(nextTs) ? `next ${fmtTsWhen(nextRaw, now)} ${zoneLabel(nextRaw)} (${fmtRelative(nextTs, now)})` : "next: —");
      next.title = enabled && nextRaw ? tsTitle(nextRaw) : "";
    },
  };
}

function loadFilters() {
  try {
    const f = JSON.parse(sessionStorage.getItem(FILTER_KEY) || "{}");
    return { status: f.status || "", pipeline: f.pipeline || "" };
  } catch {
    return { status: "", pipeline: "" };
  }
}

function saveFilters(f) {
  try { sessionStorage.setItem(FILTER_KEY, JSON.stringify(f)); } catch { /* storage disabled */ }
}
