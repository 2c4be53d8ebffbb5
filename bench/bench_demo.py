"""Timing of the demo pipeline's stages, in-process (no runner): the default demo data (median of a few
runs) and a large span (years of bars, millions of rows, once). Prints seconds and rows/s per stage.

    .venv/bin/python bench/bench_demo.py [--repeat 3] [--large-days 504] [--skip-large]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import polars as pl

from runwire_demo import analyzer, data, merger, translator
from shared.stage import StageInfo, collecting_context

END = date(2025, 12, 31)
STAGES = ("generate", "translator", "analyzer", "merger")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_run(days: int) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and rows handled per stage for one pipeline run over `days` trading days."""
    with tempfile.TemporaryDirectory(prefix="runwire-bench-") as tmp:
        home = Path(tmp)

        def ctx(stage: str, item: str | None = None):
            return collecting_context(StageInfo(run_id="bench", stage=stage, item=item, home=str(home)))[0]

        seconds: dict[str, float] = {}
        rows: dict[str, int] = {}
        seconds["generate"] = _timed(lambda: data.generate(home / "data" / "raw", days=days, end=END))
        rows["generate"] = len(data.ALL) * days * data.BARS_PER_DAY
        c = ctx("translator")
        seconds["translator"] = _timed(lambda: translator.run(c))
        rows["translator"] = int(c.counters["rows"])
        # the runner runs the six instruments two at a time (max_parallel = 2); here one after another
        counters: list[dict[str, float]] = []

        def analyze_all() -> None:
            for item in data.ALL:
                c = ctx("analyzer", item)
                analyzer.run(c)
                counters.append(c.counters)

        seconds["analyzer"] = _timed(analyze_all)
        rows["analyzer"] = rows["translator"]  # bars read
        c = ctx("merger")
        seconds["merger"] = _timed(lambda: merger.run(c))
        rows["merger"] = int(c.counters["rows"])
        trades = sum(x["trades"] for x in counters)
        print(f"    ({days} trading days: {rows['translator']:,} bars, {trades:,.0f} trades, "
              f"{int(c.counters['daily_files']):,} daily -> {int(c.counters['monthly_files'])} monthly files)")
        return seconds, rows


def report(title: str, runs: list[tuple[dict[str, float], dict[str, int]]]) -> None:
    print(title)
    for stage in STAGES:
        secs = statistics.median(r[0][stage] for r in runs)
        n = runs[0][1][stage]
        print(f"  {stage:<11} {secs:8.3f} s   {n:>11,} rows   {n / secs:>12,.0f} rows/s")
    total = statistics.median(sum(r[0][s] for s in STAGES[1:]) for r in runs)
    print(f"  {'pipeline':<11} {total:8.3f} s   (translator + analyzer + merger)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs on the default data (median shown)")
    parser.add_argument("--large-days", type=int, default=504, help="trading days of the large span (504 = 2 years)")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args(argv)
    print(f"polars {pl.__version__}, {pl.thread_pool_size()} threads")
    runs = [one_run(data.DEFAULT_DAYS) for _ in range(args.repeat)]
    report(f"default demo data ({data.DEFAULT_DAYS} trading days, median of {args.repeat}):", runs)
    if not args.skip_large:
        report(f"large span ({args.large_days} trading days, one run):", [one_run(args.large_days)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
