"""Synthetic minute-bar exports for the demo pipeline: what `runwire demo-data` writes into `<home>/data/raw/`.

Each file looks like a trading platform's CSV export, `<INSTR>_<first-date>_<last-date>.csv` with the
columns timestamp, open, high, low, close, volume. Timestamps are America/Chicago wall-clock time without
an offset ("2025-01-02 08:30:00"), each the *start* of its one-minute bar. A trading day D covers the
CME Globex session from 17:00 on the previous calendar day to 16:00 on D (1,380 bars); weekends are
skipped (holidays are not modelled). Because sessions never include a Sunday 02:00, wall-clock time in a
session is never ambiguous or missing across daylight-saving changes.

Prices are a random walk of log returns per instrument (Box-Muller normals from pyarrow's seeded
uniforms, with an intraday volatility profile that peaks after the 08:30 open), rounded to the
instrument's tick; open is the previous close, high/low bracket open and close; volume is an integer.
The same seed, span and instruments give byte-identical files. Files are written in chunks of days, one
file per instrument and calendar year of trading days, so a span of years never sits in memory at once;
each file appears under its final name only when complete (written as `.csv.partial`, then renamed).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pyarrow.compute as pc

CHICAGO = ZoneInfo("America/Chicago")
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")
SESSION_OPEN = time(17, 0)  # on the calendar day before the trading day
SESSION_CLOSE = time(16, 0)  # on the trading day
BARS_PER_DAY = 23 * 60
DEFAULT_DAYS = 25  # ~207k rows over six instruments: a demo run takes seconds
CHUNK_DAYS = 20  # days generated and appended per write: bounds memory for any span


@dataclass(frozen=True)
class Instrument:
    symbol: str
    price: float  # level the walk starts near
    tick: float
    decimals: int  # digits written to the CSV (the tick's precision)
    daily_vol: float  # standard deviation of a day's log return
    volume: int  # typical contracts per minute in the busiest hours


INSTRUMENTS: dict[str, Instrument] = {
    i.symbol: i
    for i in (
        Instrument("ES", 5000.0, 0.25, 2, 0.010, 900),
        Instrument("NQ", 17500.0, 0.25, 2, 0.013, 350),
        Instrument("YM", 39000.0, 1.0, 0, 0.009, 120),
        Instrument("CL", 75.0, 0.01, 2, 0.020, 600),
        Instrument("NG", 2.8, 0.001, 3, 0.035, 250),
        Instrument("GC", 2300.0, 0.1, 1, 0.009, 300),
    )
}
ALL: tuple[str, ...] = tuple(INSTRUMENTS)

Progress = Callable[[int, int], None]


def last_closed_session(now: datetime | None = None) -> date:
    """Today in Chicago once its session has closed (16:00), else yesterday: no bars from the future."""
    now = (now or datetime.now(CHICAGO)).astimezone(CHICAGO)
    return now.date() if now.time() >= SESSION_CLOSE else now.date() - timedelta(days=1)


def trading_days(days: int, end: date | None = None) -> list[date]:
    """The `days` weekdays ending on or before `end` (default: the last closed session), oldest first."""
    if days < 1:
        raise ValueError(f"days must be at least 1 (got {days})")
    day = end or last_closed_session()
    out: list[date] = []
    while len(out) < days:
        if day.weekday() < 5:
            out.append(day)
        day -= timedelta(days=1)
    out.reverse()
    return out


def export_name(symbol: str, first: date, last: date) -> str:
    return f"{symbol}_{first.isoformat()}_{last.isoformat()}.csv"


def has_raw_data(raw_dir: Path) -> bool:
    """True when `raw_dir` holds at least one CSV export (what the translator stage requires)."""
    return raw_dir.is_dir() and any(p.is_file() for p in raw_dir.glob("*.csv"))


def generate(
    raw_dir: Path,
    *,
    days: int = DEFAULT_DAYS,
    end: date | None = None,
    instruments: Sequence[str] = ALL,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Path]:
    """Write synthetic exports for `days` trading days ending at `end`; return the files written.

    `progress(done, total)` is called after each chunk of days is written (total = chunks of all files).
    An existing file of the same name is replaced.
    """
    unknown = [s for s in instruments if s not in INSTRUMENTS]
    if unknown:
        raise ValueError(f"unknown instrument(s) {', '.join(unknown)} (known: {', '.join(ALL)})")
    span = trading_days(days, end)
    by_year: dict[int, list[date]] = {}
    for d in span:
        by_year.setdefault(d.year, []).append(d)
    years = [by_year[y] for y in sorted(by_year)]
    total = len(instruments) * sum(math.ceil(len(ds) / CHUNK_DAYS) for ds in years)
    done = 0
    raw_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for symbol in instruments:
        spec = INSTRUMENTS[symbol]
        # the starting level depends on the seed, so seeds give visibly different markets
        price = _round_tick(spec.price * math.exp(0.1 * (_uniform(seed, symbol, "level") - 0.5)), spec)
        for year_days in years:
            path = raw_dir / export_name(symbol, year_days[0], year_days[-1])
            partial = path.with_name(path.name + ".partial")
            with open(partial, "wb") as f:
                for i in range(0, len(year_days), CHUNK_DAYS):
                    chunk_days = year_days[i : i + CHUNK_DAYS]
                    frame = bars(spec, chunk_days, price, seed)
                    price = float(frame["close"][-1])
                    frame.write_csv(
                        f, include_header=(i == 0), float_precision=spec.decimals, datetime_format=TIMESTAMP_FORMAT
                    )
                    done += 1
                    if progress is not None:
                        progress(done, total)
            os.replace(partial, path)
            written.append(path)
    return written


def bars(spec: Instrument, chunk_days: Sequence[date], start_price: float, seed: int) -> pl.DataFrame:
    """Minute bars of `chunk_days` for one instrument, the walk starting at `start_price`."""
    starts = [datetime.combine(d - timedelta(days=1), SESSION_OPEN) for d in chunk_days]
    ends = [datetime.combine(d, SESSION_CLOSE) for d in chunk_days]
    n = len(chunk_days) * BARS_PER_DAY
    u = pc.random(5 * n, initializer=_seed_int(seed, spec.symbol, chunk_days[0].isoformat()))
    uniforms = {f"u{k}": pl.from_arrow(u.slice(k * n, n)) for k in range(5)}
    sigma = spec.daily_vol / math.sqrt(BARS_PER_DAY)
    tick = spec.tick
    minute = pl.col("timestamp").dt.hour().cast(pl.Int32) * 60 + pl.col("timestamp").dt.minute().cast(pl.Int32)
    # busy after the 08:30 open, quieter midday, busier into the close, quiet overnight
    activity = (
        pl.when(minute < 7 * 60).then(0.45)
        .when(minute < 8 * 60 + 30).then(0.9)
        .when(minute < 10 * 60 + 30).then(1.8)
        .when(minute < 14 * 60).then(1.0)
        .when(minute < 16 * 60).then(1.3)
        .otherwise(0.45)  # 17:00-24:00 of the evening before
    )
    normal = (-2.0 * (1.0 - pl.col("u0")).log()).sqrt() * (2.0 * math.pi * pl.col("u1")).cos()
    close_raw = start_price * (sigma * pl.col("activity") * pl.col("z")).cum_sum().exp()
    frame = (
        pl.DataFrame({"start": starts, "end": ends})
        .select(pl.datetime_ranges("start", "end", "1m", closed="left", time_unit="us").alias("timestamp"))
        .explode("timestamp")
        .with_columns(**uniforms)
        .with_columns(activity=activity, z=normal)
        .with_columns(close=_tick_expr(close_raw, tick))
        .with_columns(open=pl.col("close").shift(1, fill_value=start_price))
        .with_columns(
            high=_tick_expr(
                pl.max_horizontal("open", "close") * (1.0 + sigma * pl.col("activity") * pl.col("u2") * 1.5), tick
            ),
            low=_tick_expr(
                pl.min_horizontal("open", "close") * (1.0 - sigma * pl.col("activity") * pl.col("u3") * 1.5), tick
            ),
            volume=(spec.volume * pl.col("activity") ** 2 / 3.24 * (0.3 + 1.4 * pl.col("u4"))).round(0).cast(pl.Int64)
            + 1,
        )
        # rounding to the tick must never leave open or close outside [low, high]
        .with_columns(high=pl.max_horizontal("high", "open", "close"), low=pl.min_horizontal("low", "open", "close"))
        .select(COLUMNS)
    )
    return frame


def _tick_expr(expr: pl.Expr, tick: float) -> pl.Expr:
    return (expr / tick).round(0) * tick


def _round_tick(value: float, spec: Instrument) -> float:
    return round(round(value / spec.tick) * spec.tick, spec.decimals)


def _seed_int(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("/".join((str(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # pyarrow wants a non-negative int64


def _uniform(seed: int, *parts: str) -> float:
    return _seed_int(seed, *parts) / 2**63
