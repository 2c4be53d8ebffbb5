"""The analyzer stage: an opening-range breakout study of one instrument (`ctx.item`, e.g. "ES") over
its processed minute bars, written as one result file per trading day and session.

Definition (all times America/Chicago; a bar's timestamp is the start of its minute):
- Slots 07:30, 08:00, 09:00 form session 1 (ES1), slots 09:30, 10:00, 10:30, 11:00 session 2 (ES2).
- Opening range of a slot on a day: high/low of the RANGE_MINUTES (15) bars starting at the slot time.
  A slot whose 15 bars are not all present that day is not analyzed (no row).
- Breakout: the first later bar, starting before 16:00, whose close is above the range high (long) or
  below the range low (short). Entry at that bar's close; entry_time is that bar's timestamp.
- Exit: target = entry +/- range size, stop = entry -/+ range size (1R each way), checked on the bars
  after the entry bar; the first bar touching either exits at that level (both in one bar: the stop,
  conservatively); none by 16:00: exit at the close of the last bar before 16:00 ("close").
- One row per day x analyzed slot: direction long/short/none, entry, exit, result target/stop/close/none,
  pnl in points and in range multiples (pnl_r).

Output: `data/analyzer_runs/<INSTR><N>/<YYYY>/<INSTR><N>_an_<YYYY>_<MM>_<DD>.parquet` (N = session),
replacing a daily file of the same day (results are a function of the processed bars). Every run analyzes
all processed data of the instrument, one processed (yearly) file at a time.
An instrument without processed data logs that and succeeds with 0 days: a missing input for one item is
"nothing to do" (as the runner skips a stage whose `requires` matches nothing), not an error; the
dashboard shows the 0 and the log line.
"""

from __future__ import annotations

import logging
import re
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl

from shared.stage import StageContext

from .files import BAR_SCHEMA, DemoDataError, analyzer_runs_dir, commit, processed_dir, temp_path

log = logging.getLogger(__name__)

RANGE_MINUTES = 15
CLOSE_MINUTE = 16 * 60  # 16:00: no entries from it on, open trades exit at the close of the bar before
SLOTS: dict[str, int] = {"07:30": 1, "08:00": 1, "09:00": 1, "09:30": 2, "10:00": 2, "10:30": 2, "11:00": 2}
_SLOT_MINUTE = {slot: int(slot[:2]) * 60 + int(slot[3:]) for slot in SLOTS}
_INSTRUMENT_RE = re.compile(r"^[A-Z][A-Z0-9]{0,9}$")

RESULT_SCHEMA: dict[Any, pl.DataType] = {  # Any: polars takes column names and selectors as keys
    "date": pl.Date(),
    "instrument": pl.String(),
    "session": pl.String(),
    "slot": pl.String(),
    "range_high": pl.Float64(),
    "range_low": pl.Float64(),
    "range_size": pl.Float64(),
    "direction": pl.String(),
    "entry_time": BAR_SCHEMA["timestamp"],
    "entry_price": pl.Float64(),
    "target": pl.Float64(),
    "stop": pl.Float64(),
    "exit_time": BAR_SCHEMA["timestamp"],
    "exit_price": pl.Float64(),
    "result": pl.String(),
    "pnl_points": pl.Float64(),
    "pnl_r": pl.Float64(),
}


def run(ctx: StageContext) -> None:
    instrument = ctx.item
    if instrument is None or not _INSTRUMENT_RE.match(instrument):
        raise DemoDataError(
            f"analyzer: expected one instrument per call (stage fan_out over instruments), got item {instrument!r}"
        )
    for counter in ("days", "slots", "trades"):
        ctx.set(counter, 0)
    files = sorted(processed_dir(ctx.data_dir).glob(f"{instrument}_*.parquet"))
    if not files:
        ctx.log(
            f"No processed data for {instrument} ({processed_dir(ctx.data_dir)}/{instrument}_*.parquet): "
            "nothing to analyze", instrument=instrument,
        )
        return
    ctx.log(f"Running analyzer for {instrument} ({len(files)} processed file(s))", instrument=instrument)
    out_root = analyzer_runs_dir(ctx.data_dir)
    per_session: dict[str, int] = {}
    daily_files = 0
    for path in files:
        results = analyze(pl.scan_parquet(path), instrument, source=path)
        for (session, day), rows in results.partition_by(["session", "date"], as_dict=True).items():
            write_daily(out_root, session, day, rows)
            daily_files += 1
            per_session[session] = per_session.get(session, 0) + rows.height
        ctx.add("days", results["date"].n_unique())
        ctx.add("slots", results.height)
        ctx.add("trades", results.filter(pl.col("direction") != "none").height)
    split = ", ".join(f"{s}: {n}" for s, n in sorted(per_session.items()))
    ctx.log(
        f"{instrument}: {ctx.counters['days']:g} days, {ctx.counters['slots']:g} slots, "
        f"{ctx.counters['trades']:g} trades ({split}) -> {daily_files} daily files",
        instrument=instrument, daily_files=daily_files,
    )


def daily_path(root: Path, session: str, day: date) -> Path:
    return root / session / f"{day.year:04d}" / f"{session}_an_{day:%Y_%m_%d}.parquet"


def write_daily(root: Path, session: str, day: date, rows: pl.DataFrame) -> Path:
    target = daily_path(root, session, day)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    rows.sort("slot").write_parquet(tmp)
    # no fsync: nothing is deleted on the strength of a daily file, and a lost one is recomputed next run
    commit(tmp, target, durable=False)
    return target


