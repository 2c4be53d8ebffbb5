// The dashboard's entry: the all-runs WebSocket (resumed by cursor), the hash router (#/ and
// #/runs/<id>), and the hooks tests read (window.__runwire).

import { forgetToken, currentToken } from "./api.js";
import { Stream } from "./stream.js";
import { el, toast } from "./util.js";
import { store, foldIntoStore, noteJournalGap, loadRuns, loadPipelines, loadSchedules } from "./store.js";
import { conn, reportStream } from "./conn.js";
import { health, watchHealth } from "./health.js";
import { mountHome } from "./home.js";
import { mountRun } from "./runview.js";
import { mountHistory } from "./history.js";
import { everyWhileVisible } from "./visible.js";

// ---- the all-runs stream --------------------------------------------------------------------------
const allRuns = new Stream({
  name: "all",
  path: () => (store.cursor ? `/ws/events?cursor=${encodeURIComponent(store.cursor)}` : "/ws/events"),
  onHello: (hello, { reconnect }) => {
    if (hello.cursor) store.cursor = hello.cursor;
    if (reconnect && hello.recovered === false) loadRuns(); // events were lost to us: the list is the truth
    // the gateway was down when the page loaded: what failed then is loaded now
    if (!store.listLoaded) loadRuns();
    if (!store.pipelines.length) loadPipelines();
    if (store.schedulesError) loadSchedules();
  },
  onEvents: (events, cursor) => {
    foldIntoStore(events);
    if (cursor) store.cursor = cursor;
    // a schedule fired: its next fire time moved
    if (events.some((e) => e.event === "queued" && e.data && e.data.trigger === "schedule")) loadSchedules();
  },
  onJournalGap: noteJournalGap,
  onState: (state, detail) => reportStream("all", state, detail),
});

// ---- router ---------------------------------------------------------------------------------------
let current = null;
function route() {
  const view = document.getElementById("view");
  if (current) current.unmount();
  const m = /^#\/runs\/([^/?#]+)/.exec(location.hash);
  const h = /^#\/history(?:\/([^/?#]*))?(?:\?since=([0-9a-z]+))?/.exec(location.hash);
  if (m) {
    current = mountRun(view, decodeURIComponent(m[1]));
  } else if (h) {
    current = mountHistory(view, h[1] ? decodeURIComponent(h[1]) : "", h[2] || "7d");
  } else {
    current = mountHome(view);
  }
  renderTokenButton();
  window.scrollTo(0, 0);
}

function renderTokenButton() {
  const box = document.getElementById("token-box");
  box.replaceChildren();
  if (currentToken()) {
    box.append(el("button", { class: "link", title: "forget the API token stored in this browser",
      onclick: () => { forgetToken(); toast("Token forgotten."); renderTokenButton(); } }, "forget token"));
  }
}

// ---- test and debugging hooks ----------------------------------------------------------------------
window.__runwire = {
  store,
  conn,
  health,
  eventsFor: (runId) => (window.__runwire.runLogs.get(runId)?.appliedSeqs ?? []).slice(),
  receivedFor: (runId) => (window.__runwire.runLogs.get(runId)?.receivedSeqs ?? []).slice(),
  runLogs: new Map(), // run_id -> the run page's log model (see runview.js)
  streams: {}, // "all" -> the all-runs Stream (restart() forces a resume from the cursor)
};

window.__runwire.streams.all = allRuns;

async function boot() {
  // The stream first, the list second: every event after the stream's start comes on the stream, every
  // event before the list's read is in the list, and folding by seq makes the overlap harmless.
  allRuns.start();
  watchHealth();
  window.addEventListener("hashchange", route);
  route();
  await Promise.all([loadRuns(), loadPipelines(), loadSchedules()]);
  everyWhileVisible(loadSchedules, 15000);
}

boot();
