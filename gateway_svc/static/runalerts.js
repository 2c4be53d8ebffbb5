// A run's alert webhooks on its page (#/runs/<id>): "alert ops (failure) sent (200, attempt 2)", or
// "failing: ..." while retries go on. Read from GET /api/runs/<id> (`alerts`: each delivery by its
// latest attempt); polled while the box is on the page, until the run has ended and no delivery is
// retrying. Renders only into the box it is given.

import { api } from "./api.js";
import { ALERT_FIELDS, RUN_ALERTS_FIELDS } from "./shapes.js";
import { el } from "./util.js";

const POLL_MS = 3000;
const AFTER_END_MS = 30000; // an end's alerts are made within a moment of it; a down endpoint keeps "retrying"
const ENDED = new Set(["success", "failure", "cancelled"]);

export function describeAlert(a) {
  const name = `alert ${a.alert} (${a.kind.replace("_", " ")})`;
  if (a.outcome === "sent") return `${name} sent (${a.status}, attempt ${a.attempts})`;
  if (a.outcome === "failed") return `${name} failed after ${a.attempts} attempt${a.attempts === 1 ? "" : "s"}: ${a.error}`;
  return `${name} failing: ${a.error} (attempt ${a.attempts}, retrying)`;
}

export function mountRunAlerts(box, runId) {
  box.classList.add("run-alerts");
  box.hidden = true;
  let endedAt = null;

  function render(alerts) {
    box.hidden = alerts.length === 0;
    box.replaceChildren(...alerts.map((a) => el("li", {
      class: `alert-${a.outcome}`, dataset: { alert: a.alert, kind: a.kind, outcome: a.outcome }, title: a.time,
    }, describeAlert(a))));
  }

  async function poll() {
    if (!box.isConnected) return; // the page was left
    let again = true;
    try {
      const raw = await api(`/api/runs/${encodeURIComponent(runId)}`);
      const alerts = (raw[RUN_ALERTS_FIELDS[0]] || []).map((a) => Object.fromEntries(ALERT_FIELDS.map((k) => [k, a[k]])));
      render(alerts);
      if (ENDED.has(raw.status)) {
        endedAt ??= Date.now();
        again = alerts.some((a) => a.outcome === "retrying") || Date.now() - endedAt < AFTER_END_MS;
      }
    } catch {
      // the run page shows the gateway's state; try again on the next round
    }
    if (again && box.isConnected) setTimeout(poll, POLL_MS);
  }
  // first look once the box is on the page (it is made before the page is put in place)
  setTimeout(poll, 0);
}
