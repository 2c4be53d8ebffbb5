"""What the demo stages share: their folders under `<home>/data/`, the bar schema, the error they raise,
and the write-to-temp-then-rename that makes an output file appear whole or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from shared.errors import RunwireError
from shared.journal import fsync_path

TZ = "America/Chicago"
BAR_SCHEMA: dict[Any, pl.DataType] = {  # Any: polars takes column names and selectors as keys
    "timestamp": pl.Datetime("us", TZ),
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Int64(),
}
TMP_SUFFIX = ".tmp"  # never matches the stages' `*.parquet` / `*.csv` globs


class DemoDataError(RunwireError):
    """Input data of a demo stage is malformed or an output failed verification (names the file)."""

    code = "bad_data"


def raw_dir(data_dir: Path) -> Path:
    return data_dir / "raw"


def processed_dir(data_dir: Path) -> Path:
    return data_dir / "processed"


def analyzer_runs_dir(data_dir: Path) -> Path:
    return data_dir / "analyzer_runs"


def temp_path(target: Path) -> Path:
    return target.with_name(target.name + TMP_SUFFIX)


def commit(tmp: Path, target: Path, *, durable: bool = True) -> None:
    """Put a written and verified temp file in place: whole or not at all, and with `durable` on disk
    before the caller deletes the inputs it came from (a crash must not lose both)."""
    if not durable:
        os.replace(tmp, target)
        return
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)
