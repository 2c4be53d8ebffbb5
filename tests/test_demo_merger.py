"""The merger stage on real analyzer output: monthly files hold every daily row; daily files go only then."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pytest

from runwire_demo import analyzer, data, merger, translator
from runwire_demo.files import DemoDataError
from shared.stage import LogMessage, StageInfo, collecting_context


def _ctx(home: Path, stage: str, item: str | None = None):
    return collecting_context(StageInfo(run_id="m1", stage=stage, item=item, home=str(home)))


def _analyzed(home: Path, instruments: list[str], days: int = 8, end: date = date(2025, 3, 5)) -> pl.DataFrame:
    """Generate, translate and analyze; return all daily rows (read before the merger touches them)."""
    data.generate(home / "data" / "raw", days=days, end=end, instruments=instruments)
    translator.run(_ctx(home, "translator")[0])
    for instrument in instruments:
        analyzer.run(_ctx(home, "analyzer", instrument)[0])
    return pl.read_parquet(sorted((home / "data" / "analyzer_runs").rglob("*_an_????_??_??.parquet")))


def _runs(home: Path) -> Path:
    return home / "data" / "analyzer_runs"


def test_rolls_daily_files_into_months(tmp_path: Path) -> None:
    daily = _analyzed(tmp_path, ["ES", "GC"])  # 24 Feb .. 5 Mar: two months
    n_daily = len(list(_runs(tmp_path).rglob("*.parquet")))
    ctx, got = _ctx(tmp_path, "merger")
    merger.run(ctx)
    files = sorted(str(p.relative_to(_runs(tmp_path))) for p in _runs(tmp_path).rglob("*.parquet"))
    assert files == [
        f"{s}/2025/{s}_an_2025_{m}.parquet" for s in ("ES1", "ES2", "GC1", "GC2") for m in ("02", "03")
    ]
    monthly = pl.read_parquet([_runs(tmp_path) / f for f in files])
    assert monthly.sort("session", "date", "slot").equals(daily.sort("session", "date", "slot"))
    one = pl.read_parquet(_runs(tmp_path) / "ES2/2025/ES2_an_2025_03.parquet")
    assert one.select("date", "slot").is_unique().all() and one.equals(one.sort("date", "slot"))
    assert set(one["date"].dt.month()) == {3}
    assert ctx.counters == {"daily_files": n_daily, "monthly_files": 8, "rows": daily.height}
    logs = [m.msg for m in got if isinstance(m, LogMessage)]
    assert len(logs) == 8 and logs[0].startswith("Monthly file written: ES1_an_2025_02.parquet (")


def test_merges_with_existing_monthly_file(tmp_path: Path) -> None:
    _analyzed(tmp_path, ["NQ"], days=3, end=date(2025, 3, 5))  # 3..5 March
    merger.run(_ctx(tmp_path, "merger")[0])
    march = _runs(tmp_path) / "NQ2/2025/NQ2_an_2025_03.parquet"
    before = pl.read_parquet(march)
    # a fresh start for the bars (so the analyzer sees only 5..7 March): 5 March again, with other bars
    for path in (tmp_path / "data" / "processed").glob("*.parquet"):
        path.unlink()
    daily = _analyzed(tmp_path, ["NQ"], days=3, end=date(2025, 3, 7))
    ctx, _ = _ctx(tmp_path, "merger")
    merger.run(ctx)
    after = pl.read_parquet(march)
    assert sorted(set(after["date"])) == [date(2025, 3, d) for d in range(3, 8)]
    assert after.select("date", "slot").is_unique().all()
    # old rows kept; a day in both is taken from the newer daily file
    assert after.join(before.select("date", "slot"), on=["date", "slot"], how="semi").height == before.height
    assert after.filter(pl.col("date") < date(2025, 3, 5)).equals(before.filter(pl.col("date") < date(2025, 3, 5)))
    assert not after.filter(pl.col("date") == date(2025, 3, 5)).equals(before.filter(pl.col("date") == date(2025, 3, 5)))
    new_nq2 = daily.filter(pl.col("session") == "NQ2").sort("date", "slot")
    assert after.filter(pl.col("date") >= date(2025, 3, 5)).equals(new_nq2)
    assert ctx.counters["monthly_files"] == 2
    assert not list(_runs(tmp_path).rglob("*_an_????_??_??.parquet"))


def test_unreadable_daily_file_is_kept_and_named(tmp_path: Path) -> None:
    _analyzed(tmp_path, ["CL"])
    bad = _runs(tmp_path) / "CL1/2025/CL1_an_2025_03_04.parquet"
    bad.write_bytes(b"not parquet")
    march_cl1 = sorted((_runs(tmp_path) / "CL1/2025").glob("CL1_an_2025_03_??.parquet"))
    ctx, _ = _ctx(tmp_path, "merger")
    with pytest.raises(DemoDataError) as info:
        merger.run(ctx)
    assert f"{bad}: cannot read it as Parquet" in str(info.value)
    assert "1 month(s) not merged" in str(info.value)
    # that month is untouched, all its daily files kept; the other months were merged
    assert all(p.exists() for p in march_cl1)
    assert not (_runs(tmp_path) / "CL1/2025/CL1_an_2025_03.parquet").exists()
    assert (_runs(tmp_path) / "CL2/2025/CL2_an_2025_03.parquet").exists()
    assert ctx.counters["monthly_files"] == 3


def test_foreign_parquet_is_refused(tmp_path: Path) -> None:
    folder = _runs(tmp_path) / "ES1" / "2025"
    folder.mkdir(parents=True)
    pl.DataFrame({"x": [1]}).write_parquet(folder / "ES1_an_2025_03_03.parquet")
    with pytest.raises(DemoDataError, match="not an analyzer result file"):
        merger.run(_ctx(tmp_path, "merger")[0])


def test_nothing_to_do(tmp_path: Path) -> None:
    ctx, got = _ctx(tmp_path, "merger")
    merger.run(ctx)
    assert ctx.counters == {} and "nothing to merge" in got[0].msg
