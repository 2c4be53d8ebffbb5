// The page's knowledge of runs, pipelines and schedules: loaded from the API, kept current by folding
// the all-runs stream's events in seq order (a gap or an unknown run is fetched whole instead).

import { api, ApiError } from "./api.js";
import { applyEvent, newRun, runFromApi } from "./runstate.js";
import { frameBatcher, holeCovered, gapRange } from "./util.js";

const RUN_LIST_LIMIT = 500;

export const store = {
  runs: new Map(), // run_id -> run
  cursor: null, // the all-runs stream's cursor: where a reconnect resumes
  pipelines: [], // [{name, description, params: [{name, type, default, choices, description}], stages: []}]
  schedules: [],
  listeners: new Set(),
  listLoaded: false,
  listError: null,
  journalGaps: new Map(), // run_id -> [[N, M], ...]: events missing from the journal itself (journal_gap)
};

// The gateway says events N..M of a run are missing from its journal: folding goes across that hole
// instead of refetching the run (which cannot fill it).
export function noteJournalGap(frame) {
  const range = gapRange(frame.missing);
  if (!frame.run_id || !range) return;
  const list = store.journalGaps.get(frame.run_id) || [];
  if (!list.some(([n, m]) => n === range[0] && m === range[1])) list.push(range);
  store.journalGaps.set(frame.run_id, list);
}

const notify = frameBatcher(() => { for (const fn of store.listeners) fn(); });
export function changed() { notify(); }

// A run whose events cannot be folded exactly (unknown to the page, or a seq gap) is fetched whole;
// its events that arrive meanwhile wait in `held` and are folded after the fetch, so none is lost.
const held = new Map(); // run_id -> events that arrived while the run was being fetched

async function refetchRun(runId) {
  if (held.has(runId)) return;
  held.set(runId, []);
  let fetched = false;
  try {
    const raw = await api(`/api/runs/${encodeURIComponent(runId)}`);
    const run = runFromApi(raw);
    const known = store.runs.get(runId);
    if (!known || run.last_seq >= known.last_seq) store.runs.set(runId, run);
    fetched = true;
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) console.warn(`runwire: cannot fetch run ${runId}:`, e.message);
  } finally {
    const waiting = held.get(runId);
    held.delete(runId);
    // after a failed fetch the waiting events are folded across the gap: a summary that is a little
    // incomplete beats one stuck at an old status (and a retry loop against a failing gateway)
    if (waiting.length && store.runs.has(runId)) foldIntoStore(waiting, { acrossGaps: !fetched });
    changed();
  }
}

export function foldIntoStore(events, { acrossGaps = false } = {}) {
  for (const ev of events) {
    const waiting = held.get(ev.run_id);
    if (waiting) { waiting.push(ev); continue; }
    let run = store.runs.get(ev.run_id);
    if (!run) {
      if (ev.seq !== 1) { refetchRun(ev.run_id); held.get(ev.run_id).push(ev); continue; }
      store.runs.set(ev.run_id, (run = newRun(ev.run_id)));
    }
    if (ev.seq <= run.last_seq) continue; // already folded (from the list, or a replay)
    if (ev.seq !== run.last_seq + 1 && !acrossGaps && !holeCovered(store.journalGaps.get(ev.run_id) || [], run.last_seq + 1, ev.seq - 1)) {
      refetchRun(ev.run_id); held.get(ev.run_id).push(ev); continue;
    }
    applyEvent(run, ev);
  }
  changed();
}

export async function loadRuns() {
  try {
    const data = await api(`/api/runs?limit=${RUN_LIST_LIMIT}`);
    for (const raw of data.runs) {
      const run = runFromApi(raw);
      const known = store.runs.get(run.run_id);
      // keep whichever is further along: the stream may have delivered newer events already
      if (!known || run.last_seq > known.last_seq) store.runs.set(run.run_id, run);
    }
    store.listLoaded = true;
    store.listError = null;
  } catch (e) {
    store.listError = e.message;
  }
  changed();
}

export async function loadPipelines() {
  try {
    const data = await api("/api/pipelines");
    store.pipelines = data.pipelines; // PipelineView: name, description, stages (names), params (ParamView)
    store.pipelinesError = null;
  } catch (e) {
    store.pipelinesError = e.message;
  }
  changed();
}

export async function loadSchedules() {
  try {
    const data = await api("/api/schedules");
    store.schedules = data.schedules; // ScheduleInfo
    store.schedulesError = null;
  } catch (e) {
    store.schedulesError = e.message;
  }
  changed();
}

