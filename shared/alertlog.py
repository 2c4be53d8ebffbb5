"""The record of a run's alert deliveries, beside its journal: `<home>/alerts/<run_id>.jsonl`, one JSON
line per webhook attempt, appended by the scheduler (one write, then fsync) and read by the gateway for
the run page. Not in the journal: a journal ends with its terminal event, and an end's alert is sent
after it.

Readers use complete lines only; a line that does not decode is skipped with a warning naming the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import msgspec

from .ids import check_run_id

log = logging.getLogger(__name__)

AttemptOutcome = Literal["sent", "retrying", "failed"]


class AlertAttempt(msgspec.Struct, kw_only=True):
    """One webhook attempt: `outcome` is sent (a 2xx), retrying (another attempt follows) or failed
    (the last attempt failed: no more)."""

    id: str  # the delivery (also the X-Runwire-Alert-Id header): <run_id>.<alert>.<kind>
    alert: str
    kind: str
    attempt: int  # 1, 2, ...
    time: str  # RFC 3339
    status: int | None  # the HTTP status, or None when no answer came
    error: str | None  # what went wrong; None when sent
    outcome: AttemptOutcome


class AlertView(msgspec.Struct, kw_only=True):
    """A delivery as the run page shows it (GET /api/runs/{id}: `alerts`): its latest attempt."""

    id: str
    alert: str
    kind: str
    outcome: AttemptOutcome
    attempts: int
    status: int | None
    error: str | None
    time: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AlertAttempt).decode


def alerts_dir_of(home: Path) -> Path:
    return home / "alerts"


def alert_log_path(home: Path, run_id: str) -> Path:
    return alerts_dir_of(home) / f"{check_run_id(run_id)}.jsonl"


def append_attempt(home: Path, run_id: str, attempt: AlertAttempt) -> None:
    """Append one line with one write and fsync it (O_APPEND: whole lines from one writer)."""
    path = alert_log_path(home, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, _encode(attempt) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_attempts(home: Path, run_id: str) -> list[AlertAttempt]:
    """Every attempt recorded for the run, in order; [] when none was made."""
    path = alert_log_path(home, run_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    lines = data.split(b"\n")
    for n, line in enumerate(lines[:-1], 1):  # the last piece has no newline: complete lines only
        try:
            out.append(_decode(line))
        except msgspec.DecodeError as e:
            log.warning("alert log %s line %d skipped: %s", path, n, e)
    if lines[-1]:
        log.warning("alert log %s: a torn last line (%d bytes) skipped", path, len(lines[-1]))
    return out


def summarize(attempts: list[AlertAttempt]) -> list[AlertView]:
    """One view per delivery, in the order of their first attempts: its latest attempt's outcome."""
    views: dict[str, AlertView] = {}
    for a in attempts:
        views[a.id] = AlertView(id=a.id, alert=a.alert, kind=a.kind, outcome=a.outcome, attempts=a.attempt,
                                status=a.status, error=a.error, time=a.time)
    return list(views.values())
