"""The audit report of a run, `<home>/reports/<run_id>.json`: per stage its status, start, end,
duration, counters and fan-out items. Written once at the run's end, to a temp file then renamed, so a
reader never sees half a report."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgspec


class ItemReport(msgspec.Struct):
    status: str = "running"
    start: str | None = None
    end: str | None = None
    duration_s: float | None = None
    attempts: int = 0
    msg: str = ""
    counters: dict[str, float] = {}
    _t0: float = 0.0

    def begin(self, ts: str) -> None:
        self.start, self._t0 = ts, time.monotonic()

    def finish(self, status: str, ts: str | None, msg: str = "") -> None:
        self.status, self.end, self.msg = status, ts, msg
        if self.start is not None:
            self.duration_s = round(time.monotonic() - self._t0, 6)


class StageReport(ItemReport):
    items: dict[str, ItemReport] = {}


class RunReport(msgspec.Struct):
    run_id: str
    pipeline: str
    params: dict[str, Any]
    runner: str
    attempt: int
    status: str = "running"
    msg: str = ""
    start: str | None = None
    end: str | None = None
    duration_s: float | None = None
    stages: dict[str, StageReport] = {}
    _t0: float = 0.0

    def stage(self, name: str) -> StageReport:
        if name not in self.stages:
            self.stages[name] = StageReport(status="pending")
        return self.stages[name]


_encoder = msgspec.json.Encoder()


def _public(obj: Any) -> Any:
    """Drop the private timing fields (leading underscore) before writing."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return obj


def write_report(reports_dir: Path, report: RunReport) -> Path:
    reports_dir.mkdir(parents=True, exist_ok=True)
    path = reports_dir / f"{report.run_id}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = msgspec.json.format(_encoder.encode(_public(msgspec.to_builtins(report))), indent=2)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
