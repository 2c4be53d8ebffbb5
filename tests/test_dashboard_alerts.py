"""The run page's alert lines (gateway_svc/static/runalerts.js) in a real browser (the OS's Chromium via
Playwright, as tests/test_dashboard.py): a run whose alert log (written by the test through
shared.alertlog, as the scheduler writes it) holds a delivery sent on its second attempt and one still
retrying shows both, in the gateway's words, and a new attempt appears without reloading the page."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

from shared.alertlog import AlertAttempt, append_attempt
from shared.config import load_settings
from tests.harness import Service, write_config
from tests.test_dashboard import DASH_PIPELINE, _finished_run, _screenshot, browser_page  # noqa: F401 (a fixture)


def _attempt(run_id: str, alert: str, n: int, status: int | None, error: str | None, outcome: str) -> AlertAttempt:
    return AlertAttempt(id=f"{run_id}.{alert}.failure", alert=alert, kind="failure", attempt=n,
                        time=f"2026-01-01T00:00:0{n}+00:00", status=status, error=error, outcome=outcome)  # type: ignore[arg-type]


def test_the_run_page_shows_its_alerts(tmp_path: Path, services: list[Service], browser_page) -> None:  # noqa: F811
    page = browser_page
    cfg, ports = write_config(tmp_path, DASH_PIPELINE)
    settings = load_settings(cfg)
    run_id = _finished_run(settings.journal_dir, ZoneInfo("America/Chicago"), 2, "failure", "stage prepare failed", "x")
    append_attempt(settings.home, run_id, _attempt(run_id, "ops", 1, 500, "HTTP 500: boom", "retrying"))
    append_attempt(settings.home, run_id, _attempt(run_id, "ops", 2, 200, None, "sent"))
    append_attempt(settings.home, run_id, _attempt(run_id, "pager", 1, None, "ClientConnectorError: refused", "retrying"))
    services.append(Service("gateway_svc", cfg, tmp_path).start())
    page.goto(f"http://127.0.0.1:{ports.http}/#/runs/{run_id}")
    sent = page.wait_for_selector('#run-alerts li[data-alert="ops"][data-outcome="sent"]')
    assert sent.inner_text() == "alert ops (failure) sent (200, attempt 2)"
    failing = page.wait_for_selector('#run-alerts li[data-alert="pager"]')
    assert failing.inner_text() == "alert pager (failure) failing: ClientConnectorError: refused (attempt 1, retrying)"
    append_attempt(settings.home, run_id, _attempt(run_id, "pager", 2, None, "ClientConnectorError: refused", "failed"))
    gave_up = page.wait_for_selector('#run-alerts li[data-alert="pager"][data-outcome="failed"]')
    assert gave_up.inner_text() == "alert pager (failure) failed after 2 attempts: ClientConnectorError: refused"
    _screenshot(page, "dashboard-run-alerts.png")
