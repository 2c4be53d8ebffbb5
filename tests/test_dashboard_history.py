"""The dashboard's history view in a real browser (the OS's Chromium via Playwright) against the real
gateway: runs written to journals by the test are archived by the gateway at start, and the view
shows one bar per run (each a link to its run page), the success rate and the failing item."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from shared.config import load_settings
from shared.ids import new_run_id
from shared.journal import JournalWriter, begin_run
from tests.harness import Service, write_config
from tests.test_dashboard import (
    _screenshot,
    browser_page,  # noqa: F401  (the fixture)
)

TZ = ZoneInfo("America/Chicago")


def _run(journal_dir: Path, outcome: str) -> str:
    run_id = new_run_id()
    begin_run(journal_dir, run_id, TZ, "sleepy", {}, {"trigger": "manual"})
    with JournalWriter.open(journal_dir, run_id, TZ) as w:
        w.append("pipeline", "start", "started", {"runner": "test", "attempt": 1, "pid": os.getpid()})
        w.append("nap", "start", "nap started")
        w.append("nap", "start", "", {"item": "Q"})
        time.sleep(0.01)
        w.append("nap", outcome, "item done" if outcome == "success" else "item broke", {"item": "Q"})
        w.append("nap", outcome, "nap ended")
        w.append("pipeline", outcome, "done")
    return run_id


def test_history_view_charts_each_run_and_links_to_it(tmp_path: Path, services: list[Service], browser_page) -> None:  # noqa: F811
    cfg, ports = write_config(tmp_path)
    settings = load_settings(cfg)
    settings.journal_dir.mkdir(parents=True)
    ids = [_run(settings.journal_dir, outcome) for outcome in ("success", "failure", "success", "success")]
    gateway = Service("gateway_svc", cfg, tmp_path).start()
    services.append(gateway)
    gateway.wait_for(r"4 run\(s\) archived from journals")
    page = browser_page
    page.goto(f"http://127.0.0.1:{ports.http}/#/history/sleepy?since=24h")
    page.wait_for_selector("#hist-summary")
    assert re.search(r"4 runs: 3 success, 1 failure", page.inner_text("#hist-summary"))
    assert "75.0%" in page.inner_text("#hist-summary")
    bars = page.locator("a.hist-run")
    assert bars.count() == 4
    assert [bars.nth(i).get_attribute("data-run") for i in range(4)] == ids  # oldest first
    assert "item broke" in page.inner_text(".hist-items")
    _screenshot(page, "history.png")
    bars.nth(1).click()
    page.wait_for_function(f"location.hash === '#/runs/{ids[1]}'")
