// Re-runs and backfills on the dashboard, mounted by one line each: on a run's page, the links between
// the run and its re-runs and the re-run buttons (mountRerunPanel); on the home page, the backfills and
// their progress (mountBackfills). Both read the gateway's JSON by the field lists of shapes.js.

import { api } from "./api.js";
import { BACKFILL_FIELDS, BACKFILL_LIST_FIELDS, RERUN_LINK_FIELDS, RERUN_RESULT_FIELDS } from "./shapes.js";
import { el, toast } from "./util.js";

const [STATUS, RERUN_OF, FROM_STAGE, RERUNS] = RERUN_LINK_FIELDS;
const [NEW_RUN, STARTS_AT, SKIPPED] = RERUN_RESULT_FIELDS;
const ENDED = new Set(["success", "failure", "cancelled"]);
const runLink = (id) => el("a", { class: "mono", href: `#/runs/${encodeURIComponent(id)}` }, id);

// ---- the run page: "re-run of", "re-runs", and the buttons -----------------------------------------
export function mountRerunPanel(container, runId) {
  const box = el("div", { class: "rerun-panel", id: "rerun-panel" });
  container.append(box);
  let key = "";

  async function rerun(fromFailed, btn) {
    btn.disabled = true;
    try {
      const r = await api(`/api/runs/${encodeURIComponent(runId)}/rerun`, { method: "POST", body: { from_failed: fromFailed } });
      const how = r[STARTS_AT] ? ` from stage ${r[STARTS_AT]}` : "";
      const skipped = r[SKIPPED].length ? ` (skipping ${r[SKIPPED].join(", ")}: outputs present)` : "";
      toast(`Re-run ${r[NEW_RUN]} queued${how}${skipped}.`);
      location.hash = `#/runs/${encodeURIComponent(r[NEW_RUN])}`;
    } catch (e) {
      toast(`Re-run refused: ${e.message}`, "error");
      btn.disabled = false;
    }
  }

  function render(run) {
    const k = JSON.stringify([run[STATUS], run[RERUN_OF], run[FROM_STAGE], run[RERUNS]]);
    if (k === key) return;
    key = k;
    const parts = [];
    if (run[RERUN_OF]) {
      parts.push(el("span", { class: "small" }, "re-run of ", runLink(run[RERUN_OF]),
        run[FROM_STAGE] ? ` from stage ${run[FROM_STAGE]}` : ""));
    }
    if (run[RERUNS].length) {
      const links = run[RERUNS].flatMap((id, i) => (i ? [", ", runLink(id)] : [runLink(id)]));
      parts.push(el("span", { class: "small", id: "reruns" }, "re-runs: ", ...links));
    }
    if (ENDED.has(run[STATUS])) {
      parts.push(el("button", { class: "btn btn-small", id: "rerun", title: "a new run of this pipeline with these parameters",
        onclick: (ev) => rerun(false, ev.currentTarget) }, "re-run"));
      if (run[STATUS] !== "success") {
        parts.push(el("button", { class: "btn btn-small", id: "rerun-from-failed",
          title: "start at the first failed stage; the earlier stages are skipped when their declared outputs are present",
          onclick: (ev) => rerun(true, ev.currentTarget) }, "re-run from failed"));
      }
    }
    box.replaceChildren(...parts);
  }

  async function load() {
    try {
      render(await api(`/api/runs/${encodeURIComponent(runId)}`));
    } catch (e) {
      box.replaceChildren(); // the run page itself says what is wrong with the run
    }
  }
  load();
  const timer = setInterval(load, 3000); // a run's end, and re-runs made elsewhere
  return { unmount() { clearInterval(timer); box.remove(); } };
}

// ---- the home page: backfills and their progress -----------------------------------------------------
const COUNTS = ["success", "failure", "cancelled", "running", "queued", "pending"];

export function mountBackfills(container) {
  const list = el("div", { class: "backfill-list" });
  const card = el("section", { class: "card backfills-card", id: "backfills", hidden: true },
    el("div", { class: "card-head" }, el("h2", null, "Backfills")), list);
  container.append(card);
  const [ID, SCHEDULE, START, END, POLICY, MAX_PARALLEL, DONE, TOTAL] = BACKFILL_FIELDS;

  function row(b) {
    const bar = el("div", { class: "backfill-bar", title: COUNTS.map((c) => `${b[c]} ${c}`).join(", ") },
      ...COUNTS.filter((c) => b[c] > 0).map((c) => el("span", { class: `seg seg-${c}`, style: `flex: ${b[c]}` })));
    const finished = b.success + b.failure + b.cancelled;
    return el("div", { class: "backfill", dataset: { backfillId: b[ID] } },
      el("div", { class: "small" }, el("strong", null, b[SCHEDULE]), ` ${b[START]} → ${b[END]} · ${b[POLICY]} · ${b[MAX_PARALLEL]} at once`),
      bar,
      el("div", { class: "muted small backfill-counts" },
        `${finished} of ${b[TOTAL]} ended (${b.success} success, ${b.failure} failure, ${b.cancelled} cancelled), `
        + `${b.running} running, ${b.queued} queued, ${b.pending} pending${b[DONE] ? " · done" : ""}`));
  }

  async function load() {
    try {
      const page = await api("/api/backfills?limit=10");
      const items = page[BACKFILL_LIST_FIELDS[0]];
      card.hidden = items.length === 0;
      list.replaceChildren(...items.map(row));
    } catch (e) {
      // the scheduler away: the card keeps what it showed; the health banner says why
    }
  }
  load();
  const timer = setInterval(load, 2000);
  return { unmount() { clearInterval(timer); card.remove(); } };
}
