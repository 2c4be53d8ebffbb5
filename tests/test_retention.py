"""Retention of old runs (`scheduler.keep_days`): on real journal files, and through the real scheduler
as a subprocess, which removes them at start; runs not ended are never removed, however old."""

from __future__ import annotations

import os
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio

from shared.config import load_settings
from shared.control import ControlClient, ListRuns
from shared.ids import new_run_id
from shared.journal import JournalWriter, begin_run, journal_path, list_run_ids, remove_expired
from tests.harness import Service, write_config

TZ = ZoneInfo("UTC")
DAY = 86400


def _run(journal_dir: Path, reports_dir: Path, *, ended: bool, age_days: float) -> str:
    """A run's journal (and, when ended, its report), last written `age_days` ago."""
    run_id = new_run_id()
    begin_run(journal_dir, run_id, TZ, "sleepy", {}, {"trigger": "manual"})
    writer = JournalWriter.open(journal_dir, run_id, TZ)
    writer.append("pipeline", "start", "started")
    if ended:
        writer.append("pipeline", "success", "done")
        reports_dir.mkdir(parents=True, exist_ok=True)
        (reports_dir / f"{run_id}.json").write_text("{}")
    writer.close()
    then = time.time() - age_days * DAY
    os.utime(journal_path(journal_dir, run_id), (then, then))
    return run_id


def test_remove_expired_takes_old_ended_runs_only(tmp_path: Path) -> None:
    journals, reports = tmp_path / "events", tmp_path / "reports"
    journals.mkdir()
    old_ended = _run(journals, reports, ended=True, age_days=40)
    recent_ended = _run(journals, reports, ended=True, age_days=2)
    old_open = _run(journals, reports, ended=False, age_days=40)  # e.g. a runner that died long ago
    (journals / "notes.txt").write_text("not a journal")

    assert remove_expired(journals, reports, 30, time.time()) == [old_ended]
    assert list_run_ids(journals) == sorted([recent_ended, old_open])
    assert not (reports / f"{old_ended}.json").exists() and (reports / f"{recent_ended}.json").exists()
    assert (journals / "notes.txt").exists()
    assert remove_expired(journals, reports, 30, time.time()) == []  # nothing left to do
    assert remove_expired(journals, reports, 1, time.time()) == [recent_ended]


async def test_the_scheduler_removes_old_ended_runs_at_start(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = write_config(tmp_path, scheduler="keep_days = 7")
    settings = load_settings(cfg)
    settings.journal_dir.mkdir(parents=True, exist_ok=True)
    old = _run(settings.journal_dir, settings.reports_dir, ended=True, age_days=8)
    recent = _run(settings.journal_dir, settings.reports_dir, ended=True, age_days=6)
    scheduler = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(scheduler)
    scheduler.wait_for(r"removed 1 ended run\(s\) last written more than 7 days ago")
    assert list_run_ids(settings.journal_dir) == [recent]
    assert not (settings.reports_dir / f"{old}.json").exists()
    async with ControlClient(settings.config.scheduler.control) as client:
        with anyio.fail_after(10):
            listed = [r.run_id for r in (await client.call(ListRuns(limit=100))).runs]
    assert listed == [recent]
