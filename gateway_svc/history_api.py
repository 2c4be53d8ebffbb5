"""GET /api/history?pipeline=&since=&stage=: the history report of one pipeline from the Parquet
archive (`history.analytics.history`; its shape is documented there and in the README).

    200 {"pipeline", "stage", "since", "window_s", "window": {"from", "to"}, "previous_window",
         "summary": Stats, "stages": [{"stage", ...Stats}], "items": [Item], "slowest_items": [Item],
         "failing_items": [Item], "skipped_slots": {"count", "by_reason": [{"reason", "count"}],
         "recent": [{"run_id", "queued_at", "reason"}]},
         "recent_runs": [{"run_id", "queued_at", "status", "duration_s", "stages": {name: seconds}}]}
    Stats = {"runs", "success", "failure", "cancelled", "skipped", "success_rate",
             "duration_s": {"p50", "p95", "max"}, "previous": {...the same, window before...},
             "change": {"runs", "success_rate", "p50_pct", "p95_pct"}}
    Item = {"stage", "item", "runs", "failures", "success_rate", "duration_s", "last_failure"}
    400 bad_request naming the parameter (missing or unknown pipeline, a window that is not like 7d,
    a bad stage name); 503 unavailable when the archive cannot be read (see `runwire archive rebuild`).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import anyio
import polars as pl
import pyarrow as pa
from aiohttp import web

from runwire_history.analytics import BadWindow, Query, history, parse_window
from runwire_history.archive import archive_dir_of
from runwire_history.ledger import Ledger, archive_lock
from shared.events import is_valid_stage_name

from .errors import HttpError
from .keys import SETTINGS

log = logging.getLogger(__name__)

_QUERIES = anyio.CapacityLimiter(2)  # history scans use every core: two at a time


def _known_pipelines(archive_dir: Any) -> list[str]:
    with archive_lock(archive_dir, exclusive=False), Ledger(archive_dir, create=False) as ledger:
        return ledger.pipelines()


async def get_history(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    archive_dir = archive_dir_of(settings.home)
    pipeline = request.query.get("pipeline", "")
    if not pipeline:
        raise HttpError(400, "bad_request", "query parameter 'pipeline': required (a configured pipeline's name)")
    since = request.query.get("since") or "7d"
    try:
        parse_window(since)
    except BadWindow as e:
        raise HttpError(400, "bad_request", f"query parameter 'since': {e}") from None
    stage = request.query.get("stage") or None
    if stage is not None and not is_valid_stage_name(stage):
        raise HttpError(400, "bad_request", f"query parameter 'stage': not a stage name: {stage[:40]!r}")
    try:
        async with _QUERIES:
            configured = pipeline in settings.config.pipelines
            if not configured and pipeline not in await anyio.to_thread.run_sync(_known_pipelines, archive_dir):
                known = ", ".join(sorted(settings.config.pipelines)) or "none"
                raise HttpError(400, "unknown_pipeline", f"query parameter 'pipeline': unknown pipeline {pipeline[:80]!r} "
                                f"(configured: {known}; none archived by that name)")
            report = await anyio.to_thread.run_sync(history, archive_dir, Query(pipeline, since, stage))
    except (OSError, sqlite3.Error, pa.ArrowException, pl.exceptions.PolarsError) as e:
        log.error("history of %s: the archive %s cannot be read: %s", pipeline, archive_dir, e)
        raise HttpError(503, "unavailable", f"the archive {archive_dir} cannot be read ({e}); "
                                            "`runwire archive rebuild` repairs it from the journals") from e
    return web.json_response(report)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/history", get_history)
