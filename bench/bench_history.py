"""History figures: a synthetic archive of 100,000 runs (one pipeline, 14 days: one merged file per
day, and a day of single-run files as the writer leaves them before compaction), then the time of the
history query (`history.analytics.history`) over a 7-day window and its previous window (every run
scanned), and over 14 days. Prints build figures and the query's first and median times; asserts
nothing. Goal: under 1 s for 100,000 runs."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from runwire_history.analytics import Query, history
from runwire_history.archive import COMPACT_AT, Archive, _write_atomic
from runwire_history.ledger import Ledger, archive_lock
from runwire_history.schema import SCHEMA

DAY_US = 86_400 * 1_000_000
ITEMS = ["ES", "NQ", "YM", "CL", "NG", "GC"]


def _template() -> pl.DataFrame:
    """One executed run's events: (stage, event, item, offset s, base duration s; flip: becomes a failure
    in a failing run)."""
    rows: list[tuple[str, str, str | None, float, float | None, bool]] = [
        ("pipeline", "queued", None, 0.0, None, False), ("pipeline", "start", None, 0.1, None, False),
        ("translator", "start", None, 0.2, None, False), ("translator", "log", None, 1.0, None, False),
        ("translator", "metric", None, 2.0, None, False), ("translator", "success", None, 4.0, 3.8, False),
        ("analyzer", "start", None, 4.1, None, False)]
    for n, item in enumerate(ITEMS):
        rows += [("analyzer", "start", item, 4.2 + n, None, False), ("analyzer", "log", item, 4.5 + n, None, False),
                 ("analyzer", "success", item, 6.0 + n, 1.5 + 0.3 * n, item == "NG")]
    rows += [("analyzer", "success", None, 12.0, 7.9, False), ("merger", "start", None, 12.1, None, False),
             ("merger", "success", None, 14.0, 1.9, False), ("pipeline", "success", None, 14.1, 14.0, True)]
    return pl.DataFrame(rows, schema=["stage", "event", "item", "offset", "base", "flip"], orient="row").with_row_index("seq", 1)


def synthetic(runs: int, days: int, end_us: int) -> pl.DataFrame:
    step = days * DAY_US // runs
    base = (pl.DataFrame({"i": pl.int_range(0, runs, eager=True)})
            .with_columns(run_ts=end_us - days * DAY_US + pl.col("i") * step,
                          run_id=pl.lit("bench-") + pl.col("i").cast(pl.String).str.zfill(7),
                          jitter=(pl.col("i").hash(7) % 1000).cast(pl.Float64) / 1000.0,
                          failing=(pl.col("i") % 20) == 0, slot_skipped=(pl.col("i") % 100) == 1))
    executed = base.filter(~pl.col("slot_skipped")).join(_template(), how="cross")
    skip = pl.DataFrame([("pipeline", "queued", 0.0), ("pipeline", "skipped", 0.0), ("pipeline", "cancelled", 0.0)],
                        schema=["stage", "event", "offset"], orient="row").with_row_index("seq", 1)
    skipped = base.filter(pl.col("slot_skipped")).join(skip, how="cross").with_columns(
        item=pl.lit(None, pl.String), base=pl.lit(None, pl.Float64), flip=pl.lit(False))
    df = pl.concat([executed, skipped.select(executed.columns)])
    dur = pl.col("base") * (1 + pl.col("jitter"))
    reason = "overlap: run bench-0000000 of this schedule is still active (overlap = skip)"
    return df.with_columns(
        seq=pl.col("seq").cast(pl.Int64),
        event=pl.when(pl.col("flip") & pl.col("failing")).then(pl.lit("failure")).otherwise(pl.col("event")),
        ts=pl.from_epoch(pl.col("run_ts") + (pl.col("offset") * (1 + pl.col("jitter")) * 1e6).cast(pl.Int64), "us"),
        duration_s=dur,
        msg=pl.when(pl.col("event") == "skipped").then(pl.lit(reason)).otherwise(pl.col("stage") + " " + pl.col("event")),
        data=pl.when(pl.col("item").is_not_null()).then(pl.lit('{"item":"') + pl.col("item") + '"}'),
        pipeline=pl.lit("market-data"), attempt=pl.lit(None, pl.Int64), elapsed_s=pl.lit(None, pl.Float64),
        returncode=pl.lit(None, pl.Int64),
    ).with_columns(
        ts=pl.col("ts").dt.replace_time_zone("UTC"),
        run_ts=pl.from_epoch("run_ts", "us").dt.replace_time_zone("UTC"),
    ).with_columns(timestamp=pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6f+00:00")).sort(["run_ts", "seq"])


def build(archive_dir: Path, df: pl.DataFrame) -> int:
    """One merged file per day, the last COMPACT_AT - 1 runs as single-run files; returns the file count."""
    df = df.with_columns(day=pl.col("run_ts").dt.strftime("%Y-%m-%d"))
    tail_ids = df.get_column("run_id").unique(maintain_order=True).tail(COMPACT_AT - 1)
    files = 0
    with archive_lock(archive_dir, exclusive=True), Ledger(archive_dir) as ledger:
        parts = [(f"day={d}/pipeline=market-data/part-bench.parquet", g.filter(~pl.col("run_id").is_in(tail_ids.implode())))
                 for (d,), g in df.group_by("day", maintain_order=True)]
        parts += [(f"day={g.get_column('day')[0]}/pipeline=market-data/run-{rid}.parquet", g)
                  for (rid,), g in df.filter(pl.col("run_id").is_in(tail_ids.implode())).group_by("run_id", maintain_order=True)]
        for name, g in parts:
            table = g.select(SCHEMA.names).to_arrow().cast(SCHEMA)
            _write_atomic(archive_dir, name, table)
            Archive._register_table(ledger, name, table)
            files += 1
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    end_us = int(time.time() * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        archive_dir = Path(tmp) / "archive"
        t0 = time.perf_counter()
        df = synthetic(args.runs, 14, end_us)
        t1 = time.perf_counter()
        files = build(archive_dir, df)
        t2 = time.perf_counter()
        size = sum(p.stat().st_size for p in archive_dir.rglob("*.parquet"))
        print(f"synthetic archive: {args.runs:,} runs, {df.height:,} events in {files} files, {size / 1e6:.1f} MB "
              f"(generated in {t1 - t0:.1f} s, written in {t2 - t1:.1f} s)")
        for window in ("7d", "14d"):
            times = []
            report = None
            for _ in range(args.repeat):
                t = time.perf_counter()
                report = history(archive_dir, Query("market-data", window, now_us=end_us + 1))
                times.append(time.perf_counter() - t)
            assert report is not None
            s = report["summary"]
            print(f"history --since {window}: {s['runs']:,} runs in the window + {s['previous']['runs']:,} before "
                  f"({report['skipped_slots']['count']:,} skipped slots): first {times[0]:.3f} s, "
                  f"median {statistics.median(times):.3f} s, min {min(times):.3f} s (goal < 1 s)")
        t = time.perf_counter()
        history(archive_dir, Query("market-data", "7d", stage="analyzer", now_us=end_us + 1))
        print(f"history --since 7d --stage analyzer: {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
