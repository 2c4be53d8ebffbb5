"""The merger stage: the analyzer's daily result files rolled into monthly files in the same folder,
`data/analyzer_runs/<INSTR><N>/<YYYY>/<INSTR><N>_an_<YYYY>_<MM>.parquet`.

Per month: the existing monthly file + that month's daily files, de-duplicated by (date, slot) (a daily
file is newer than the monthly file, a later day's file newer than an earlier one), sorted, written to a
temp file, re-read and checked (every daily row's key is there, no key twice, no row of the old monthly
file lost, all dates in the month), renamed into place; only then are the daily files deleted. A daily
file that cannot be read or does not hold the result schema is kept and named; its month is left as it
was; the other months are merged and the stage then fails listing the kept files.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import polars as pl

from shared.stage import StageContext

from .analyzer import RESULT_SCHEMA
from .files import DemoDataError, analyzer_runs_dir, commit, temp_path

log = logging.getLogger(__name__)

_DAILY_RE = re.compile(r"^([A-Z][A-Z0-9]{0,9})_an_(\d{4})_(\d{2})_(\d{2})\.parquet$")
_KEY = ["date", "slot"]


def run(ctx: StageContext) -> None:
    root = analyzer_runs_dir(ctx.data_dir)
    months: dict[Path, list[Path]] = defaultdict(list)
    for path in sorted(root.glob("*/*/*_an_*.parquet")):
        m = _DAILY_RE.match(path.name)
        if m:
            session, year, month, _ = m.groups()
            months[path.parent / f"{session}_an_{year}_{month}.parquet"].append(path)
    if not months:
        ctx.log(f"No daily result files in {root}: nothing to merge")
        return
    ctx.metric("Daily files found", daily_file_count=sum(len(v) for v in months.values()), months=len(months))
    kept: list[str] = []
    for target, dailies in sorted(months.items()):
        try:
            rows, total = merge_month(target, dailies)
        except DemoDataError as e:
            kept.append(str(e))
            ctx.log(f"Month not merged, daily files kept: {e}", file=target.name)
            continue
        for daily in dailies:
            daily.unlink()
        ctx.add("daily_files", len(dailies))
        ctx.add("monthly_files")
        ctx.add("rows", rows)
        ctx.log(
            f"Monthly file written: {target.name} ({total:,} rows; {rows:,} from {len(dailies)} daily files)",
            file=target.name, rows=total, daily_files=len(dailies),
        )
    if kept:
        raise DemoDataError(f"{len(kept)} month(s) not merged (fix or remove the named files, then run again):\n"
                            + "\n".join(kept))


def merge_month(target: Path, dailies: list[Path]) -> tuple[int, int]:
    """Merge `dailies` into `target` (temp file, checked, renamed); return (daily rows read, rows in target)."""
    year, month = (int(x) for x in target.stem.rsplit("_", 2)[-2:])
    new = _read_all(dailies)
    old = _read(target) if target.exists() else pl.DataFrame(schema=RESULT_SCHEMA)
    merged = (
        pl.concat([old, new], how="vertical")
        .unique(subset=_KEY, keep="last", maintain_order=True)
        .sort(_KEY)
    )
    tmp = temp_path(target)
    merged.write_parquet(tmp)
    got = pl.read_parquet(tmp)
    problems = []
    if got.height != got.select(_KEY).n_unique():
        problems.append("a (date, slot) appears twice")
    if got.join(new.select(_KEY).unique(), on=_KEY, how="semi").height != new.select(_KEY).n_unique():
        problems.append("rows of the daily files are missing")
    if got.join(old.select(_KEY), on=_KEY, how="semi").height != old.height:
        problems.append("rows of the previous monthly file are missing")
    if got.height and not ((got["date"].dt.year() == year) & (got["date"].dt.month() == month)).all():
        problems.append(f"dates outside {year}-{month:02d}")
    if problems:
        tmp.unlink(missing_ok=True)
        raise DemoDataError(f"{target}: written file failed its check: {'; '.join(problems)}")
    commit(tmp, target)
    return new.height, got.height


def _read_all(paths: list[Path]) -> pl.DataFrame:
    """All files at once (several times faster for small files); file by file only to name a bad one."""
    try:
        frame = pl.read_parquet(paths)
    except (pl.exceptions.PolarsError, OSError):
        frame = None
    if frame is None or frame.schema != pl.Schema(RESULT_SCHEMA):
        frame = pl.concat([_read(p) for p in paths], how="vertical")
    return frame


def _read(path: Path) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DemoDataError(f"{path}: cannot read it as Parquet: {e}") from e
    if frame.schema != pl.Schema(RESULT_SCHEMA):
        want = ", ".join(f"{k}: {v}" for k, v in RESULT_SCHEMA.items())
        have = ", ".join(f"{k}: {v}" for k, v in frame.schema.items())
        raise DemoDataError(f"{path}: not an analyzer result file (columns {have}; expected {want})")
    return frame
