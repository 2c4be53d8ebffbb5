"""The dashboard in a real browser: the OS's Chromium (/usr/bin/chromium, `make browser`) driven by
Playwright, against the services as real processes.

- The trio (scheduler, runner, gateway) with a small pipeline (a stage, a fan-out stage, a stage): the
  page shows no health strip, launches the pipeline from its form (after showing a 400 plainly),
  follows the run live, survives a gateway stop and restart while the run goes on, and ends with the
  terminal state; the events the page applied are then exactly the journal's, once each and in order.
  Schedules pause and resume from the page.
- The gateway alone with a token and a journal of 10,000 log lines written by the test (through
  shared.journal, as the runner would): the page shows the failed health checks (no scheduler, no
  runner) in the gateway's words, asks for the token once, shows the run, keeps the DOM small
  (virtualised log), and its filters keep stage events in view. Times are shown as the journal
  writes them (the config's zone, America/Chicago), not in the browser's (set to Asia/Tokyo here).
- The gateway alone with a journal that has a corrupt line (written by the test): the page marks the hole
  in the log and in a banner, and shows every other event, without reconnecting for ever.
- Every non-ASCII character the page's files use has a glyph in DejaVu Sans (what a stock Debian
  Chromium renders with; fontconfig-config depends on fonts-dejavu-core): no missing-glyph boxes.

Screenshots go to test-artifacts/ in the repo root (gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from shared.config import load_settings
from shared.ids import new_run_id
from shared.journal import JournalReader, JournalWriter, begin_run, journal_path
from tests.harness import REPO, Service, write_config

STATIC = REPO / "gateway_svc" / "static"
# far from the config's zone (America/Chicago), so a time converted to the browser's zone shows
BROWSER_TZ = "Asia/Tokyo"

ARTIFACTS = REPO / "test-artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]

DASH_PIPELINE = """
[pipelines.dash]
description = "dashboard test: prepare, a fan-out over items, publish"
[pipelines.dash.params.items]
type = "list"
default = ["a", "b", "c"]
choices = ["a", "b", "c", "d"]
description = "items the crunch stage fans out over"
[pipelines.dash.params.pause]
type = "float"
default = 0.3
description = "seconds between printed lines"
[pipelines.dash.params.tag]
type = "str"
default = "t"
pattern = "^[a-z]+$"
description = "lower-case letters"
[[pipelines.dash.stages]]
name = "prepare"
command = ["{python}", "-c", "import sys,time\\nfor i in range(8):\\n    print('prepare line %d tag=%s' % (i, sys.argv[2]), flush=True); time.sleep(float(sys.argv[1]))", "{pause}", "{tag}"]
timeout = 60
progress_interval = 0.5
[[pipelines.dash.stages]]
name = "crunch"
fan_out = "items"
max_parallel = 2
command = ["{python}", "-c", "import sys,time\\nfor i in range(3):\\n    print('crunch %s step %d' % (sys.argv[1], i), flush=True); time.sleep(float(sys.argv[2]))", "{item}", "{pause}"]
timeout = 60
progress_interval = 0.5
[[pipelines.dash.stages]]
name = "publish"
command = ["{python}", "-c", "print('published', flush=True)"]
timeout = 60

[schedules.dash-daily]
pipeline = "dash"
every = "1d"
"""


def _chromium() -> str:
    path = os.environ.get("RUNWIRE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium not found (install it with `make browser`, or set RUNWIRE_CHROMIUM)")
    return path


@pytest.fixture
def browser_page() -> Iterator:
    """A Chromium page; uncaught page errors and 404s fail the test."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, timezone_id=BROWSER_TZ)
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda e: errors.append(str(e)))
            # a missing asset or route shows as a console 404 (refused connections while the gateway
            # restarts and the 401 before the token is entered are expected, and not counted)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and " 404 " in m.text else None)
            yield page
        finally:
            browser.close()
    assert not errors, f"errors in the page: {errors}"


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _page_events(page, run_id: str) -> list[list]:
    """The events in the run page's log (journal-gap marks left out)."""
    return page.evaluate(
        "id => (window.__runwire.runLogs.get(id)?.events ?? []).filter(e => !e.gap).map(e => [e.seq, e.stage, e.event])", run_id)


