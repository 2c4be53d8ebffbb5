"""The fault run's invariants as pure functions over what it recorded: journals read back as plain JSON
lines (a client's view, independent of shared.journal), what each client received, the launches'
answers and the faults' times. No sockets here, so each rule can be tested on its own.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

TERMINAL = ("success", "failure", "cancelled")
# an all-runs client sees "events from now on": an event journaled this long after its first hello
# must reach it (the slack covers the gateway's subscription settling, not lost events)
FROM_NOW_SLACK_S = 2.0


def event_time(ev: dict[str, Any]) -> float:
    return datetime.fromisoformat(ev["timestamp"]).timestamp()


def is_terminal(ev: dict[str, Any]) -> bool:
    return ev.get("stage") == "pipeline" and ev.get("event") in TERMINAL


@dataclass
class Journal:
    run_id: str
    path: Path
    events: list[dict[str, Any]]
    bad_lines: list[str] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.events[-1] if self.events else None

    @property
    def ended(self) -> bool:
        return self.last is not None and is_terminal(self.last)

    @property
    def queued_data(self) -> dict[str, Any]:
        if self.events and self.events[0].get("event") == "queued":
            return self.events[0].get("data") or {}
        return {}

    def seqs(self) -> list[int]:
        return [ev["seq"] for ev in self.events]

    def problems(self) -> list[str]:
        """What breaks "seq 1..n without gaps, begins with queued, exactly one terminal, the last line"."""
        out = [f"unreadable line {b[:80]!r}" for b in self.bad_lines]
        seqs = self.seqs()
        if seqs != list(range(1, len(seqs) + 1)):
            out.append(f"seqs not 1..{len(seqs)}: {_ranges(seqs)}")
        if not self.events or self.events[0].get("event") != "queued":
            out.append("does not begin with queued")
        terminals = [i for i, ev in enumerate(self.events) if is_terminal(ev)]
        if len(terminals) > 1:
            out.append(f"{len(terminals)} terminal events (seqs {[self.events[i]['seq'] for i in terminals]})")
        if terminals and terminals[-1] != len(self.events) - 1:
            out.append(f"events after the terminal one (terminal at line {terminals[-1] + 1} of {len(self.events)})")
        return out


def _ranges(seqs: list[int]) -> str:
    """[1,2,3,5,6,9] -> '1-3,5-6,9' (short evidence for a message)."""
    runs: list[list[int]] = []
    for s in seqs:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def read_journals(events_dir: Path) -> dict[str, Journal]:
    journals: dict[str, Journal] = {}
    for path in sorted(events_dir.glob("pipeline_*.jsonl")):
        run_id = path.name.removeprefix("pipeline_").removesuffix(".jsonl")
        events, bad = [], []
        for line in path.read_bytes().splitlines():
            try:
                ev = json.loads(line)
                if not isinstance(ev, dict) or not isinstance(ev.get("seq"), int):
                    raise ValueError("not an event")
                events.append(ev)
            except (ValueError, RecursionError):
                bad.append(line.decode(errors="replace"))
        journals[run_id] = Journal(run_id, path, events, bad)
    return journals


@dataclass
class ClientLog:
    """What one client received, in arrival order, and how its (re)connections went."""

    name: str
    kind: str  # "all" (WebSocket /ws/events or SSE), "run" (/ws/events/{run_id}), "zmq"
    run_id: str | None = None
    t0: float | None = None  # wall time of its first hello (all-runs clients) or start (zmq)
    received: list[tuple[str, int]] = field(default_factory=list)
    connects: int = 0
    unrecovered: list[str] = field(default_factory=list)  # reasons of hellos with recovered: false
    closes: Counter[str] = field(default_factory=Counter)  # close codes / errors seen, for the figures
    stalls: int = 0
    disconnects: int = 0
    errors: list[str] = field(default_factory=list)  # error frames (code: message)
    hellos: list[tuple[int, str]] = field(default_factory=list)  # (len(received) at the hello, what resumed)
    cursor: str | None = None  # where it resumes: kept here, so a session that dies mid-read keeps its last one
    terminal_seen: bool = False  # some run's terminal event arrived (per-run clients stop then)


def expected_seqs(client: ClientLog, journal: Journal, got: set[int]) -> set[int]:
    seqs = journal.seqs()
    if not seqs:
        return set()
    if client.kind == "run":
        return set(seqs) if journal.run_id == client.run_id else set()
    assert client.t0 is not None
    late = [ev["seq"] for ev in journal.events if event_time(ev) >= client.t0 + FROM_NOW_SLACK_S]
    if client.kind == "zmq":  # the recipe fetches a run from seq 1 as soon as it sees any of it
        return set(seqs) if (got or late) else set()
    starts = ([min(got)] if got else []) + ([min(late)] if late else [])
    return {s for s in seqs if s >= min(starts)} if starts else set()


@dataclass
class ClientFigures:
    received: int = 0
    expected: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    phantom: int = 0  # received but not in the journal
    examples: list[str] = field(default_factory=list)


def client_figures(client: ClientLog, journals: dict[str, Journal]) -> ClientFigures:
    fig = ClientFigures(received=len(client.received))
    by_run: dict[str, list[int]] = {}
    for run_id, seq in client.received:
        by_run.setdefault(run_id, []).append(seq)
    runs = set(by_run) | (set(journals) if client.kind != "run" else {client.run_id or ""})
    for run_id in sorted(runs):
        arrived = by_run.get(run_id, [])
        journal = journals.get(run_id)
        got = set(arrived)
        have = set(journal.seqs()) if journal else set()
        expected = expected_seqs(client, journal, got) if journal else set()
        fig.expected += len(expected)
        lost = sorted(expected - got)
        phantom = sorted(got - have)
        dup = len(arrived) - len(got)
        top, reordered = 0, 0
        seen: set[int] = set()
        for s in arrived:
            if s not in seen and s < top:
                reordered += 1
            seen.add(s)
            top = max(top, s)
        fig.lost += len(lost)
        fig.phantom += len(phantom)
        fig.duplicated += dup
        fig.reordered += reordered
        if (lost or phantom or dup or reordered) and len(fig.examples) < 6:
            last = journal.last if journal else None
            fig.examples.append(
                f"{run_id}: lost {_ranges(lost) or '-'} dup {dup} reordered {reordered} phantom {_ranges(phantom) or '-'}"
                f" (journal 1..{len(have)}, ends {last['event'] if last else '?'}: {last.get('msg', '') if last else ''!r})")
    return fig


@dataclass
class Interval:
    """A time a service was not serving: from the fault's start until it ran again (wall clock)."""

    service: str
    kind: str  # "kill" or "stop"
    start: float
    end: float


