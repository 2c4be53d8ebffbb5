"""The demo data generator: deterministic exports with the documented schema and realistic bars."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl

from runwire_demo import data

END = date(2025, 3, 14)  # a Friday
SCHEMA = {"timestamp": pl.String, **{c: pl.Float64 for c in ("open", "high", "low", "close")}, "volume": pl.Int64}


def test_names_span_and_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    files = data.generate(tmp_path, days=6, end=END, instruments=["ES", "CL"], progress=lambda d, t: calls.append((d, t)))
    # six weekdays ending Friday 14 March: Friday 7 March .. Friday 14 March
    assert [f.name for f in files] == ["ES_2025-03-07_2025-03-14.csv", "CL_2025-03-07_2025-03-14.csv"]
    assert calls == [(1, 2), (2, 2)]
    assert data.has_raw_data(tmp_path)
    assert not list(tmp_path.glob("*.partial"))


def test_one_file_per_instrument_and_year_in_chunks(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    files = data.generate(tmp_path, days=45, end=date(2025, 1, 10), instruments=["NG"], progress=lambda d, t: calls.append((d, t)))
    assert [f.name for f in files] == ["NG_2024-11-11_2024-12-31.csv", "NG_2025-01-01_2025-01-10.csv"]
    # 37 days in 2024 -> 2 chunks of CHUNK_DAYS, 8 in 2025 -> 1 chunk
    assert calls == [(1, 3), (2, 3), (3, 3)]
    frame = pl.read_csv(files[0])
    assert frame.height == 37 * data.BARS_PER_DAY
    assert frame["timestamp"].is_sorted() and frame["timestamp"].n_unique() == frame.height


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = data.generate(tmp_path / "a", days=3, end=END, instruments=["GC"], seed=7)
    b = data.generate(tmp_path / "b", days=3, end=END, instruments=["GC"], seed=7)
    c = data.generate(tmp_path / "c", days=3, end=END, instruments=["GC"], seed=8)
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()


def test_schema_ohlc_and_sessions(tmp_path: Path) -> None:
    files = data.generate(tmp_path, days=10, end=END)
    assert len(files) == len(data.ALL)
    for path in files:
        spec = data.INSTRUMENTS[path.name.split("_")[0]]
        assert path.read_text().splitlines()[0] == ",".join(data.COLUMNS)
        # parsing with the exact types fails on any value that is not a number / an integer volume
        frame = pl.read_csv(path, schema=SCHEMA).with_columns(
            pl.col("timestamp").str.to_datetime(data.TIMESTAMP_FORMAT, strict=True)
        )
        assert frame.height == 10 * data.BARS_PER_DAY
        bad = frame.filter(
            (pl.col("low") > pl.min_horizontal("open", "close")) | (pl.col("high") < pl.max_horizontal("open", "close"))
        )
        assert bad.height == 0, bad
        assert frame["volume"].min() >= 1
        # plausible level: within 30% of the instrument's reference price
        assert 0.7 * spec.price < frame["close"].mean() < 1.3 * spec.price
        ts = frame["timestamp"]
        # a session runs 17:00 (evening before) .. 15:59; nothing between 16:00 and 17:00
        minutes = ts.dt.hour().cast(pl.Int32) * 60 + ts.dt.minute().cast(pl.Int32)
        assert not ((minutes >= 16 * 60) & (minutes < 17 * 60)).any()
        # trading days (the day a bar's session closes) are weekdays only
        trade_day = (ts + timedelta(hours=7)).dt.date()
        assert set(trade_day.dt.weekday().unique().to_list()) == {1, 2, 3, 4, 5}
        # every analyzer slot hour has bars
        assert {h for h in ts.dt.hour().unique().to_list()} >= {7, 8, 9, 10, 11, 12, 13, 14, 15}


def test_default_end_is_the_last_closed_session() -> None:
    chicago = ZoneInfo("America/Chicago")
    assert data.last_closed_session(datetime(2025, 3, 14, 15, 59, tzinfo=chicago)) == date(2025, 3, 13)
    assert data.last_closed_session(datetime(2025, 3, 14, 16, 0, tzinfo=chicago)) == date(2025, 3, 14)
    # 22:30 UTC on Friday is 17:30 in Chicago: Friday's session has closed
    assert data.last_closed_session(datetime(2025, 3, 14, 22, 30, tzinfo=timezone.utc)) == date(2025, 3, 14)
    assert data.trading_days(2, date(2025, 3, 16)) == [date(2025, 3, 13), date(2025, 3, 14)]  # from a Sunday


def test_has_raw_data(tmp_path: Path) -> None:
    assert not data.has_raw_data(tmp_path / "missing")
    (tmp_path / "x.csv.partial").write_text("")
    assert not data.has_raw_data(tmp_path)


def test_unknown_instrument_refused(tmp_path: Path) -> None:
    try:
        data.generate(tmp_path, days=1, end=END, instruments=["ZZ"])
    except ValueError as e:
        assert "ZZ" in str(e)
    else:
        raise AssertionError("an unknown instrument was accepted")
