"""The translator stage, called in-process with a collecting context on real files in a temp home."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from runwire_demo import data, translator
from runwire_demo.files import BAR_SCHEMA, DemoDataError
from shared.stage import CountersMessage, LogMessage, MetricMessage, StageInfo, collecting_context

END = date(2025, 3, 14)
CHICAGO = ZoneInfo("America/Chicago")


def _run(home: Path):
    ctx, got = collecting_context(StageInfo(run_id="t1", stage="translator", home=str(home)))
    translator.run(ctx)
    return ctx, got


def _raw(home: Path) -> Path:
    return home / "data" / "raw"


def _processed(home: Path) -> Path:
    return home / "data" / "processed"


def test_translates_and_removes_raw_files(tmp_path: Path) -> None:
    files = data.generate(_raw(tmp_path), days=4, end=END, instruments=["ES", "CL"])
    csv_rows = {f.name.split("_")[0]: pl.read_csv(f).height for f in files}
    ctx, got = _run(tmp_path)
    out = sorted(p.name for p in _processed(tmp_path).iterdir())
    assert out == ["CL_2025.parquet", "ES_2025.parquet"]  # no staging or temp files left behind
    for name in out:
        frame = pl.read_parquet(_processed(tmp_path) / name)
        assert frame.schema == pl.Schema(BAR_SCHEMA)
        assert frame.height == csv_rows[name[:2]] == 4 * data.BARS_PER_DAY
        assert frame["timestamp"].is_sorted()
        # trading days 11..14 March: the first bar opens the session at 17:00 on the 10th, Chicago time
        assert frame["timestamp"][0] == datetime(2025, 3, 10, 17, 0, tzinfo=CHICAGO)
        assert frame["timestamp"][-1] == datetime(2025, 3, 14, 15, 59, tzinfo=CHICAGO)
    assert not list(_raw(tmp_path).iterdir())
    assert ctx.counters == {"files_read": 2, "rows": 2 * 4 * data.BARS_PER_DAY, "files_written": 2}
    logs = [m.msg for m in got if isinstance(m, LogMessage)]
    assert f"File written: ES_2025.parquet ({4 * data.BARS_PER_DAY:,} rows)" in logs
    assert any(m.startswith("Raw file removed after verification: CL_2025-03-11_2025-03-14.csv") for m in logs)
    assert any(isinstance(m, CountersMessage) for m in got)
    assert [m.data for m in got if isinstance(m, MetricMessage)][0] == {"raw_file_count": 2}


def test_merges_with_existing_file_without_duplicates(tmp_path: Path) -> None:
    data.generate(_raw(tmp_path), days=3, end=date(2025, 3, 12), instruments=["NQ"])
    _run(tmp_path)
    # an overlapping later export: 11-12 March again, plus 13-14 March
    data.generate(_raw(tmp_path), days=4, end=END, instruments=["NQ"])
    ctx, _ = _run(tmp_path)
    frame = pl.read_parquet(_processed(tmp_path) / "NQ_2025.parquet")
    assert frame.height == 5 * data.BARS_PER_DAY  # 10..14 March, each bar once
    assert frame["timestamp"].n_unique() == frame.height and frame["timestamp"].is_sorted()
    assert ctx.counters["files_written"] == 1


def test_splits_by_year(tmp_path: Path) -> None:
    data.generate(_raw(tmp_path), days=3, end=date(2025, 1, 2), instruments=["GC"])
    _run(tmp_path)
    years = {p.name: pl.read_parquet(p) for p in _processed(tmp_path).glob("*.parquet")}
    assert sorted(years) == ["GC_2024.parquet", "GC_2025.parquet"]
    assert (years["GC_2024.parquet"]["timestamp"].dt.year() == 2024).all()
    assert years["GC_2024.parquet"].height + years["GC_2025.parquet"].height == 3 * data.BARS_PER_DAY


def _corrupt(path: Path, line: int, column: int, value: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[line - 1].rstrip("\n").split(",")
    fields[column] = value
    lines[line - 1] = ",".join(fields) + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    ("line", "column", "value", "expected"),
    [
        (5000, 3, "12x.5", "line 5000, column 'low': cannot read '12x.5' as a number"),
        (77, 0, "2025-13-40 08:00:00", "line 77, column 'timestamp': cannot read"),
        (2, 5, "", "line 2, column 'volume': missing value"),
        (900, 5, "12.5", "line 900, column 'volume': cannot read '12.5' as an integer"),
        (30, 2, "1", "line 30: high/low do not bracket open/close"),
    ],
)
def test_malformed_file_fails_naming_it_and_is_kept(tmp_path: Path, line: int, column: int, value: str, expected: str) -> None:
    bad, good = data.generate(_raw(tmp_path), days=5, end=END, instruments=["ES", "YM"])
    _corrupt(bad, line, column, value)
    with pytest.raises(DemoDataError) as info:
        _run(tmp_path)
    assert str(bad) in str(info.value) and expected in str(info.value)
    assert bad.exists()
    # the good file went through and was removed; nothing was written for the bad one
    assert not good.exists()
    assert sorted(p.name for p in _processed(tmp_path).iterdir()) == ["YM_2025.parquet"]


def test_ragged_lines_and_bad_header_are_located(tmp_path: Path) -> None:
    (extra,) = data.generate(_raw(tmp_path), days=1, end=END, instruments=["CL"])
    lines = extra.read_text().splitlines(keepends=True)
    lines[41] = lines[41].rstrip("\n") + ",7\n"
    extra.write_text("".join(lines))
    header = _raw(tmp_path) / "NG_2025-03-14_2025-03-14.csv"
    header.write_text("time,open,high,low,close,volume\n2025-03-14 08:30:00,1,1,1,1,1\n")
    with pytest.raises(DemoDataError) as info:
        _run(tmp_path)
    message = str(info.value)
    assert "2 malformed raw file(s)" in message
    assert f"{extra}: line 42: 7 fields, expected 6" in message
    assert f"{header}: line 1: header is 'time,open,high,low,close,volume'" in message
    assert extra.exists() and header.exists()


def test_offset_timestamps_are_accepted(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw.mkdir(parents=True)
    (raw / "ES_2025-03-14_2025-03-14.csv").write_text(
        "timestamp,open,high,low,close,volume\n"
        "2025-03-14T08:30:00-05:00,1,2,1,2,3\n"
        "2025-03-14 08:31:00,2,2,1,1,4\n"
    )
    _run(tmp_path)
    frame = pl.read_parquet(_processed(tmp_path) / "ES_2025.parquet")
    assert frame["timestamp"].to_list() == [
        datetime(2025, 3, 14, 8, 30, tzinfo=CHICAGO),
        datetime(2025, 3, 14, 8, 31, tzinfo=CHICAGO),
    ]


def test_verification_refuses_an_output_missing_rows(tmp_path: Path) -> None:
    (raw,) = data.generate(_raw(tmp_path), days=2, end=END, instruments=["ES"])
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = translator.stage_csv(raw, staging)
    out = _processed(tmp_path)
    out.mkdir(parents=True)
    # a processed file that lost the last bar
    pl.read_parquet(staged.staged).select(list(BAR_SCHEMA)).head(-1).write_parquet(out / "ES_2025.parquet")
    with pytest.raises(DemoDataError, match=r"verification failed for ES_2025-03-13_2025-03-14.csv: 2,759 of 2,760"):
        translator.verify_in_outputs(staged, out)


def test_nothing_to_do_without_raw_files(tmp_path: Path) -> None:
    ctx, got = _run(tmp_path)
    assert ctx.counters == {}
    assert "nothing to translate" in got[0].msg


def test_a_csv_without_an_instrument_name_is_kept(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw.mkdir(parents=True)
    notes = raw / "notes.csv"
    notes.write_text("timestamp,open,high,low,close,volume\n")
    with pytest.raises(DemoDataError, match=r"notes.csv: cannot tell the instrument from the name"):
        _run(tmp_path)
    assert notes.exists()
