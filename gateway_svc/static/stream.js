// One WebSocket to the gateway that keeps itself connected: it reconnects with backoff and jitter, and
// asks the caller for the URL each time, so the caller resumes from its cursor (all runs) or its last
// applied seq (one run). States: connecting, live, reconnecting, complete, failed.
// Error frames are followed by a close, except `journal_gap` (events N..M of a run are missing from the
// journal: the stream goes on after it), which is handed to onJournalGap and changes nothing here.

import { currentToken, askForToken } from "./api.js";

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const STABLE_AFTER_MS = 5000; // a connection that lived this long resets the backoff

// Close codes and error codes after which reconnecting cannot help.
const FATAL_CLOSE = new Set([4000, 4004, 4400, 4404, 4422]);
const AUTH_CLOSE = new Set([4001, 4003, 4401, 4403]);

export class Stream {
  // path(): "/ws/events?cursor=..." for the next connection.
  // onHello(hello, {reconnect}), onEvents(events, cursor), onState(state, detail),
  // onJournalGap({run_id, missing: [N, M], message}).
  // isComplete(): true when a normal close means "nothing more will come" (a run's terminal event).
  constructor({ name, path, onHello, onEvents, onState, onJournalGap = () => {}, isComplete = () => false }) {
    Object.assign(this, { name, path, onHello, onEvents, onState, onJournalGap, isComplete });
    this.ws = null;
    this.attempt = 0;
    this.timer = 0;
    this.stopped = false;
    this.connects = 0;
    this.openedAt = 0;
    this.state = "idle";
    this.lastError = null;
    this.onToken = () => { if (this.state === "reconnecting" && !this.ws) this._schedule(0); };
  }

  start() {
    this.stopped = false;
    window.addEventListener("runwire-token", this.onToken);
    this._connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("runwire-token", this.onToken);
    clearTimeout(this.timer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onerror = null;
      ws.close(1000, "page left");
    }
  }

  // Reconnect now (e.g. after a gap was seen), resuming from the caller's position.
  restart(reason) {
    if (this.stopped) return;
    this.lastError = reason;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onerror = null;
      ws.close(1000, "resync");
    }
    this._schedule(0);
  }

  _set(state, detail = {}) {
    this.state = state;
    this.onState(state, detail);
  }

  _url() {
    let path = this.path();
    const token = currentToken();
    if (token) path += (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return `${proto}//${location.host}${path}`;
  }

  _connect() {
    if (this.stopped) return;
    const reconnect = this.connects > 0;
    this._set(reconnect ? "reconnecting" : "connecting", { attempt: this.attempt, connecting: true });
    let ws;
    try {
      ws = new WebSocket(this._url());
    } catch (e) {
      this.lastError = e.message;
      this._schedule();
      return;
    }
    this.ws = ws;
    let helloSeen = false;
    let fatal = null;
    let auth = false;
    ws.onopen = () => { this.openedAt = performance.now(); };
    ws.onmessage = (msg) => {
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch (e) {
        this.lastError = `bad frame from gateway: ${e.message}`;
        return;
      }
      if (frame.type === "hello") {
        helloSeen = true;
        this.connects++;
        this.onHello(frame, { reconnect });
        this._set("live", { reconnect, recovered: frame.recovered !== false, reason: frame.reason });
      } else if (frame.type === "events") {
        this.onEvents(frame.events || [], frame.cursor);
      } else if (frame.type === "error" && frame.code === "journal_gap") {
        // not a connection error: the journal itself has a hole; the events after it keep coming
        this.onJournalGap(frame);
      } else if (frame.type === "error") {
        this.lastError = `${frame.code}: ${frame.message}`;
        const code = String(frame.code || "");
        // the run's journal is gone (close 4004 follows): reconnecting cannot bring it back
        if (code === "journal_missing") fatal = frame.message || "the run's journal is missing";
        else if (/auth|token/i.test(code)) auth = true;
        else if (/not_found|unknown|invalid|bad_request/i.test(code)) fatal = frame.message || code;
      }
    };
    ws.onerror = () => { /* the close event that follows carries what happened */ };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      if (this.openedAt && performance.now() - this.openedAt > STABLE_AFTER_MS) this.attempt = 0;
      this.openedAt = 0;
      if (ev.code === 1000 && helloSeen && this.isComplete()) {
        this._set("complete");
        return;
      }
      if (fatal || FATAL_CLOSE.has(ev.code)) {
        this._set("failed", { reason: fatal || `${ev.code} ${ev.reason}`.trim() });
        return;
      }
      if (auth || AUTH_CLOSE.has(ev.code)) {
        this._set("reconnecting", { attempt: this.attempt, reason: "token needed" });
        askForToken("The event stream needs an API token (RUNWIRE_TOKEN):").then(() => this._schedule(0));
        return;
      }
      if (ev.code === 4008) {
        // slow consumer: the server dropped us on purpose; our cursor loses nothing, come back soon
        this.lastError = "closed by the gateway: slow consumer";
        this._schedule(100 + Math.random() * 400);
        return;
      }
      if (!helloSeen) this.lastError ??= `connection failed (${ev.code})`;
      else this.lastError = `closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`;
      this._schedule();
    };
  }

  // Exponential backoff with full jitter, so many pages do not reconnect in step after a restart.
  _schedule(delay) {
    clearTimeout(this.timer);
    if (delay === undefined) {
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
      delay = cap / 2 + Math.random() * (cap / 2);
      this.attempt++;
    }
    this._set("reconnecting", { attempt: this.attempt, retryAt: Date.now() + delay, reason: this.lastError });
    this.timer = setTimeout(() => this._connect(), delay);
  }
}