def analyze(bars: pl.LazyFrame, instrument: str, *, source: Path | str = "bars") -> pl.DataFrame:
    """The breakout rows (RESULT_SCHEMA) for every day and slot of `bars` (timestamp/high/low/close)."""
    minute = pl.col("timestamp").dt.hour().cast(pl.Int32) * 60 + pl.col("timestamp").dt.minute().cast(pl.Int32)
    day_bars = (
        bars.select("timestamp", "high", "low", "close")
        .with_columns(date=pl.col("timestamp").dt.date(), minute=minute)
        .filter(pl.col("minute") >= min(_SLOT_MINUTE.values()), pl.col("minute") < CLOSE_MINUTE)
    )
    # slots are at least 30 minutes apart, so a bar belongs to at most one opening range
    slot_of_bar = pl.lit(None, dtype=pl.String)
    for slot, start in reversed(list(_SLOT_MINUTE.items())):
        in_range = (pl.col("minute") >= start) & (pl.col("minute") < start + RANGE_MINUTES)
        slot_of_bar = pl.when(in_range).then(pl.lit(slot)).otherwise(slot_of_bar)
    slot_minute = pl.col("slot").replace_strict(_SLOT_MINUTE, return_dtype=pl.Int32)
    ranges = (
        day_bars.with_columns(slot=slot_of_bar)
        .filter(pl.col("slot").is_not_null())
        .group_by("date", "slot")
        .agg(range_high=pl.col("high").max(), range_low=pl.col("low").min(), bars=pl.len())
        .filter(pl.col("bars") == RANGE_MINUTES)
        .with_columns(
            range_size=pl.col("range_high") - pl.col("range_low"),
            range_end=slot_minute + RANGE_MINUTES,
            session=pl.lit(instrument) + pl.col("slot").replace_strict(SLOTS, return_dtype=pl.String),
        )
    )
    entries = (
        day_bars.join(ranges, on="date")
        .filter(
            pl.col("minute") >= pl.col("range_end"),
            (pl.col("close") > pl.col("range_high")) | (pl.col("close") < pl.col("range_low")),
        )
        .group_by("date", "slot")
        .agg(
            entry_time=pl.col("timestamp").min(),
            entry_price=pl.col("close").sort_by("timestamp").first(),
            long=(pl.col("close") > pl.col("range_high")).sort_by("timestamp").first(),
        )
    )
    trades = (
        ranges.join(entries, on=["date", "slot"], how="left")
        .with_columns(
            direction=pl.when(pl.col("entry_time").is_null())
            .then(pl.lit("none"))
            .when(pl.col("long"))
            .then(pl.lit("long"))
            .otherwise(pl.lit("short")),
            side=pl.when(pl.col("long")).then(1.0).otherwise(-1.0),
        )
        .with_columns(
            target=pl.col("entry_price") + pl.col("side") * pl.col("range_size"),
            stop=pl.col("entry_price") - pl.col("side") * pl.col("range_size"),
        )
    )
    long = pl.col("side") > 0
    stop_hit = pl.when(long).then(pl.col("low") <= pl.col("stop")).otherwise(pl.col("high") >= pl.col("stop"))
    target_hit = pl.when(long).then(pl.col("high") >= pl.col("target")).otherwise(pl.col("low") <= pl.col("target"))
    exits = (
        day_bars.join(trades.filter(pl.col("entry_time").is_not_null()), on="date")
        .filter(pl.col("timestamp") > pl.col("entry_time"))
        .with_columns(stop_hit=stop_hit, target_hit=target_hit)
        .filter(pl.col("stop_hit") | pl.col("target_hit"))
        .group_by("date", "slot")
        .agg(
            hit_time=pl.col("timestamp").min(),
            hit_stop=pl.col("stop_hit").sort_by("timestamp").first(),
        )
    )
    session_close = day_bars.group_by("date").agg(
        close_time=pl.col("timestamp").max(), close_price=pl.col("close").sort_by("timestamp").last()
    )
    traded = pl.col("entry_time").is_not_null()
    result = (
        trades.join(exits, on=["date", "slot"], how="left")
        .join(session_close, on="date", how="left")
        .with_columns(
            result=pl.when(~traded)
            .then(pl.lit("none"))
            .when(pl.col("hit_time").is_null())
            .then(pl.lit("close"))
            .when(pl.col("hit_stop"))
            .then(pl.lit("stop"))
            .otherwise(pl.lit("target")),
        )
        .with_columns(
            exit_time=pl.when(traded).then(pl.coalesce("hit_time", "close_time")),
            exit_price=pl.when(pl.col("result") == "stop")
            .then(pl.col("stop"))
            .when(pl.col("result") == "target")
            .then(pl.col("target"))
            .when(pl.col("result") == "close")
            .then(pl.col("close_price")),
        )
        .with_columns(pnl_points=(pl.col("exit_price") - pl.col("entry_price")) * pl.col("side"))
        .with_columns(
            pnl_r=pl.when(pl.col("range_size") > 0).then(pl.col("pnl_points") / pl.col("range_size")),
            instrument=pl.lit(instrument),
        )
        .select(list(RESULT_SCHEMA))
        .cast(RESULT_SCHEMA)
        .sort("date", "slot")
    )
    try:
        return result.collect()
    except pl.exceptions.PolarsError as e:
        raise DemoDataError(f"{source}: cannot analyze: {e}") from e
