// The connection indicator, always visible: one pill per stream (all runs; this run) saying live,
// reconnecting (with attempt), resumed, or resumed with a gap (with the server's reason, also as a banner).

import { el, fmtClock } from "./util.js";
import { everyWhileVisible } from "./visible.js";

export const conn = { all: { state: "idle" }, run: null, history: [] };
const connBox = () => document.getElementById("conn");
const banner = () => document.getElementById("banner");

export function reportStream(key, state, detail = {}) {
  const prev = conn[key] || {};
  const entry = { ...detail, state, at: Date.now() };
  if (state === "live" && detail.reconnect) entry.resumedAt = Date.now();
  else if (state === "live") entry.resumedAt = prev.resumedAt;
  conn[key] = entry;
  conn.history.push({ stream: key, state, recovered: detail.recovered, reason: detail.reason, at: entry.at });
  if (conn.history.length > 200) conn.history.shift();
  if (state === "live" && detail.recovered === false) {
    showBanner(`${key === "all" ? "Run list" : "This run's log"} resumed with a gap: ${detail.reason || "the gateway could not replay from the last position"}. ` +
      (key === "all" ? "The run list was reloaded." : ""));
  }
  renderConn();
}

export function dropStream(key) {
  conn[key] = null;
  renderConn();
}

function showBanner(text) {
  const b = banner();
  b.replaceChildren(el("span", null, "⚠ ", text), el("button", { class: "link", onclick: () => { b.hidden = true; } }, "dismiss"));
  b.hidden = false;
}

const CONN_TEXT = {
  idle: "○ idle", connecting: "◌ connecting…", live: "● live", reconnecting: "↻ reconnecting",
  complete: "■ complete", failed: "✗ stopped",
};

function pill(label, info) {
  if (!info) return null;
  let text = CONN_TEXT[info.state] || info.state;
  let title = "";
  const cls = [`conn-pill`, `conn-${info.state}`];
  if (info.state === "reconnecting") {
    if (info.attempt) text += ` (attempt ${info.attempt})`;
    if (info.reason) title = info.reason;
  }
  if (info.state === "live" && info.resumedAt) {
    if (Date.now() - info.resumedAt < 10000) { text = "↺ resumed"; cls.push("conn-resumed"); }
    title = `resumed at ${fmtClock(info.resumedAt)} (this browser's clock)`;
    if (info.recovered === false) { text = "⚠ resumed with gap"; cls.push("conn-gap"); title = info.reason || ""; }
  }
  if (info.state === "failed") title = info.reason || "";
  return el("span", { class: cls.join(" "), title, dataset: { stream: label, state: info.state } },
    el("span", { class: "conn-label" }, label), " ", text);
}

function renderConn() {
  const box = connBox();
  if (!box) return;
  box.replaceChildren(...[pill("runs", conn.all), pill("this run", conn.run)].filter(Boolean));
}
everyWhileVisible(renderConn, 2000); // "resumed" turns back into "live" after a while

