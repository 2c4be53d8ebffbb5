"""The analyzer stage on hand-built bars whose breakouts are known, and on generated demo data."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from runwire_demo import analyzer, data, translator
from runwire_demo.files import BAR_SCHEMA, DemoDataError
from shared.stage import LogMessage, StageInfo, collecting_context

CHICAGO = ZoneInfo("America/Chicago")
DAY1 = date(2025, 3, 12)
DAY2 = date(2025, 3, 13)


def _day(day: date, overrides: dict[str, tuple[float, float, float, float]], missing: set[str] = frozenset()) -> list[dict]:
    """Flat bars at 100 from 07:00 to 15:59 (plus one at 16:05), with some bars replaced or missing."""
    rows = []
    for minute in [*range(7 * 60, 16 * 60), 16 * 60 + 5]:
        hhmm = f"{minute // 60:02d}:{minute % 60:02d}"
        if hhmm in missing:
            continue
        o, h, low, c = overrides.get(hhmm, (100.0, 100.0, 100.0, 100.0))
        rows.append({
            "timestamp": datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=CHICAGO),
            "open": o, "high": h, "low": low, "close": c, "volume": 1,
        })
    return rows


def _bars() -> pl.DataFrame:
    day1 = _day(DAY1, {
        "07:33": (100, 101, 100, 100),  # 07:30 range high 101
        "07:40": (100, 100, 99, 100),  # 07:30 range low 99
        "07:52": (100, 101.5, 100, 101.5),  # closes above 101: long entry at 101.5, target 103.5, stop 99.5
        "08:20": (100, 103.6, 100, 100),  # reaches the target
        "09:35": (100, 100.5, 100, 100),  # 09:30 range high 100.5
        "09:36": (100, 100, 99.75, 100),  # 09:30 range low 99.75
        "09:50": (100, 100, 99.5, 99.5),  # closes below: short entry at 99.5 (also for the flat 08:00 and 09:00 ranges)
    })
    day2 = _day(DAY2, {
        "07:31": (100, 101, 100, 100),
        "07:32": (100, 100, 98, 100),  # 07:30 range 98..101
        "07:50": (100, 102, 100, 102),  # long at 102, target 105, stop 99
        "08:30": (100, 105.5, 98.9, 100),  # touches both: the stop counts
        "16:05": (100, 200, 100, 200),  # after 16:00: ignored
    }, missing={"09:31"})  # the 09:30 range is incomplete: not analyzed
    return pl.DataFrame(day1 + day2, schema=BAR_SCHEMA)


def _home_with_bars(tmp_path: Path, frame: pl.DataFrame, instrument: str = "ES") -> Path:
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    frame.write_parquet(processed / f"{instrument}_2025.parquet")
    return tmp_path


def _run(home: Path, item: str | None):
    ctx, got = collecting_context(StageInfo(run_id="a1", stage="analyzer", item=item, home=str(home)))
    analyzer.run(ctx)
    return ctx, got


def _t(day: date, hhmm: str) -> datetime:
    return datetime(day.year, day.month, day.day, int(hhmm[:2]), int(hhmm[3:]), tzinfo=CHICAGO)


def test_known_breakouts(tmp_path: Path) -> None:
    home = _home_with_bars(tmp_path, _bars())
    ctx, got = _run(home, "ES")
    runs = home / "data" / "analyzer_runs"
    files = sorted(str(p.relative_to(runs)) for p in runs.rglob("*.parquet"))
    assert files == [
        "ES1/2025/ES1_an_2025_03_12.parquet", "ES1/2025/ES1_an_2025_03_13.parquet",
        "ES2/2025/ES2_an_2025_03_12.parquet", "ES2/2025/ES2_an_2025_03_13.parquet",
    ]
    rows = {(r["date"], r["slot"]): r for r in pl.read_parquet(list(runs.rglob("*.parquet"))).iter_rows(named=True)}
    assert len(rows) == 13  # 7 slots on day 1, 6 on day 2 (09:30 incomplete)

    r = rows[(DAY1, "07:30")]
    assert (r["session"], r["range_high"], r["range_low"], r["range_size"]) == ("ES1", 101, 99, 2)
    assert (r["direction"], r["entry_time"], r["entry_price"]) == ("long", _t(DAY1, "07:52"), 101.5)
    assert (r["target"], r["stop"], r["result"], r["exit_time"], r["exit_price"]) == (103.5, 99.5, "target", _t(DAY1, "08:20"), 103.5)
    assert (r["pnl_points"], r["pnl_r"]) == (2.0, 1.0)

    r = rows[(DAY1, "09:30")]
    assert (r["session"], r["range_high"], r["range_low"]) == ("ES2", 100.5, 99.75)
    assert (r["direction"], r["entry_time"], r["entry_price"]) == ("short", _t(DAY1, "09:50"), 99.5)
    # neither 100.25 nor 98.75 is touched again: out at the 15:59 close
    assert (r["result"], r["exit_time"], r["exit_price"], r["pnl_points"]) == ("close", _t(DAY1, "15:59"), 100.0, -0.5)
    assert r["pnl_r"] == pytest.approx(-0.5 / 0.75)

    # flat ranges (size 0) break out at the first close off 100: 09:50 for both; the next bar stops them out flat
    for slot in ("08:00", "09:00"):
        r = rows[(DAY1, slot)]
        assert (r["direction"], r["entry_time"], r["result"], r["exit_time"], r["pnl_points"], r["pnl_r"]) == (
            "short", _t(DAY1, "09:50"), "stop", _t(DAY1, "09:51"), 0.0, None)
    for slot in ("10:00", "10:30", "11:00"):
        r = rows[(DAY1, slot)]
        assert (r["direction"], r["result"], r["entry_time"], r["exit_price"]) == ("none", "none", None, None)

    r = rows[(DAY2, "07:30")]
    assert (r["direction"], r["entry_price"], r["result"], r["exit_time"], r["exit_price"], r["pnl_r"]) == (
        "long", 102.0, "stop", _t(DAY2, "08:30"), 99.0, -1.0)
    assert (DAY2, "09:30") not in rows
    # the 16:05 bar closing at 200 is outside the window
    assert {rows[(DAY2, s)]["direction"] for s in ("08:00", "09:00", "10:00", "10:30", "11:00")} == {"none"}

    assert ctx.counters == {"days": 2, "slots": 13, "trades": 5}
    logs = [m.msg for m in got if isinstance(m, LogMessage)]
    assert logs[0] == "Running analyzer for ES (1 processed file(s))"
    assert logs[-1] == "ES: 2 days, 13 slots, 5 trades (ES1: 6, ES2: 7) -> 4 daily files"


def test_rerun_replaces_daily_files(tmp_path: Path) -> None:
    home = _home_with_bars(tmp_path, _bars())
    _run(home, "ES")
    first = {p: p.read_bytes() for p in (home / "data" / "analyzer_runs").rglob("*.parquet")}
    _run(home, "ES")
    second = {p: p.read_bytes() for p in (home / "data" / "analyzer_runs").rglob("*") if p.is_file()}
    assert first == second


def test_no_processed_data_succeeds_with_zero(tmp_path: Path) -> None:
    home = _home_with_bars(tmp_path, _bars(), instrument="ES")
    ctx, got = _run(home, "NG")
    assert ctx.counters == {"days": 0, "slots": 0, "trades": 0}
    assert [m.msg for m in got if isinstance(m, LogMessage)][0].startswith("No processed data for NG")
    assert not (home / "data" / "analyzer_runs").exists()


@pytest.mark.parametrize("item", [None, "../ES", "es"])
def test_refuses_a_bad_item(tmp_path: Path, item: str | None) -> None:
    with pytest.raises(DemoDataError, match="expected one instrument per call"):
        _run(tmp_path, item)


def test_on_generated_data(tmp_path: Path) -> None:
    data.generate(tmp_path / "data" / "raw", days=3, end=date(2025, 3, 14), instruments=["CL"])
    translator.run(collecting_context(StageInfo(run_id="a1", stage="translator", home=str(tmp_path)))[0])
    ctx, _ = _run(tmp_path, "CL")
    assert ctx.counters["days"] == 3 and ctx.counters["slots"] == 3 * len(analyzer.SLOTS)
    frame = pl.read_parquet(list((tmp_path / "data" / "analyzer_runs").rglob("*.parquet")))
    assert frame.schema == pl.Schema(analyzer.RESULT_SCHEMA)
    trades = frame.filter(pl.col("direction") != "none")
    assert trades.height == ctx.counters["trades"]
    # every entry is after its range and before 16:00; every exit after its entry
    assert (trades["entry_time"] <= trades["exit_time"]).all()
    assert (trades.filter(pl.col("result") != "close").select(pl.col("entry_time") < pl.col("exit_time")).to_series()).all()
    assert (trades["entry_time"].dt.hour() < 16).all()
    assert set(trades["result"].unique()) <= {"target", "stop", "close"}
