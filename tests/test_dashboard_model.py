"""The dashboard's logic without its rendering, in the real browser (the OS's Chromium via Playwright),
its modules imported from the real gateway: protocol.js holds shared/protocol.py's table and
classifies codes as it does; the reconnect backoff has full jitter; the run page's model (runlog.js)
applies events exactly once, reconnects at a gap and marks a hole that stays; timers stop while the
page is hidden; when one stream reaches the gateway, a stream of the page waiting in a long backoff
retries at once; a WebSocket refused at the handshake for want of a token is recognised as such (the
stream asks for the token, then goes live); and a run page lets go of its model when it is left."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared import protocol as p
from shared.config import load_settings
from shared.ids import new_run_id
from shared.journal import JournalWriter, begin_run
from tests.harness import Service, write_config
from tests.test_dashboard import browser_page  # noqa: F401  (the fixture)

TZ = ZoneInfo("America/Chicago")
TOKEN = "model-test-token"


@pytest.fixture
def gateway(tmp_path: Path, services: list[Service]) -> tuple[str, str]:
    """A gateway with a token and one finished run; (base URL, run id)."""
    cfg, ports = write_config(tmp_path)
    settings = load_settings(cfg)
    settings.journal_dir.mkdir(parents=True)
    run_id = new_run_id()
    begin_run(settings.journal_dir, run_id, TZ, "sleepy", {}, {"trigger": "manual"})
    with JournalWriter.open(settings.journal_dir, run_id, TZ) as w:
        w.append("pipeline", "start", "started", {"runner": "test", "attempt": 1, "pid": os.getpid()})
        for i in range(50):
            w.append("nap", "log", f"line {i}")
        w.append("pipeline", "success", "done")
    services.append(Service("gateway_svc", cfg, tmp_path, env={"RUNWIRE_TOKEN": TOKEN}).start())
    return f"http://127.0.0.1:{ports.http}", run_id


def _module_page(page: Any, base: str) -> Any:
    """A page of the gateway's origin without the app, to import the modules into (its favicon, which
    the gateway does not serve, answered here)."""
    page.route("**/favicon.ico", lambda route: route.fulfill(status=204))
    page.goto(base + "/healthz")
    return page


def test_protocol_js_is_the_python_table_and_classifies_codes_alike(gateway: tuple[str, str], browser_page: Any) -> None:  # noqa: F811
    page = _module_page(browser_page, gateway[0])
    codes = sorted({*map(int, p.CloseCode), 1005, 1006, 1011, 1012, 1013, 4000, 4401})
    errors = [str(e) for e in p.ErrorCode] + ["from_the_future"]
    got = page.evaluate("""async ([codes, errors]) => {
        const m = await import("/static/protocol.js");
        return { table: m.PROTOCOL,
                 retryable: codes.filter(m.closeIsRetryable), fatal: codes.filter(m.closeIsFatal),
                 fatalErrors: errors.filter(m.errorIsFatal),
                 unknownType: m.parseFrame('{"type":"surprise"}'), hello: m.parseFrame('{"type":"hello","cursor":"1"}') };
    }""", [codes, errors])
    assert got["table"] == p.protocol_table()
    assert got["retryable"] == [c for c in codes if c in p.RETRYABLE_CLOSES]
    assert got["fatal"] == [c for c in codes if c in p.FATAL_CLOSES]
    assert got["fatalErrors"] == [e for e in errors if e not in p.NON_FATAL_ERRORS]
    assert got["unknownType"] is None and got["hello"]["cursor"] == "1"


def test_reconnect_backoff_has_full_jitter(gateway: tuple[str, str], browser_page: Any) -> None:  # noqa: F811
    page = _module_page(browser_page, gateway[0])
    got = page.evaluate("""async () => {
        const { backoffDelay } = await import("/static/stream.js");
        const at = (r) => [0, 1, 2, 3, 4, 5, 8].map((a) => backoffDelay(a, () => r));
        return { low: at(0), mid: at(0.5), high: at(0.999) };
    }""")
    caps = [500, 1000, 2000, 4000, 8000, 15000, 15000]
    assert got["low"] == [0] * 7  # full jitter: as low as no wait at all (equal jitter would be cap / 2)
    assert got["mid"] == [c / 2 for c in caps]
    assert all(c * 0.99 < h < c for h, c in zip(got["high"], caps, strict=True))


def test_the_run_model_applies_once_reconnects_at_a_gap_and_marks_a_hole(gateway: tuple[str, str], browser_page: Any) -> None:  # noqa: F811
    page = _module_page(browser_page, gateway[0])
    got = page.evaluate("""async () => {
        const { RunLog, GAP_RETRIES } = await import("/static/runlog.js");
        const ts = "2026-11-23T03:15:00.000000-06:00";
        const ev = (seq, stage = "s", event = "log", msg = "") => ({ run_id: "r1", seq, timestamp: ts, stage, event, msg: msg || `line ${seq}` });
        const m = new RunLog("r1");
        const out = {};
        const tag = (i) => (m.events[i].gap ? `gap${m.events[i].gap[0]}` : m.events[i].seq);
        out.first = m.receive([ev(1, "pipeline", "queued"), ev(2, "pipeline", "start"), ev(3, "a", "start"), ev(3), ev(2)]);
        out.afterDup = [m.appliedSeqs.slice(), m.duplicates, m.run.status, [...m.stageNames]];
        out.other = m.receive([{ ...ev(4), run_id: "r2" }]).restart;  // another run's event: not ours
        out.gap = m.receive([ev(6), ev(7)]).restart;  // 4..5 missing: reconnect from 3, apply nothing
        out.afterGap = [m.lastSeq, m.appliedSeqs.length];
        for (let i = 0; i < GAP_RETRIES - 1; i++) m.receive([ev(6)]);
        const last = m.receive([ev(6), ev(7, "b", "metric")]);  // the same hole again: shown, not looped on
        out.stays = [last.restart, m.appliedSeqs.slice(), m.journalGaps.slice(), m.events.filter((e) => e.gap).length, last.newStages];
        // a hole reported by the gateway (its run's `gaps`) after later events are shown: marked at its place
        out.isNew = [m.noteJournalGap([5, 5], "corrupt line"), m.noteJournalGap([5, 5], "again")];
        out.order = m.events.map((_, i) => tag(i));
        out.milestones = m.milestones.map((i) => m.events[i].gap ? "gap" : m.events[i].event);
        m.setFilters({ kinds: new Set(["metric"]) });
        out.metricOnly = [m.filtered.map(tag), m.counts()];
        m.clearFilters();
        m.setFilters({ text: "line 3" });
        out.text = m.filtered.map(tag);
        out.gapText = m.gapText();
        m.release();
        out.released = [m.events.length, m.appliedSeqs.length, m.released];
        return out;
    }""")
    assert got["first"] == {"restart": None, "newStages": ["a"]}  # the second seq 3 is a duplicate
    assert got["afterDup"] == [[1, 2, 3], 2, "running", ["a"]]
    assert got["other"] is None
    assert got["gap"] == "gap: seq 4..5 missing" and got["afterGap"] == [3, 3]
    restart, applied, holes, marks, new_stages = got["stays"]
    assert restart is None and applied == [1, 2, 3, 6, 7] and holes == [[4, 5]] and marks == 1 and new_stages == ["s", "b"]
    assert got["isNew"] == [True, False]
    assert got["order"] == [1, 2, 3, "gap4", "gap5", 6, 7]
    assert got["milestones"] == ["queued", "start", "start", "gap", "gap"]
    assert got["metricOnly"] == [["gap4", "gap5", 7], {"total": 5, "passing": 1}]  # holes stay in view
    assert got["text"] == [3, "gap4", "gap5"]
    assert "events 4–5" in got["gapText"] and "event 5," not in got["gapText"] and "event 5 " in got["gapText"]
    assert got["released"] == [0, 0, True]


def test_timers_stop_while_the_page_is_hidden(gateway: tuple[str, str], browser_page: Any) -> None:  # noqa: F811
    page = _module_page(browser_page, gateway[0])
    page.evaluate("""async () => {
        const { everyWhileVisible } = await import("/static/visible.js");
        const doc = new EventTarget();
        doc.hidden = false;
        window.__t = { doc, calls: 0 };
        window.__t.stop = everyWhileVisible(() => { window.__t.calls++; }, 10, doc);
    }""")
    page.wait_for_function("() => window.__t.calls >= 3")
    frozen = page.evaluate("() => { window.__t.doc.hidden = true; window.__t.doc.dispatchEvent(new Event('visibilitychange')); return window.__t.calls; }")
    page.wait_for_timeout(300)  # 30 intervals' worth: none of them may run
    assert page.evaluate("() => window.__t.calls") == frozen
    # shown again: the work runs at once (the view catches up), then on its interval
    shown = page.evaluate("() => { window.__t.doc.hidden = false; window.__t.doc.dispatchEvent(new Event('visibilitychange')); return window.__t.calls; }")
    assert shown == frozen + 1
    page.wait_for_function(f"() => window.__t.calls >= {shown + 2}")
    stopped = page.evaluate("() => { window.__t.stop(); window.__t.doc.dispatchEvent(new Event('visibilitychange')); return window.__t.calls; }")
    page.wait_for_timeout(100)
    assert page.evaluate("() => window.__t.calls") == stopped


def test_a_websocket_refused_for_its_token_asks_for_one_and_a_left_run_page_lets_go(gateway: tuple[str, str], browser_page: Any) -> None:  # noqa: F811
    base, run_id = gateway
    page = browser_page
    page.goto(base + "/")
    page.wait_for_selector("#token-dialog[open]")
    # a stream of its own, started while no token is known: its handshake is refused with 401, which
    # the browser shows as a bare close (1006); the stream must find out it is the token
    page.evaluate("""async () => {
        const { Stream, refusedForToken } = await import("/static/stream.js");
        window.__s = { states: [], probe: await refusedForToken(`ws://${location.host}/ws/events`) };
        const s = new Stream({ name: "probe", path: () => "/ws/events", onHello: () => {}, onEvents: () => {},
                               onState: (state, d) => window.__s.states.push([state, d.reason || ""]) });
        window.__s.stream = s;
        s.start();
    }""")
    page.wait_for_function("() => window.__s.states.some(([s, r]) => s === 'reconnecting' && r === 'token needed')")
    assert page.evaluate("() => window.__s.probe") is True
    page.fill("#token-dialog input", TOKEN)
    page.click("#token-dialog button[type=submit]")
    page.wait_for_function("() => window.__s.states.some(([s]) => s === 'live')")
    assert page.evaluate(f"() => import('/static/stream.js').then((m) => m.refusedForToken(`ws://${{location.host}}/ws/events?token={TOKEN}`))") is False
    page.evaluate("() => window.__s.stream.stop()")

    # a run page holds its model while shown, and lets go of it when left
    page.goto(f"{base}/#/runs/{run_id}")
    page.wait_for_selector('[data-stream="this run"][data-state="complete"]', state="attached")
    assert page.evaluate(f"() => window.__runwire.eventsFor({run_id!r}).length") == 53
    page.evaluate(f"() => {{ window.__kept = window.__runwire.runLogs.get({run_id!r}); }}")
    page.click("a.back")
    page.wait_for_selector(f'#runs-table tr[data-run-id="{run_id}"]')
    assert page.evaluate("() => [window.__runwire.runLogs.size, window.__kept.events.length, window.__kept.released]") == [0, 0, True]


def test_a_stream_in_a_long_backoff_retries_at_once_when_another_reaches_the_gateway(gateway: tuple[str, str], browser_page: Any) -> None:  # noqa: F811
    base, _ = gateway
    page = _module_page(browser_page, base)
    # stream A's first connection is refused (a port nobody listens on: the gateway away), and its next try is
    # drawn at the top of a 15 s backoff; stream B then reaches the gateway, and A must not wait 15 s
    page.evaluate(f"""async () => {{
        const {{ Stream }} = await import("/static/stream.js");
        Math.random = () => 0.999;
        const token = "{TOKEN}";
        window.__a = {{ states: [], paths: 0 }};
        const a = new Stream({{ name: "a", onHello: () => {{}}, onEvents: () => {{}},
            path: () => "/ws/events?token=" + token,
            onState: (state, d) => window.__a.states.push([state, d.retryAt ? d.retryAt - Date.now() : 0]) }});
        a.attempt = 6;
        const url = a._url.bind(a);
        a._url = () => (window.__a.paths++ === 0 ? "ws://127.0.0.1:9/ws/events" : url());
        window.__a.stream = a;
        a.start();
    }}""")
    page.wait_for_function("() => window.__a.states.some(([s, wait]) => s === 'reconnecting' && wait > 10000)")
    page.evaluate(f"""async () => {{
        const {{ Stream }} = await import("/static/stream.js");
        const b = new Stream({{ name: "b", path: () => "/ws/events?token={TOKEN}", onHello: () => {{}}, onEvents: () => {{}},
                                onState: (state) => {{ if (state === "live") window.__bLive = true; }} }});
        window.__b = b;
        b.start();
    }}""")
    page.wait_for_function("() => window.__bLive === true", timeout=5_000)
    page.wait_for_function("() => window.__a.states.some(([s]) => s === 'live')", timeout=5_000)
    assert page.evaluate("() => window.__a.paths") == 2
    page.evaluate("() => { window.__a.stream.stop(); window.__b.stop(); }")
