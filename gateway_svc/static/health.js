// The services' health, always in view when something is wrong: /healthz (no token needed) every few
// seconds; a failed check (scheduler or runner not reachable, a journal directory that is not the
// gateway's) shows as a strip under the top bar with the gateway's own words, until it is fixed.

import { el } from "./util.js";
import { everyWhileVisible } from "./visible.js";

const POLL_MS = 5000;
const CHECK_NAMES = { scheduler: "Scheduler", runner: "Runner", journal_dir: "Journal directory" };

export const health = { status: "unknown", failed: [], detail: "", at: 0 };

function render() {
  const strip = document.getElementById("health");
  if (!strip) return;
  strip.dataset.status = health.status;
  if (health.status === "ok" || health.status === "unknown") {
    strip.hidden = true;
    return;
  }
  const items = health.failed.length
    ? health.failed.map((f) => el("li", { dataset: { check: f.name } }, el("strong", null, CHECK_NAMES[f.name] || f.name), ": ", f.detail))
    : [el("li", null, health.detail)];
  strip.replaceChildren(el("span", { class: "health-title" }, "⚠ Not healthy: runs may not start or show"), el("ul", null, ...items));
  strip.hidden = false;
}

async function poll() {
  try {
    const resp = await fetch("/healthz", { cache: "no-store" });
    const body = await resp.json();
    const checks = body.checks || {};
    health.failed = (body.failed || []).map((name) => ({ name, detail: (checks[name] && checks[name].detail) || "failed" }));
    health.status = body.status === "ok" ? "ok" : "fail";
    health.detail = body.error ? body.error.message : "";
  } catch (err) {
    // the stream's pill already says the gateway is away; say it here too rather than keep a stale "ok"
    health.status = "unreachable";
    health.failed = [];
    health.detail = `The gateway did not answer /healthz (${err.message || err}).`;
  }
  health.at = Date.now();
  render();
}

// Polled while the page is visible (and at once when it shows again).
export function watchHealth() {
  poll();
  everyWhileVisible(poll, POLL_MS);
}
