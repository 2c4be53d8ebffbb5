// Small helpers shared by the dashboard's views: DOM building, time and number formatting, status labels.

// Every status has a label and a shape (icon) as well as a colour, so it reads without colour vision.
export const STATUS = {
  queued: { icon: "◷", label: "queued" },
  pending: { icon: "○", label: "pending" },
  running: { icon: "▶", label: "running" },
  success: { icon: "✓", label: "success" },
  failure: { icon: "✗", label: "failure" },
  cancelled: { icon: "⊘", label: "cancelled" },
  skipped: { icon: "↷", label: "skipped" },
  unfinished: { icon: "◌", label: "unfinished" },
  notrun: { icon: "–", label: "not run" },
};

export const KIND_ICON = {
  queued: "◷", start: "▶", success: "✓", failure: "✗", skipped: "↷", cancelled: "⊘", log: "·", metric: "≡",
};

// el("div", {class: "x", onclick: f}, "text", child) -> element. Text is always set as text, never HTML.
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (v === true) node.setAttribute(k, "");
      else node.setAttribute(k, String(v));
    }
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

export function setText(node, text) {
  text = String(text);
  if (node.textContent !== text) node.textContent = text;
}

export function badge(status, extraClass = "") {
  const s = STATUS[status] || { icon: "?", label: status || "unknown" };
  return el("span", { class: `badge st-${status} ${extraClass}`.trim(), title: s.label },
    el("span", { class: "icon", "aria-hidden": "true" }, s.icon), s.label);
}

