"""Re-runs and backfills on the dashboard, in a real browser against the real trio: the run page's
"re-run from failed" button makes a linked run and shows the links both ways; the home page shows a
backfill's progress until its runs have ended."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from shared.config import load_settings
from tests.harness import Service, write_config
from tests.test_dashboard import browser_page  # noqa: F401  (the fixture)
from tests.test_rerun_backfill import DAY, PIPELINES


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


@pytest.mark.timeout(240)
def test_rerun_button_links_runs_and_backfill_progress_shows(tmp_path: Path, services: list[Service],
                                                             browser_page) -> None:  # noqa: F811
    cfg, ports = write_config(tmp_path, PIPELINES, scheduler="max_concurrent_runs = 8", runner="capacity = 4")
    home = load_settings(cfg).home
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    base = f"http://127.0.0.1:{ports.http}"
    page = browser_page
    orig = _post(base, "/api/runs", {"pipeline": "steps", "params": {"label": "web"}})["run_id"]
    page.goto(f"{base}/#/runs/{orig}")
    button = page.locator("#rerun-from-failed")
    button.wait_for()  # shown once the run has ended failure
    (home / "ok.flag").write_text("")
    button.click()
    page.wait_for_function("id => location.hash.startsWith('#/runs/') && !location.hash.endsWith(id)", arg=orig)
    new = page.evaluate("decodeURIComponent(location.hash.slice('#/runs/'.length))")
    panel = page.locator("#rerun-panel")
    panel.get_by_text(f"re-run of {orig} from stage check").wait_for()
    assert _get(base, f"/api/runs/{new}")["rerun_of"] == orig
    page.goto(f"{base}/#/runs/{orig}")
    page.locator("#reruns").get_by_text(new).wait_for()

    made = _post(base, "/api/schedules/minutely/backfill", {"from": f"{DAY}T00:00:00Z", "to": f"{DAY}T00:02:00Z",
                                                           "max_parallel": 3})
    backfill_id = made["progress"]["backfill_id"]
    page.goto(f"{base}/#/")
    card = page.locator(f'#backfills [data-backfill-id="{backfill_id}"]')
    card.wait_for()
    card.get_by_text("3 of 3 ended (3 success, 0 failure, 0 cancelled), 0 running, 0 queued, 0 pending · done").wait_for()
