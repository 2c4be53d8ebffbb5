"""The translator stage: raw CSV exports in `data/raw/` -> one Parquet file per instrument and year in
`data/processed/<INSTR>_<YEAR>.parquet`, merged with what is already there.

Each CSV is parsed once, streaming, into a typed staging Parquet file (all columns read as text, then
cast, so a bad value is reported with its line and column instead of a bare parser error). A file with a
bad header, value, missing field or high/low that does not bracket open/close is *kept* and named; the
others are still translated, and the stage then fails listing the kept files. Timestamps are America/
Chicago wall-clock ("2025-01-02 08:30:00") or carry an offset ("2025-01-02T08:30:00-06:00").
Per instrument and calendar year (Chicago time): existing file + new rows, de-duplicated by timestamp
(the newest raw file wins), sorted, written to a temp file and checked (unique sorted timestamps, no
rows lost), renamed into place. A raw file is deleted only after every one of its timestamps has been
found again in the processed files it went to (re-read from disk).
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl

from shared.stage import StageContext

from .data import COLUMNS
from .files import BAR_SCHEMA, TZ, DemoDataError, commit, processed_dir, raw_dir, temp_path

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^([A-Z][A-Z0-9]{0,9})_.*\.csv$")
_PRICES = ("open", "high", "low", "close")
_TEXT_SCHEMA = {c: pl.String for c in COLUMNS}


@dataclass
class YearStats:
    rows: int
    first: datetime
    last: datetime


@dataclass
class StagedFile:
    """One raw CSV, parsed and validated, as typed rows in a staging Parquet file."""

    raw: Path
    instrument: str
    staged: Path
    rows: int
    years: dict[int, YearStats] = field(default_factory=dict)


def run(ctx: StageContext) -> None:
    source = raw_dir(ctx.data_dir)
    out_dir = processed_dir(ctx.data_dir)
    files = sorted(p for p in source.glob("*.csv") if p.is_file())
    if not files:
        ctx.log(f"No raw CSV files in {source}: nothing to translate")
        return
    ctx.metric("Files found", raw_file_count=len(files))
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".staging"
    if staging.exists():
        # left by an interrupted run (runs of a pipeline do not overlap); the raw files are still there
        ctx.log(f"Removing stale staging folder {staging}")
        shutil.rmtree(staging)
    staging.mkdir()
    kept: list[str] = []
    try:
        by_instrument: dict[str, list[StagedFile]] = {}
        for path in files:
            try:
                staged = stage_csv(path, staging)
            except DemoDataError as e:
                kept.append(str(e))
                ctx.log(f"Malformed raw file kept: {e}", file=path.name)
                continue
            ctx.add("files_read")
            ctx.add("rows", staged.rows)
            by_instrument.setdefault(staged.instrument, []).append(staged)
        for instrument, staged_files in by_instrument.items():
            years = sorted({y for s in staged_files for y in s.years})
            for year in years:
                target = out_dir / f"{instrument}_{year}.parquet"
                rows = write_year(target, year, [s for s in staged_files if year in s.years])
                ctx.add("files_written")
                ctx.log(f"File written: {target.name} ({rows:,} rows)", file=target.name, rows=rows,
                        instrument=instrument, year=year)
            for staged in staged_files:
                verify_in_outputs(staged, out_dir)
                staged.raw.unlink()
                ctx.log(f"Raw file removed after verification: {staged.raw.name} ({staged.rows:,} rows)",
                        file=staged.raw.name, rows=staged.rows)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if kept:
        raise DemoDataError(
            f"{len(kept)} malformed raw file(s) kept in {source} (fix or remove them, then run again):\n"
            + "\n".join(kept)
        )
    ctx.metric("Translation complete", processed_file_count=len(list(out_dir.glob("*.parquet"))))


def instrument_of(path: Path) -> str:
    m = _NAME_RE.match(path.name)
    if not m:
        raise DemoDataError(f"{path}: cannot tell the instrument from the name (expected <INSTR>_<first>_<last>.csv)")
    return m.group(1)


def stage_csv(path: Path, staging: Path) -> StagedFile:
    """Parse and validate one CSV into a typed staging Parquet file, or raise naming the line and column."""
    instrument = instrument_of(path)
    _check_header(path)
    text = pl.scan_csv(path, schema=_TEXT_SCHEMA, has_header=True).with_row_index("line", offset=2)
    typed = text.select(
        "line",
        timestamp=parse_timestamp(pl.col("timestamp")),
        **{c: pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in _PRICES},
        volume=pl.col("volume").str.strip_chars().cast(pl.Int64, strict=False),
    )
    staged = staging / (path.stem + ".parquet")
    try:
        typed.sink_parquet(staged)
    except pl.exceptions.PolarsError as e:
        raise DemoDataError(f"{path}: {_locate_csv_error(path) or 'cannot parse'} ({str(e).splitlines()[0]})") from e
    rows = pl.scan_parquet(staged)
    first_bad = rows.select(
        pl.len().alias("rows"),
        *(pl.col("line").filter(pl.col(c).is_null()).min().alias(c) for c in COLUMNS),
        pl.col("line")
        .filter(
            (pl.col("low") > pl.min_horizontal("open", "close")) | (pl.col("high") < pl.max_horizontal("open", "close"))
        )
        .min()
        .alias("ohlc"),
    ).collect().row(0, named=True)
    # the first bad line; on it, an unreadable value before a high/low inconsistency, columns in file order
    problems = [(first_bad[c], i, c) for i, c in enumerate((*COLUMNS, "ohlc")) if first_bad[c] is not None]
    if problems:
        line, _, column = min(problems)
        raw = text.filter(pl.col("line") == line).collect().row(0, named=True)
        if column == "ohlc":
            values = ", ".join(f"{c}={raw[c]}" for c in _PRICES)
            raise DemoDataError(f"{path}: line {line}: high/low do not bracket open/close ({values})")
        kind = {"timestamp": "a timestamp (YYYY-MM-DD HH:MM:SS, Chicago time)", "volume": "an integer"}.get(
            column, "a number"
        )
        what = "missing value" if raw[column] in (None, "") else f"cannot read {raw[column]!r} as {kind}"
        raise DemoDataError(f"{path}: line {line}, column {column!r}: {what}")
    years = (
        rows.group_by(pl.col("timestamp").dt.year().alias("year"))
        .agg(pl.len().alias("rows"), pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last"))
        .collect()
    )
    return StagedFile(
        raw=path,
        instrument=instrument,
        staged=staged,
        rows=first_bad["rows"],
        years={r["year"]: YearStats(r["rows"], r["first"], r["last"]) for r in years.iter_rows(named=True)},
    )


def parse_timestamp(text: pl.Expr) -> pl.Expr:
    """Chicago wall-clock or ISO 8601 with an offset -> Datetime in Chicago; null when neither parses."""
    text = text.str.strip_chars()
    local = text.str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us").dt.replace_time_zone(
        TZ, ambiguous="null", non_existent="null"
    )
    offset = text.str.to_datetime("%Y-%m-%dT%H:%M:%S%z", strict=False, time_unit="us").dt.convert_time_zone(TZ)
    return pl.coalesce(local, offset)


def write_year(target: Path, year: int, staged_files: list[StagedFile]) -> int:
    """Merge the staged rows of `year` into `target` (temp file, checked, renamed); return its row count."""
    sources: list[pl.LazyFrame] = []
    if target.exists():
        sources.append(pl.scan_parquet(target).select(list(BAR_SCHEMA)).cast(BAR_SCHEMA))
    # later raw files (by name: the export dates) win over earlier ones and over what was there
    sources += [
        pl.scan_parquet(s.staged).filter(pl.col("timestamp").dt.year() == year).select(list(BAR_SCHEMA))
        for s in staged_files
    ]
    tmp = temp_path(target)
    try:
        (
            pl.concat(sources, how="vertical")
            .unique(subset="timestamp", keep="last", maintain_order=True)
            .sort("timestamp")
            .sink_parquet(tmp)
        )
    except pl.exceptions.PolarsError as e:
        tmp.unlink(missing_ok=True)
        raise DemoDataError(f"{target}: cannot merge the new rows with it: {e}") from e
    got = pl.scan_parquet(tmp).select(
        pl.len().alias("rows"),
        pl.col("timestamp").n_unique().alias("unique"),
        (pl.col("timestamp").diff().min() > pl.duration(seconds=0)).alias("sorted"),
    ).collect().row(0, named=True)
    floor = max([s.years[year].rows for s in staged_files] + [_rows(target)])
    if got["rows"] != got["unique"] or (got["rows"] > 1 and not got["sorted"]) or got["rows"] < floor:
        tmp.unlink(missing_ok=True)
        raise DemoDataError(f"{target}: written file failed its check ({got}, expected at least {floor} rows)")
    commit(tmp, target)
    return got["rows"]


def verify_in_outputs(staged: StagedFile, out_dir: Path) -> None:
    """Re-read the processed files: every timestamp of the raw file must be there, within their range."""
    for year, stats in staged.years.items():
        target = out_dir / f"{staged.instrument}_{year}.parquet"
        out = pl.scan_parquet(target).select("timestamp")
        span = out.select(pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last"))
        first, last = span.collect().row(0)
        wanted = (
            pl.scan_parquet(staged.staged).filter(pl.col("timestamp").dt.year() == year).select("timestamp").unique()
        )
        expected = wanted.select(pl.len()).collect().item()
        found = wanted.join(out, on="timestamp", how="semi").select(pl.len()).collect().item()
        if found != expected or first > stats.first or last < stats.last:
            raise DemoDataError(
                f"{target}: verification failed for {staged.raw.name}: {found:,} of {expected:,} timestamps found, "
                f"file spans {first}..{last}, raw spans {stats.first}..{stats.last}; the raw file is kept"
            )


def _rows(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item() if path.exists() else 0


def _check_header(path: Path) -> None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline().strip()
    got = [c.strip().lower() for c in header.split(",")]
    if got != list(COLUMNS):
        raise DemoDataError(f"{path}: line 1: header is {header!r}, expected {','.join(COLUMNS)!r}")


def _locate_csv_error(path: Path) -> str | None:
    """Only on the error path: the first line whose field count is wrong (polars does not say)."""
    with open(path, encoding="utf-8-sig", newline="", errors="replace") as f:
        reader = csv.reader(f)
        for fields in reader:
            if len(fields) != len(COLUMNS) and any(x.strip() for x in fields):
                return f"line {reader.line_num}: {len(fields)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})"
    return None
