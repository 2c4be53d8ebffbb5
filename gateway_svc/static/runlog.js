// The page model of one run (#/runs/<id>), apart from rendering: its events in seq order, the folded
// run state, what the page has done with each event (tests compare appliedSeqs with the journal), the
// journal's holes as marks in the log, and the filtered views the log and the stage lane show.
// It has no DOM: runview.js renders it, tests/test_dashboard_model.py drives it directly.

import { newRun, applyEvent } from "./runstate.js";
import { holeCovered, zoneLabel } from "./util.js";

export const KINDS = ["queued", "start", "success", "failure", "skipped", "cancelled", "metric", "log"];
export const STAGE_EVENT_KINDS = new Set(["queued", "start", "success", "failure", "skipped", "cancelled"]);
// a seq gap that comes back after this many reconnects is shown as a hole instead of reconnecting again
export const GAP_RETRIES = 3;

export class RunLog {
  constructor(runId) {
    this.runId = runId;
    this.run = newRun(runId);
    this.fetched = null; // GET /api/runs/<id>, shown until the first events arrive
    this.events = []; // events in seq order, with journal-gap marks among them
    this.appliedSeqs = []; // the seq of every event applied, in order
    this.receivedSeqs = []; // every seq received over the wire, duplicates included
    this.duplicates = 0;
    this.gaps = []; // seq gaps seen on the wire (each answered by a reconnect from the last applied seq)
    this.journalGaps = []; // [[N, M], ...]: events missing from the journal itself
    this.marks = 0; // journal-gap marks among `events` (rows that are not events)
    this.kindCounts = Object.fromEntries(KINDS.map((k) => [k, 0]));
    this.stageNames = new Set();
    this.filters = { stage: "", kinds: new Set(KINDS), text: "" };
    this.filtered = []; // indices into events that pass the filters
    this.milestones = []; // indices of stage events (never drowned by log lines)
    this.error = null;
    this.zones = new Set(); // the zones ("UTC-06:00") the events' timestamps are written in
  }

  // The position a (re)connection resumes after.
  get lastSeq() {
    return this.run.last_seq;
  }

  // Events from the stream. Returns {restart, newStages}: restart is the reason to reconnect from the
  // last applied seq (a seq gap: never show a log with a hole), or null; newStages the stage names
  // seen for the first time.
  receive(events) {
    const newStages = [];
    let restart = null;
    for (const ev of events) {
      this.receivedSeqs.push(ev.seq);
      if (ev.run_id !== this.runId) continue;
      const last = this.run.last_seq;
      if (ev.seq <= last) { this.duplicates++; continue; } // the server promises exactly-once; be sure
      if (ev.seq !== last + 1 && !holeCovered(this.journalGaps, last + 1, ev.seq - 1)) {
        // if the same hole comes back after reconnects, the gateway cannot fill it: show it rather than loop
        this.gaps.push([last + 1, ev.seq - 1]);
        const again = this.gaps.filter(([n]) => n === last + 1).length;
        if (again > GAP_RETRIES) {
          this.noteJournalGap([last + 1, ev.seq - 1], `still missing after ${GAP_RETRIES} reconnects`, { reported: false });
        } else {
          restart = `gap: seq ${last + 1}..${ev.seq - 1} missing`;
          break;
        }
      }
      applyEvent(this.run, ev);
      const index = this.events.push(ev) - 1;
      this.appliedSeqs.push(ev.seq);
      const zone = zoneLabel(ev.timestamp);
      if (zone) this.zones.add(zone);
      this.kindCounts[ev.event] = (this.kindCounts[ev.event] || 0) + 1;
      if (ev.stage !== "pipeline" && !this.stageNames.has(ev.stage)) {
        this.stageNames.add(ev.stage);
        newStages.push(ev.stage);
      }
      if (STAGE_EVENT_KINDS.has(ev.event)) this.milestones.push(index);
      if (this.matches(ev)) this.filtered.push(index);
    }
    return { restart, newStages };
  }