def _wall(ts: str, millis: bool = False) -> str:
    """The wall-clock part of an RFC 3339 timestamp as written: "2026-11-23T03:15:00.123456-06:00" -> "03:15:00"."""
    return ts[11:23] if millis else ts[11:19]


def _zone(ts: str) -> str:
    offset = ts[-6:]
    return "UTC" if ts.endswith("Z") or offset == "+00:00" else f"UTC{offset}"


def _dejavu_sans_charset() -> set[int]:
    """The code points DejaVu Sans has glyphs for, as fontconfig reads them."""
    font = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans"], capture_output=True, text=True, check=True).stdout
    if "DejaVuSans" not in font:
        pytest.fail(f"DejaVu Sans is not installed (fc-match gave {font!r}): apt-get install fonts-dejavu-core")
    ranges = subprocess.run(["fc-query", "-f", "%{charset}", font], capture_output=True, text=True, check=True).stdout
    points: set[int] = set()
    for part in ranges.split():
        lo, _, hi = part.partition("-")
        points.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    assert len(points) > 3000, ranges[:200]
    return points


def _finished_run(journal_dir: Path, tz: ZoneInfo, logs: int, outcome: str, msg: str, log_text: str) -> str:
    """A finished run of `logs` log lines in one stage, written the way the runner writes (the journal's
    own writer); returns its id."""
    run_id = new_run_id()
    begin_run(journal_dir, run_id, tz, "dash", {"items": ["a"]}, {"trigger": "manual"})
    with JournalWriter.open(journal_dir, run_id, tz) as w:
        w.append("pipeline", "start", "started", {"runner": "test", "attempt": 1, "pid": os.getpid()})
        w.append("prepare", "start", "prepare started")
        for i in range(logs):
            w.append("prepare", "log", f"{log_text} {i}")
        w.append("prepare", "success", "prepare done")
        w.append("pipeline", outcome, msg)
    return run_id


def test_every_glyph_the_page_uses_is_in_dejavu_sans() -> None:
    have = _dejavu_sans_charset()
    assert ord("⏸") not in have  # the glyph that showed as a box: the check can fail
    missing = []
    for path in sorted(STATIC.iterdir()):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for ch in set(re.findall(r"[^\x00-\x7f]", line)):
                if ord(ch) not in have:
                    missing.append(f"{path.name}:{lineno}: {ch} U+{ord(ch):04X} {unicodedata.name(ch, '?')}")
    assert not missing, "glyphs a stock Debian Chromium shows as boxes:\n" + "\n".join(missing)


