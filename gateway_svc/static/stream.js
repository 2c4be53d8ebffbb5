// One WebSocket to the gateway that keeps itself connected: it reconnects with backoff and full jitter,
// and asks the caller for the URL each time, so the caller resumes from its cursor (all runs) or its
// last applied seq (one run). States: connecting, live, reconnecting, complete, failed.
// Frames, error codes and close codes are protocol.js's. Error frames are followed by a close, except
// `journal_gap` (events N..M of a run are missing from the journal: the stream goes on after it), which
// is handed to onJournalGap and changes nothing here. A connection refused at the handshake says
// nothing to a browser's WebSocket (no status, close 1006): the same URL is asked over HTTP, and a 401
// there is a missing or wrong token, so the page asks for one. When one stream of the page gets its
// hello, the gateway is back: the page's other streams waiting in backoff try again at once, so the
// whole page is live again within a moment of the gateway's return, whatever their jittered delays.

import { currentToken, askForToken } from "./api.js";
import { CLOSE, ERROR, closeIsFatal, errorIsFatal, parseFrame } from "./protocol.js";

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const STABLE_AFTER_MS = 5000; // a connection that lived this long resets the backoff
const SLOW_CONSUMER_RETRY_MS = [100, 500]; // dropped on purpose: our position loses nothing, come back soon
const GATEWAY_BACK = "runwire-gateway-back"; // a window event: one stream of this page reached the gateway

// Exponential backoff with full jitter: a delay drawn uniformly from [0, min(max, base * 2^attempt)),
// so pages that lost the gateway together do not come back in step.
export function backoffDelay(attempt, random = Math.random) {
  const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return random() * cap;
}

// Whether the gateway refuses `url` (a ws: URL) for want of a token: a WebSocket handshake refused
// with 401 looks like any dropped connection to the page, so the same URL is asked over HTTP.
export async function refusedForToken(url) {
  const httpUrl = url.replace(/^ws/, "http");
  try {
    const resp = await fetch(httpUrl, { cache: "no-store", headers: { Accept: "application/json" } });
    return resp.status === 401;
  } catch {
    return false; // the gateway is away: a plain reconnect
  }
}

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
    this.onGatewayBack = (ev) => {
      // not while the page asks for a token: that retry waits for the token
      if (ev.detail !== this && this.state === "reconnecting" && !this.ws && this.lastError !== "token needed") this._schedule(0);
    };
  }

  start() {
    this.stopped = false;
    window.addEventListener("runwire-token", this.onToken);
    window.addEventListener(GATEWAY_BACK, this.onGatewayBack);
    this._connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("runwire-token", this.onToken);
    window.removeEventListener(GATEWAY_BACK, this.onGatewayBack);
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
    const url = this._url();
    try {
      ws = new WebSocket(url);
    } catch (e) {
      this.lastError = e.message;
      this._schedule();
      return;
    }
    this.ws = ws;
    let helloSeen = false;
    let opened = false;
    let fatal = null;
    ws.onopen = () => { opened = true; this.openedAt = performance.now(); };
    ws.onmessage = (msg) => {
      let frame;
      try {
        frame = parseFrame(msg.data);
      } catch (e) {
        this.lastError = `bad frame from gateway: ${e.message}`;
        return;
      }
      if (frame === null) return; // a frame type from a newer gateway
      if (frame.type === "hello") {
        helloSeen = true;
        this.connects++;
        this.onHello(frame, { reconnect });
        this._set("live", { reconnect, recovered: frame.recovered !== false, reason: frame.reason });
        window.dispatchEvent(new CustomEvent(GATEWAY_BACK, { detail: this }));
      } else if (frame.type === "events") {
        this.onEvents(frame.events || [], frame.cursor);
      } else if (frame.type === "error" && frame.code === ERROR.JOURNAL_GAP) {
        // not a connection error: the journal itself has a hole; the events after it keep coming
        this.onJournalGap(frame);
      } else if (frame.type === "error") {
        this.lastError = `${frame.code}: ${frame.message}`;
        // the close that follows says whether reconnecting can help; this says why it cannot
        if (errorIsFatal(frame.code)) fatal = frame.message || frame.code;
      }
    };
    ws.onerror = () => { /* the close event that follows carries what happened */ };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      if (this.openedAt && performance.now() - this.openedAt > STABLE_AFTER_MS) this.attempt = 0;
      this.openedAt = 0;
      if (ev.code === CLOSE.NORMAL && helloSeen && this.isComplete()) {
        this._set("complete");
        return;
      }
      if (closeIsFatal(ev.code)) {
        this._set("failed", { reason: fatal || `${ev.code} ${ev.reason}`.trim() });
        return;
      }
      if (!opened) {
        this._refused(url);
        return;
      }
      if (ev.code === CLOSE.SLOW_CONSUMER) {
        // slow consumer: the server dropped us on purpose; our cursor loses nothing, come back soon
        this.lastError = "closed by the gateway: slow consumer";
        const [lo, hi] = SLOW_CONSUMER_RETRY_MS;
        this._schedule(lo + Math.random() * (hi - lo));
        return;
      }
      if (!helloSeen) this.lastError ??= `connection failed (${ev.code})`;
      else this.lastError = `closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`;
      this._schedule();
    };
  }

  // The connection closed before it opened: a token problem (asked for, then retried at once) or the
  // gateway away (the usual backoff).
  async _refused(url) {
    this.lastError ??= "connection failed";
    const auth = await refusedForToken(url);
    if (this.stopped || this.ws) return;
    if (!auth) {
      this._schedule();
      return;
    }
    this.authRefusals = (this.authRefusals || 0) + 1;
    this.lastError = "token needed";
    this._set("reconnecting", { attempt: this.attempt, reason: "token needed" });
    await askForToken(currentToken() ? "The gateway refused this token for the event stream. Enter the API token (RUNWIRE_TOKEN):"
                                     : "The event stream needs an API token (RUNWIRE_TOKEN):");
    if (!this.stopped && !this.ws) this._schedule(0);
  }

  // Exponential backoff with full jitter (backoffDelay), so many pages do not reconnect in step.
  _schedule(delay) {
    clearTimeout(this.timer);
    if (delay === undefined) {
      delay = backoffDelay(this.attempt);
      this.attempt++;
    }
    this._set("reconnecting", { attempt: this.attempt, retryAt: Date.now() + delay, reason: this.lastError });
    this.timer = setTimeout(() => this._connect(), delay);
  }
}