  // The gateway's journal_gap frame (or a `gaps` entry of the run): events N..M are not in the journal.
  // Noted once (a reconnect replays the frame), as a mark at its place in the log. Returns whether it
  // was new. `reported: false`: a seq gap that reconnects did not fill.
  noteJournalGap(range, message, { reported = true } = {}) {
    if (!range || this.journalGaps.some(([n, m]) => n === range[0] && m === range[1])) return false;
    this.journalGaps.push(range);
    const [n, m] = range;
    const mark = { gap: range, seq: null, stage: "", event: "gap", timestamp: null, reported,
      msg: reported ? `⚠ events ${n}–${m} missing from the journal` : `⚠ events ${n}–${m} not delivered by the gateway`,
      detail: message || "" };
    let at = this.events.findIndex((e) => !e.gap && e.seq > m);
    if (at < 0) at = this.events.length;
    this.events.splice(at, 0, mark);
    this.marks++;
    if (at === this.events.length - 1) {
      this.milestones.push(at);
      this.filtered.push(at);
    } else {
      this.reindex();
    }
    return true;
  }

  matches(ev) {
    const f = this.filters;
    if (ev.gap) return true; // a hole in the journal stays in view whatever the filters
    if (f.stage && ev.stage !== f.stage) return false;
    if (!f.kinds.has(ev.event)) return false;
    if (f.text) {
      ev._hay ??= `${ev.stage} ${ev.event} ${ev.msg || ""} ${ev.data ? JSON.stringify(ev.data) : ""}`.toLowerCase();
      if (!ev._hay.includes(f.text)) return false;
    }
    return true;
  }

  // Change the filters ({stage, text, kinds} in part) and rebuild the filtered view.
  setFilters(change) {
    Object.assign(this.filters, change);
    this.refilter();
  }

  toggleKind(kind) {
    if (this.filters.kinds.has(kind)) this.filters.kinds.delete(kind);
    else this.filters.kinds.add(kind);
    this.refilter();
  }

  clearFilters() {
    this.filters = { stage: "", kinds: new Set(KINDS), text: "" };
    this.refilter();
  }

  refilter() {
    this.filtered = [];
    for (let i = 0; i < this.events.length; i++) if (this.matches(this.events[i])) this.filtered.push(i);
  }

  // After a mark is inserted mid-log, positions shift: the indices are rebuilt.
  reindex() {
    this.milestones = [];
    this.events.forEach((ev, i) => { if (ev.gap || STAGE_EVENT_KINDS.has(ev.event)) this.milestones.push(i); });
    this.refilter();
  }

  // Counts as the log's header shows them (marks are counted out of both).
  counts() {
    return { total: this.events.length - this.marks, passing: this.filtered.length - this.marks };
  }

  // The banner's words for the journal's holes, or "" when there are none.
  gapText() {
    if (!this.journalGaps.length) return "";
    const list = this.journalGaps.map(([a, b]) => (a === b ? `event ${a}` : `events ${a}–${b}`)).join(", ");
    const reported = this.events.some((e) => e.gap && e.reported);
    return `⚠ This run's log is missing ${list} (the gateway ${reported ? "reports a hole in the journal" : "did not deliver them"}): ` +
      `${this.journalGaps.length > 1 ? "they are" : "it is"} marked in the log below. `;
  }

  // The zones of this run's times: its events' (as received), or the fetched run's before any arrive.
  runZones(run) {
    if (this.zones.size) return [...this.zones];
    return [...new Set([run.queued_at, run.started_at, run.ended_at].map(zoneLabel).filter(Boolean))];
  }

  // What the page shows as the run: the folded events, or the fetched run before any arrive.
  shownRun() {
    return this.run.last_seq > 0 || !this.fetched ? this.run : this.fetched;
  }

  // Let go of the events when the page is left (the model may still be referenced for a moment).
  release() {
    this.events = [];
    this.filtered = [];
    this.milestones = [];
    this.appliedSeqs = [];
    this.receivedSeqs = [];
    this.released = true;
  }
}