@pytest.mark.timeout(240)
def test_dashboard_launches_and_follows_a_run_across_a_gateway_restart(tmp_path: Path, services: list[Service], browser_page) -> None:
    page = browser_page
    cfg, ports = write_config(tmp_path, DASH_PIPELINE)
    settings = load_settings(cfg)
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    gateway = services[-1]
    base = f"http://127.0.0.1:{ports.http}"

    page.goto(base + "/")
    page.wait_for_selector('#launch-pipeline option[value="dash"]', state="attached")
    # all three services up: /healthz passes and the page shows no health strip
    page.wait_for_function("() => window.__runwire.health.status === 'ok'", timeout=30_000)
    assert page.is_hidden("#health")
    page.wait_for_selector('.field[data-param="tag"] input')

    # a bad parameter: the server's 400 message, shown plainly in the form
    page.fill('.field[data-param="tag"] input', "Not Lower")
    page.click("#launch-submit")
    error = page.wait_for_selector(".form-error:not([hidden])")
    assert "400" in error.inner_text() and "tag" in error.inner_text(), error.inner_text()
    assert "#/runs/" not in page.url

    # a good launch: the page goes to the run's page
    page.fill('.field[data-param="tag"] input', "ok")
    page.fill('.field[data-param="pause"] input', "0.35")
    page.click("#launch-submit")
    page.wait_for_url("**/#/runs/*")
    run_id = page.url.rsplit("/", 1)[1]
    jpath = journal_path(settings.journal_dir, run_id)
    assert jpath.exists(), f"the page shows run {run_id} but there is no journal {jpath}"

    # the run goes live on the page: its first stage is running
    page.wait_for_selector('.tl-row[data-name="prepare"][data-status="running"]')
    page.wait_for_selector('[data-stream="this run"][data-state="live"]', state="attached")

    # the gateway goes away while the run goes on, and comes back on the same port
    gateway.stop()
    seq_at_stop = len(JournalReader(jpath).read())
    page.wait_for_selector('[data-stream="this run"][data-state="reconnecting"]', state="attached")
    page.wait_for_selector('[data-stream="runs"][data-state="reconnecting"]', state="attached")
    deadline = time.monotonic() + 10
    while len(JournalReader(jpath).read()) <= seq_at_stop + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    seq_while_down = len(JournalReader(jpath).read())
    assert seq_while_down > seq_at_stop, "the run wrote nothing while the gateway was down: the test proves no resume"
    services[-1] = Service("gateway_svc", cfg, tmp_path).start()

    # it resumes and follows the run to its end
    page.wait_for_selector('.run-status .badge.st-success', timeout=90_000)
    page.wait_for_selector('[data-stream="this run"][data-state="complete"]', state="attached")
    # the all-runs stream is live again too, within a moment of the run's stream: once one stream of the
    # page reached the gateway, the others retry at once, whatever their jittered backoff
    page.wait_for_selector('[data-stream="runs"][data-state="live"]', state="attached", timeout=10_000)

    journal = [[ev.seq, ev.stage, ev.event] for ev in JournalReader(jpath).read()]
    assert journal[-1][1:] == ["pipeline", "success"], journal[-5:]
    assert len(journal) > seq_while_down
    # every event of the journal exactly once, in order: what the page applied and what it received
    assert _page_events(page, run_id) == journal
    assert page.evaluate("id => window.__runwire.eventsFor(id)", run_id) == [e[0] for e in journal]
    received = page.evaluate("id => window.__runwire.receivedFor(id)", run_id)
    assert sorted(received) == [e[0] for e in journal], "an event came twice or never: the resume position (after_seq) or the gateway is wrong"
    assert page.get_attribute("#log-count", "data-count") == str(len(journal))

    # the connection history shows the resume, for the run's stream and the all-runs stream
    history = page.evaluate("() => window.__runwire.conn.history")
    for stream in ("run", "all"):
        states = [h["state"] for h in history if h["stream"] == stream]
        assert "reconnecting" in states, (stream, states)
        after = states[len(states) - 1 - states[::-1].index("reconnecting"):]
        assert "live" in after, (stream, states)

    # the timeline: every stage and item ended in success, items under their stage
    rows = page.eval_on_selector_all(".tl-row", "els => els.map(e => [e.dataset.kind, e.dataset.name, e.dataset.status])")
    assert rows[0] == ["run", "run", "success"], rows
    assert [r for r in rows if r[0] == "stage"] == [["stage", n, "success"] for n in ("prepare", "crunch", "publish")], rows
    kinds = [r[0] for r in rows]
    assert kinds == ["run", "stage", "stage", "item", "item", "item", "stage"], rows  # items under their stage
    assert sorted(r[1:] for r in rows if r[0] == "item") == [["a", "success"], ["b", "success"], ["c", "success"]], rows
    # the stage-events lane holds every non-log, non-metric event of the journal
    milestones = [e for e in journal if e[2] not in ("log", "metric")]
    assert page.evaluate(f"() => window.__runwire.runLogs.get({run_id!r}).milestones.length") == len(milestones)
    # latest metrics: a card for every stage that published metrics
    metric_stages = sorted({e[1] for e in journal if e[2] == "metric"})
    cards = sorted(page.eval_on_selector_all(".metric-stage", "els => els.map(e => e.dataset.stage)"))
    assert cards == metric_stages
    # the log filters: only stage events, then a text search
    page.click('.chip[data-kind="log"]')
    page.click('.chip[data-kind="metric"]')
    page.wait_for_function(f"() => document.querySelector('#log-count').textContent.startsWith('{len(milestones)} of')")
    page.click('.chip[data-kind="log"]')
    page.click('.chip[data-kind="metric"]')
    page.fill("#log-text", "prepare line 7")
    page.wait_for_function("() => document.querySelector('#log-count').textContent.startsWith('1 of')")
    page.fill("#log-text", "")
    page.wait_for_function(f"() => document.querySelector('#log-count').textContent === '{len(journal)} events'")
    shot = _screenshot(page, "dashboard-run.png")
    assert shot.stat().st_size > 10_000

    # a second run, cancelled from its page while it runs
    page.click("a.back")
    page.wait_for_selector(f'#runs-table tr[data-run-id="{run_id}"][data-status="success"]')
    page.fill('.field[data-param="pause"] input', "5")
    page.click("#launch-submit")
    page.wait_for_url(lambda url: "#/runs/" in url and not url.endswith(run_id))
    second = page.url.rsplit("/", 1)[1]
    page.wait_for_selector('.tl-row[data-name="prepare"][data-status="running"]')
    page.click(".run-head button.btn-danger")
    page.wait_for_selector(".run-status .badge.st-cancelled", timeout=60_000)
    page.wait_for_selector('[data-stream="this run"][data-state="complete"]', state="attached")
    second_journal = [[ev.seq, ev.stage, ev.event] for ev in JournalReader(journal_path(settings.journal_dir, second)).read()]
    assert second_journal[-1][1:] == ["pipeline", "cancelled"], second_journal[-3:]
    assert _page_events(page, second) == second_journal

    # the run list: newest first, live statuses, filters by status and pipeline
    page.click("a.back")
    page.wait_for_selector(f'#runs-table tr[data-run-id="{second}"][data-status="cancelled"]')
    row = page.wait_for_selector(f'#runs-table tr[data-run-id="{run_id}"][data-status="success"]')
    assert "manual" in row.inner_text() and "dash" in row.inner_text()
    assert page.eval_on_selector_all("#runs-table tbody tr", "trs => trs.map(tr => tr.dataset.runId)") == [second, run_id]
    page.select_option("#filter-status", "success")
    page.wait_for_function("() => document.querySelectorAll('#runs-table tbody tr').length === 1")
    assert page.eval_on_selector("#runs-table tbody tr", "tr => tr.dataset.runId") == run_id
    page.select_option("#filter-status", "")
    page.select_option("#filter-pipeline", "dash")
    page.wait_for_function("() => document.querySelectorAll('#runs-table tbody tr').length === 2")

    # the schedule pauses and resumes from the page (the scheduler's state, read back)
    sched = page.wait_for_selector('li[data-schedule="dash-daily"][data-enabled="true"]')
    sched.query_selector("button").click()
    page.wait_for_selector('li[data-schedule="dash-daily"][data-enabled="false"]')
    # the paused badge: its icon is drawn (two bars), not a glyph, and it says so in words
    paused = page.wait_for_selector('li[data-schedule="dash-daily"] .badge .icon-pause')
    box = paused.bounding_box()
    assert box and box["width"] > 3 and box["height"] > 3, box
    assert page.inner_text('li[data-schedule="dash-daily"] .badge').strip() == "paused"
    _screenshot(page, "dashboard-paused.png")
    page.click('li[data-schedule="dash-daily"] button')
    page.wait_for_selector('li[data-schedule="dash-daily"][data-enabled="true"]')
    _screenshot(page, "dashboard-home.png")


