"""Fuzzing journal lines: garbage, depth bombs (5,000 levels), lines of another run and torn tails,
inserted into the journals of an ended run and of a run in the middle. shared.journal.JournalReader
skips and counts them and returns every good event; with such journals present, all three real services
start, the gateway's /api/runs/{id}/events reports the holes in "gaps", and a WebSocket replay sends a
journal_gap error frame and goes on (issue 11, defect 2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, strategies as st

from shared import journal
from shared.events import Event, event_to_json_line
from shared.ids import new_run_id
from shared.journal import JournalReader, journal_path
from tests.fuzzing import REQUEST_TIMEOUT, Trio, assert_serving, fuzz, http_request, json_bomb, launch_and_finish, make_trio

TS = "2026-11-23T03:15:00.123456-06:00"


def run_events(run_id: str, ended: bool = True) -> list[Event]:
    evs = [
        Event(run_id, 1, TS, "pipeline", "queued", "sleepy queued (manual)", {"pipeline": "sleepy", "params": {}, "trigger": "manual"}),
        Event(run_id, 2, TS, "pipeline", "start", "sleepy started"),
        Event(run_id, 3, TS, "nap", "start", "nap started"),
        Event(run_id, 4, TS, "nap", "log", "napping", {"stream": "stdout"}),
        Event(run_id, 5, TS, "nap", "success", "nap done"),
        Event(run_id, 6, TS, "pipeline", "success", "done"),
    ]
    return evs if ended else evs[:4]


def line(ev: Event) -> bytes:
    return event_to_json_line(ev)


def bomb_line(run_id: str, seq: int, depth: int = 5000) -> bytes:
    """A line that looks like an event whose data nests `depth` levels."""
    return (b'{"run_id":"' + run_id.encode() + b'","seq":' + str(seq).encode() + b',"timestamp":"' + TS.encode()
            + b'","stage":"nap","event":"log","msg":"x","data":{"a":' + json_bomb(depth) + b"}}\n")


def unknown_field_bomb_line(run_id: str, seq: int, depth: int = 5000) -> bytes:
    """An event line with an unknown field nesting `depth` objects (a decoder skips it, recursively)."""
    return (b'{"run_id":"' + run_id.encode() + b'","seq":' + str(seq).encode() + b',"timestamp":"' + TS.encode()
            + b'","stage":"nap","event":"log","msg":"x","extra":' + json_bomb(depth, "dict") + b"}\n")


def hostile_lines(run_id: str) -> st.SearchStrategy[bytes]:
    other = new_run_id("other-")
    return st.one_of(
        st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ") + b"\n").filter(lambda b: b.strip() != b""),
        st.integers(1, 9).map(lambda seq: unknown_field_bomb_line(run_id, seq)),
        st.just(json_bomb(5000) + b"\n"),
        st.just(json_bomb(5000, "dict") + b"\n"),
        st.integers(1, 9).map(lambda seq: bomb_line(run_id, seq)),
        st.integers(1, 9).map(lambda seq: bomb_line(run_id, seq, 1500)),
        st.integers(1, 9).map(lambda seq: line(Event(other, seq, TS, "nap", "log", "of another run"))),
        st.sampled_from([b"{}\n", b"null\n", b"[]\n", b'{"run_id": 5}\n', b"\x00\x00\n", b'{"seq": -1}\n']),
    )


@fuzz(200)
@given(data=st.data(), ended=st.booleans(), torn=st.booleans())
def test_reader_skips_and_counts_hostile_lines_and_returns_every_good_event(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, ended: bool, torn: bool) -> None:
    run_id = new_run_id()
    good = run_events(run_id, ended)
    lines = [line(ev) for ev in good]
    replaced = set(data.draw(st.sets(st.integers(1, len(good)), max_size=2), label="replaced seqs"))
    inserts = data.draw(st.lists(st.tuples(st.integers(0, len(lines)), hostile_lines(run_id)), min_size=1, max_size=4), label="inserted")
    out = [data.draw(hostile_lines(run_id)) if good[i].seq in replaced else ln for i, ln in enumerate(lines)]
    for pos, bad in sorted(inserts, key=lambda t: -t[0]):
        out.insert(pos, bad)
    text = b"".join(out)
    if torn:
        text += b'{"run_id":"' + run_id.encode() + b'","seq":99,"timest'  # a crash mid-line: no newline
    path = journal_path(tmp_path_factory.mktemp("j"), run_id)
    path.write_bytes(text)
    before = journal.stats.corrupt_lines_skipped
    reader = JournalReader(path, run_id)
    got = reader.read()
    expected = [ev for ev in good if ev.seq not in replaced]
    assert [e.seq for e in got] == [e.seq for e in expected], (text[:2000], got)
    assert journal.stats.corrupt_lines_skipped > before  # skipped and counted, never silent
    for after in range(0, 7):
        assert [e.seq for e in reader.read(after)] == [e.seq for e in expected if e.seq > after]
    last = reader.last_event()
    assert last is not None and last.seq == expected[-1].seq if expected else last is None


# ---------------------------------------------------------------------------- the real services


ENDED_APPENDED = "ended-bomb-appended"      # an ended run with a 5,000-level line after its terminal event
ENDED_REPLACED = "ended-bomb-replaced"      # seq 4 replaced by a 5,000-level line
ENDED_GARBAGE = "ended-garbage-torn"        # seq 3 replaced by garbage, a line of another run, a torn tail
MIDDLE_BOMB = "middle-bomb"                 # a run in the middle (no terminal), a 1,500-level line in it
HOLES = {ENDED_APPENDED: [], ENDED_REPLACED: [[4, 4]], ENDED_GARBAGE: [[3, 3]], MIDDLE_BOMB: []}


def _write_journals(journal_dir: Path) -> dict[str, str]:
    journal_dir.mkdir(parents=True, exist_ok=True)
    ids = {}
    for name in HOLES:
        run_id = new_run_id() + "-" + name
        ids[name] = run_id
        evs = run_events(run_id, ended=name != MIDDLE_BOMB)
        lines = [line(ev) for ev in evs]
        if name == ENDED_APPENDED:
            lines.append(bomb_line(run_id, 7))
        elif name == ENDED_REPLACED:
            lines[3] = bomb_line(run_id, 4)
        elif name == ENDED_GARBAGE:
            lines[2] = b"\x00garbage{{{\n"
            lines.insert(3, line(Event(new_run_id("other-"), 3, TS, "nap", "log", "another run")))
            lines.append(b'{"run_id":"' + run_id.encode() + b'","seq":7,"ti')
        else:
            lines.insert(2, bomb_line(run_id, 3, 1500))
        journal_path(journal_dir, run_id).write_bytes(b"".join(lines))
    return ids


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Trio, dict[str, str]]]:
    """The trio started with hostile journals already in its journal directory."""
    t = make_trio(tmp_path_factory.mktemp("trio"))
    ids = _write_journals(t.journal_dir)
    t.start()  # all three must start (and /healthz be 200) with these journals present
    try:
        yield t, ids
    finally:
        t.stop()


def test_all_three_services_start_and_serve_with_poisoned_journals(poisoned: tuple[Trio, dict[str, str]]) -> None:
    trio, _ = poisoned
    assert_serving(trio)
    launch_and_finish(trio)


@pytest.mark.parametrize("name", [ENDED_APPENDED, ENDED_REPLACED, ENDED_GARBAGE])
def test_api_events_skip_bad_lines_and_report_gaps(poisoned: tuple[Trio, dict[str, str]], name: str) -> None:
    trio, ids = poisoned
    run_id = ids[name]
    status, headers, body = http_request(trio.ports.http, "GET", f"/api/runs/{run_id}/events")
    assert status == 200, (name, status, body[:500])
    doc = json.loads(body)
    seqs = [e["seq"] for e in doc["events"]]
    holes = [s for lo, hi in HOLES[name] for s in range(lo, hi + 1)]
    assert seqs == [s for s in range(1, 7) if s not in holes], (name, seqs)
    assert doc["gaps"] == HOLES[name], (name, doc["gaps"])
    status, _, body = http_request(trio.ports.http, "GET", f"/api/runs/{run_id}")
    assert status == 200 and json.loads(body)["status"] == "success", (name, status, body[:500])


async def _replay(url: str) -> tuple[list[dict[str, Any]], int | None]:
    frames: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, asyncio.timeout(REQUEST_TIMEOUT):
        async with http.ws_connect(url) as ws:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frames.append(json.loads(msg.data))
            return frames, ws.close_code


@pytest.mark.parametrize("name", [ENDED_APPENDED, ENDED_REPLACED, ENDED_GARBAGE])
def test_ws_replay_marks_holes_with_journal_gap_and_ends_with_1000(poisoned: tuple[Trio, dict[str, str]], name: str) -> None:
    trio, ids = poisoned
    run_id = ids[name]
    frames, code = asyncio.run(_replay(f"{trio.ws}/ws/events/{run_id}"))
    assert frames[0]["type"] == "hello", frames
    seqs = [e["seq"] for f in frames if f["type"] == "events" for e in f["events"]]
    gaps = [f["missing"] for f in frames if f["type"] == "error" and f.get("code") == "journal_gap"]
    holes = [s for lo, hi in HOLES[name] for s in range(lo, hi + 1)]
    assert seqs == [s for s in range(1, 7) if s not in holes], (name, frames)
    assert gaps == HOLES[name], (name, frames)
    assert code == 1000, (name, code, frames)


def test_a_run_in_the_middle_with_a_bomb_line_stays_readable(poisoned: tuple[Trio, dict[str, str]]) -> None:
    """A run without its terminal event, a 1,500-level line in it: its events stay readable around the
    bad line, and the services keep serving."""
    trio, ids = poisoned
    run_id = ids[MIDDLE_BOMB]
    status, _, body = http_request(trio.ports.http, "GET", f"/api/runs/{run_id}/events")
    assert status == 200, (status, body[:500])
    seqs = [e["seq"] for e in json.loads(body)["events"]]
    assert seqs[:4] == [1, 2, 3, 4], seqs
    assert_serving(trio)


@pytest.mark.parametrize("bad", ["bare-object-bomb", "unknown-field-bomb"])
def test_services_start_with_an_object_bomb_line_and_the_api_skips_it(tmp_path: Path, bad: str) -> None:
    """Objects nested 5,000 levels (a bare one, or as an unknown field of an event line) in an ended
    run's journal: all three services start, and /api/runs/{id}/events reports the hole."""
    trio = make_trio(tmp_path)
    run_id = new_run_id()
    lines = [line(ev) for ev in run_events(run_id)]
    lines[3] = json_bomb(5000, "dict") + b"\n" if bad == "bare-object-bomb" else unknown_field_bomb_line(run_id, 4)
    trio.journal_dir.mkdir(parents=True)
    journal_path(trio.journal_dir, run_id).write_bytes(b"".join(lines))
    try:
        trio.start()
        status, _, body = http_request(trio.ports.http, "GET", f"/api/runs/{run_id}/events")
        assert status == 200, (status, body[:500])
        doc = json.loads(body)
        assert [e["seq"] for e in doc["events"]] == [1, 2, 3, 5, 6] and doc["gaps"] == [[4, 4]], doc
        assert_serving(trio)
    finally:
        trio.stop()