def false_runner_lost(journals: dict[str, Journal], down: list[Interval], lost_after: float) -> list[str]:
    """Runs ended "runner lost" although the runner was neither stopped nor killed in the
    `lost_after` seconds before the end was journaled."""
    out = []
    runner = [iv for iv in down if iv.service == "runner"]
    for j in journals.values():
        last = j.last
        if not j.ended or last is None or "runner lost" not in str(last.get("msg", "")):
            continue
        t = event_time(last)
        if not any(iv.start <= t and iv.end >= t - lost_after for iv in runner):
            near = [f"{iv.kind} {iv.start - t:+.1f}..{iv.end - t:+.1f}s" for iv in down if abs(iv.start - t) < 15]
            out.append(f"{j.run_id} seq {last['seq']} at {last['timestamp']}: {last['msg']!r}"
                       f" (faults near it: {', '.join(near) or 'none'})")
    return out


def orphans(home: Path, journals: dict[str, Journal]) -> list[str]:
    """Live processes whose environment names a run of this home that has ended."""
    out = []
    for pid, env, cmd in processes_of(home):
        run_id = env.get("RUNWIRE_RUN_ID", "")
        j = journals.get(run_id)
        if j is not None and j.ended:
            out.append(f"pid {pid} {cmd!r} of {run_id} (ended {j.last['event'] if j.last else '?'}"
                       f" at {j.last['timestamp'] if j.last else '?'}: {j.last.get('msg', '') if j.last else ''!r})")
    return out


def processes_of(home: Path) -> list[tuple[int, dict[str, str], str]]:
    """(pid, environment, command line) of live, non-zombie processes started for runs of `home`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/environ").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_bytes()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X"):
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        if env.get("RUNWIRE_HOME") == str(home) and "RUNWIRE_RUN_ID" in env:
            found.append((int(name), env, cmd))
    return found


@dataclass
class Launch:
    """One POST /api/runs attempt and its answer."""

    key: str
    answer: str  # "202", "503", or "other: <status or error>"
    run_id: str | None = None
    at: float = 0.0
    body: str = ""


def runs_of_key(journals: dict[str, Journal], key: str) -> list[Journal]:
    """Journals whose queued event carries the key (the Idempotency-Key the scheduler records, or the
    `tag` parameter the fault run sets to the same value, which works before the header does)."""
    out = []
    for j in journals.values():
        data = j.queued_data
        if data.get("idempotency_key") == key or (data.get("params") or {}).get("tag") == key:
            out.append(j)
    return out


def ran(j: Journal) -> bool:
    """Not ended `cancelled` before starting: it started a stage, or it ended otherwise."""
    if any(ev.get("event") == "start" for ev in j.events):
        return True
    return not (j.ended and j.last is not None and j.last.get("event") == "cancelled")


def launch_figures(launches: list[Launch], journals: dict[str, Journal]) -> dict[str, list[str]]:
    acked_lost, ran_503, two_runs = [], [], []
    keys_acked = {la.key for la in launches if la.answer == "202"}
    for la in launches:
        if la.answer == "202":
            j = journals.get(la.run_id or "")
            if j is None:
                acked_lost.append(f"{la.run_id} (key {la.key}): 202 but no journal")
            elif not j.ended:
                acked_lost.append(f"{la.run_id} (key {la.key}): 202 but never ended (last {j.last})")
        elif la.answer == "503" and la.key not in keys_acked:
            for j in runs_of_key(journals, la.key):
                if ran(j):
                    ran_503.append(f"key {la.key}: 503 {la.body[:120]!r} at {_clock(la.at)}, yet {j.run_id} was queued"
                                   f" at {j.events[0]['timestamp']} and ended {j.last['event'] if j.last else '?'}")
    for key in sorted({la.key for la in launches}):
        runs = runs_of_key(journals, key)
        if len(runs) > 1:
            two_runs.append(f"key {key}: {len(runs)} runs {[j.run_id for j in runs]}")
    return {"202s lost": acked_lost, "503s that ran": ran_503, "keys with two runs": two_runs}


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