@pytest.mark.timeout(120)
def test_dashboard_with_a_token_and_ten_thousand_events(tmp_path: Path, services: list[Service], browser_page) -> None:
    page = browser_page
    token = "s3cret-dashboard-token"
    cfg, ports = write_config(tmp_path, DASH_PIPELINE)
    settings = load_settings(cfg)
    tz = ZoneInfo("America/Chicago")
    run_id = _finished_run(settings.journal_dir, tz, 10_000, "failure", "stopped on purpose by the test", "bulk line")
    total = len(JournalReader(journal_path(settings.journal_dir, run_id)).read())

    services.append(Service("gateway_svc", cfg, tmp_path, env={"RUNWIRE_TOKEN": token}).start())
    page.goto(f"http://127.0.0.1:{ports.http}/")
    # the API says 401: the page asks once, then sends the token (header for fetch, ?token= for the socket)
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-dialog input", token)
    page.click("#token-dialog button[type=submit]")
    page.wait_for_selector(f'#runs-table tr[data-run-id="{run_id}"][data-status="failure"]')
    page.wait_for_selector('[data-stream="runs"][data-state="live"]', state="attached")
    # the gateway alone: no scheduler answers, no runner heartbeat, and the page says so in the gateway's words
    strip = page.wait_for_selector('#health:not([hidden])')
    page.wait_for_selector('#health li[data-check="scheduler"]')
    page.wait_for_selector('#health li[data-check="runner"]')
    assert "not reachable" in strip.inner_text(), strip.inner_text()
    assert page.evaluate("() => localStorage.getItem('runwire.token')") == token
    # times as the journal writes them (Chicago), not the browser's zone (Tokyo), and the zone said
    events = JournalReader(journal_path(settings.journal_dir, run_id)).read()
    started_at = events[1].timestamp
    assert page.evaluate("() => new Date().getTimezoneOffset()") == -9 * 60  # the browser is in Tokyo
    started_cell = page.inner_text(f'#runs-table tr[data-run-id="{run_id}"] td:nth-child(5)')
    assert _wall(started_at)[:5] in started_cell, (started_cell, started_at)
    assert page.inner_text("#runs-zone") == f"({_zone(started_at)})"

    page.click(f'#runs-table tr[data-run-id="{run_id}"] a')
    page.wait_for_function(f"() => document.querySelector('#log-count')?.dataset.count === '{total}'", timeout=60_000)
    page.wait_for_selector('[data-stream="this run"][data-state="complete"]', state="attached")
    assert page.evaluate("id => window.__runwire.eventsFor(id)", run_id) == list(range(1, total + 1))
    assert page.inner_text("#log-zone") == f"times in {_zone(started_at)}"
    assert page.inner_text('dd[data-fact="times in"]') == _zone(started_at)
    assert _wall(started_at)[:5] in page.inner_text('dd[data-fact="started"]')
    # virtualised: a screenful of rows in the DOM, not ten thousand
    rows = page.evaluate("() => document.querySelectorAll('#log .vl-row').length")
    assert 0 < rows < 200, rows
    # the newest event is in view (the log follows its tail), the stage events stay in their own lane
    page.wait_for_selector(f'#log .vl-row[data-seq="{total}"]')
    # each row's time is the event's own wall clock, with milliseconds
    assert page.inner_text(f'#log .vl-row[data-seq="{total}"] .ev-time') == _wall(events[-1].timestamp, millis=True)
    lane = page.eval_on_selector_all("#stage-events .vl-row:not([hidden])", "els => els.map(e => e.dataset.seq)")
    assert lane == ["1", "2", "3", str(total - 1), str(total)]
    # the run's failure message is shown plainly
    assert "stopped on purpose by the test" in page.inner_text(".run-head")
    page.click('.chip[data-kind="log"]')
    page.wait_for_function(f"() => document.querySelector('#log-count').textContent === '5 of {total:,} events'")
    # scrolling to the top of the full log shows the first lines (the DOM still small)
    page.click('.chip[data-kind="log"]')
    # the list has grown back (the tail rendered again) before we scroll: scrolling a list that has not
    # re-rendered yet is a no-op, and follow mode then rightly keeps the tail in view
    page.wait_for_selector(f'#log .vl-row[data-seq="{total}"]')
    page.eval_on_selector("#log", "el => { el.scrollTop = 0; }")
    page.wait_for_selector('#log .vl-row[data-seq="1"]')
    assert page.evaluate("() => document.querySelectorAll('#log .vl-row').length") < 200
    _screenshot(page, "dashboard-10k.png")

    # a cursor the gateway cannot serve: the page says so plainly (recovered: false and the reason)
    page.evaluate("() => { window.__runwire.store.cursor = 'not-a-cursor'; window.__runwire.streams.all.restart('test'); }")
    page.wait_for_selector('[data-stream="runs"].conn-gap', state="attached")
    banner = page.wait_for_selector("#banner:not([hidden])")
    assert "gap" in banner.inner_text(), banner.inner_text()
    history = page.evaluate("() => window.__runwire.conn.history")
    unrecovered = [h for h in history if h["stream"] == "all" and h.get("recovered") is False]
    assert unrecovered and unrecovered[-1]["reason"], history
    assert unrecovered[-1]["reason"] in banner.inner_text()
    _screenshot(page, "dashboard-gap.png")