// Timestamps are RFC 3339 with microseconds ("2026-11-23T03:15:00.123456-06:00"); Date.parse only
// promises milliseconds, so the fraction is cut to three digits first.
const TS_RE = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$/;
export function parseTs(ts) {
  if (!ts) return NaN;
  const m = TS_RE.exec(ts);
  if (!m) return Date.parse(ts);
  const frac = m[2] ? m[2].slice(0, 4) : "";
  return Date.parse(m[1] + frac + (m[3] || "Z"));
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

export function fmtClock(ms, withMillis = false) {
  if (!Number.isFinite(ms)) return "—";
  const d = new Date(ms);
  const t = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withMillis ? `${t}.${pad(d.getMilliseconds(), 3)}` : t;
}

// "14:03:07" today, "Nov 23 14:03" another day (in this browser's zone: for the browser's own clock only;
// event and run times are shown as written, with fmtTsClock/fmtTsWhen).
export function fmtWhen(ms) {
  if (!Number.isFinite(ms)) return "—";
  const d = new Date(ms);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return fmtClock(ms);
  const month = d.toLocaleString("en", { month: "short" });
  const year = d.getFullYear() === now.getFullYear() ? "" : ` ${d.getFullYear()}`;
  return `${month} ${d.getDate()}${year} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

// Event and run times are shown as the events write them: the wall clock in the events' own offset (the
// config's zone, the one the CLI and the logs use), not converted to the browser's zone.
// "2026-11-23T03:15:00.123456-06:00" -> {date, time: "03:15:00", millis: "123", offset: "-06:00"}.
const TS_PARTS_RE = /^(\d{4})-(\d\d)-(\d\d)[T ](\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?$/i;
export function tsParts(ts) {
  const m = typeof ts === "string" ? TS_PARTS_RE.exec(ts) : null;
  if (!m) return null;
  let offset = (m[6] || "Z").toUpperCase();
  if (offset !== "Z" && !offset.includes(":")) offset = `${offset.slice(0, 3)}:${offset.slice(3)}`;
  const offsetMin = offset === "Z" ? 0 : (offset[0] === "-" ? -1 : 1) * (Number(offset.slice(1, 3)) * 60 + Number(offset.slice(4, 6)));
  return {
    year: Number(m[1]), month: Number(m[2]), day: Number(m[3]), date: `${m[1]}-${m[2]}-${m[3]}`,
    time: m[4], millis: (m[5] || "").padEnd(3, "0").slice(0, 3), offset, offsetMin,
  };
}

// "UTC-06:00" ("UTC" for Z and +00:00): the zone a timestamp is written in.
export function zoneLabel(ts) {
  const p = tsParts(ts);
  if (!p) return "";
  return p.offsetMin === 0 ? "UTC" : `UTC${p.offset}`;
}

// "03:15:00" (or "03:15:00.123") as written in the timestamp.
export function fmtTsClock(ts, withMillis = false) {
  const p = tsParts(ts);
  if (!p) return ts ? fmtClock(parseTs(ts), withMillis) : "—";
  return withMillis ? `${p.time}.${p.millis}` : p.time;
}

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
// "03:15:00" when the timestamp's date is today in its own zone, else "Nov 23 03:15" (and the year).
export function fmtTsWhen(ts, now = Date.now()) {
  const p = tsParts(ts);
  if (!p) return ts ? fmtWhen(parseTs(ts)) : "—";
  const today = new Date(now + p.offsetMin * 60000).toISOString().slice(0, 10); // today in that zone
  if (p.date === today) return p.time;
  const year = p.date.slice(0, 4) === today.slice(0, 4) ? "" : ` ${p.year}`;
  return `${MONTHS[p.month - 1]} ${p.day}${year} ${p.time.slice(0, 5)}`;
}

// A tooltip for a shown time: the whole timestamp and its zone.
export function tsTitle(ts) {
  const zone = zoneLabel(ts);
  return ts ? `${ts}${zone ? ` (${zone})` : ""}` : "";
}

// True when every seq in from..to lies in one of the [N, M] ranges: a hole the journal itself has
// (reported by the gateway's journal_gap frame), not one a reconnect could fill.
export function holeCovered(ranges, from, to) {
  let s = from;
  while (s <= to) {
    const r = ranges.find(([n, m]) => n <= s && s <= m);
    if (!r) return false;
    s = r[1] + 1;
  }
  return true;
}

// [N, M] from a journal_gap frame's `missing` (or an entry of `gaps`), or null when malformed.
export function gapRange(missing) {
  if (!Array.isArray(missing)) return null;
  const n = Number(missing[0]), m = Number(missing.length > 1 ? missing[1] : missing[0]);
  return Number.isInteger(n) && Number.isInteger(m) && n >= 1 && m >= n ? [n, m] : null;
}

export function fmtDuration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return "—";
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)}s`;
  if (s < 60) return `${Math.floor(s)}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${pad(Math.floor(s % 60))}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${pad(m % 60)}m`;
  return `${Math.floor(h / 24)}d ${pad(h % 24)}h`;
}

// "in 3m 12s" / "4s ago"
export function fmtRelative(ms, now = Date.now()) {
  if (!Number.isFinite(ms)) return "";
  const delta = ms - now;
  return delta >= 0 ? `in ${fmtDuration(delta)}` : `${fmtDuration(-delta)} ago`;
}

const numFmt = new Intl.NumberFormat("en");
export function fmtValue(key, value) {
  if (typeof value === "number") {
    if (key === "elapsed_s" || key.endsWith("_s")) return fmtDuration(value * 1000);
    return Number.isInteger(value) ? numFmt.format(value) : numFmt.format(Math.round(value * 1000) / 1000);
  }
  if (value === null || value === undefined) return "—";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

export function fmtCount(n) {
  return numFmt.format(n);
}

// Calls fn at most once per animation frame, however often it is requested: DOM work is batched.
export function frameBatcher(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fn();
    });
  };
}

export function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

let toastBox = null;
// A short message in the corner; errors stay until dismissed, others fade.
export function toast(text, kind = "info") {
  toastBox ??= document.getElementById("toasts");
  const t = el("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" },
    el("span", null, text),
    el("button", { class: "link", "aria-label": "dismiss", onclick: () => t.remove() }, "×"));
  toastBox.append(t);
  if (kind !== "error") setTimeout(() => t.remove(), 5000);
}