@pytest.mark.timeout(120)
def test_dashboard_marks_a_hole_in_the_journal_and_goes_on(tmp_path: Path, services: list[Service], browser_page) -> None:
    """A journal whose 5th line is corrupt (damaged by the test after writing it through shared.journal):
    the run page shows the hole (a banner, and a mark in the log between events 4 and 6), every other
    event once, and the stream ends complete instead of reconnecting to refill a hole nobody can fill."""
    page = browser_page
    cfg, ports = write_config(tmp_path, DASH_PIPELINE)
    settings = load_settings(cfg)
    tz = ZoneInfo("America/Chicago")
    run_id = _finished_run(settings.journal_dir, tz, 8, "success", "done", "line")
    jpath = journal_path(settings.journal_dir, run_id)
    lines = jpath.read_bytes().splitlines(keepends=True)
    assert b'"seq":5' in lines[4].replace(b" ", b""), lines[4]
    lines[4] = b'{"seq": 5, "this line was damaged on disk\n'
    jpath.write_bytes(b"".join(lines))
    kept = [ev.seq for ev in JournalReader(jpath).read()]
    assert kept == [s for s in range(1, len(lines) + 1) if s != 5], kept

    services.append(Service("gateway_svc", cfg, tmp_path).start())
    page.goto(f"http://127.0.0.1:{ports.http}/#/runs/{run_id}")
    page.wait_for_selector('[data-stream="this run"][data-state="complete"]', state="attached", timeout=60_000)
    page.wait_for_selector(".run-status .badge.st-success")
    assert page.evaluate("id => window.__runwire.eventsFor(id)", run_id) == kept
    assert _page_events(page, run_id) == [[ev.seq, ev.stage, ev.event] for ev in JournalReader(jpath).read()]
    # the hole, plainly: a banner, and a mark in the log where it is (after event 4, before event 6)
    banner = page.wait_for_selector("#journal-gap:not([hidden])")
    assert "event 5" in banner.inner_text(), banner.inner_text()
    mark = page.wait_for_selector('#log .vl-row[data-gap="5-5"]')
    assert "events 5–5" in mark.inner_text(), mark.inner_text()
    order = page.eval_on_selector_all("#log .vl-row:not([hidden])", "els => els.map(e => [Number(e.style.transform.match(/[\\d.]+/)[0]), e.dataset.seq || 'gap'])")
    shown = [label for _, label in sorted(order)]
    assert shown[3:6] == ["4", "gap", "6"], shown
    page.wait_for_selector('#stage-events .vl-row[data-gap="5-5"]')
    assert page.get_attribute("#log-count", "data-count") == str(len(kept))
    # the mark stays in view whatever the filters
    page.click('.chip[data-kind="log"]')
    page.wait_for_selector('#log .vl-row[data-gap="5-5"]')
    page.click('.chip[data-kind="log"]')
    if any("journal_gap" in f.read_text() for f in (REPO / "gateway_svc").glob("*.py")):
        # the gateway reports the hole (journal_gap frame): the page never needed to reconnect for it
        gaps = page.evaluate(f"() => window.__runwire.runLogs.get({run_id!r}).gaps")
        assert gaps == [], gaps
        # (queried again: the virtual list recycles row elements, a handle may now hold another row)
        text = page.inner_text('#log .vl-row[data-gap="5-5"]')
        assert "events 5–5 missing from the journal" in text, text
    _screenshot(page, "dashboard-journal-gap.png")
