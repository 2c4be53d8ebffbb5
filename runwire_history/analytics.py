"""History analytics over the archive with polars: for one pipeline and a time window (runs queued in
it), the runs, their outcomes and success rate, duration p50/p95/max, the same for each stage and
fan-out item, the trend against the window before, the slowest and the failing items, skipped slots and
their reasons, and the newest runs with their stages' durations (the dashboard's chart).

Only end rows (success/failure/skipped/cancelled) are read: they carry each span's `duration_s`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from .ledger import Ledger, archive_lock

WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_WINDOW_RE = re.compile(r"([0-9]{1,7})([smhdw])", re.ASCII)
MAX_WINDOW_S = 3660 * 86400
RECENT_RUNS = 200  # runs listed with their stages (the chart)
TOP_ITEMS = 5
_COLUMNS = ["run_id", "run_ts", "stage", "event", "item", "duration_s", "msg"]
_RUN_ENDS = ["success", "failure", "cancelled"]


class BadWindow(ValueError):
    """A window that is not like 7d, 24h, 90m, 30s or 2w."""


def parse_window(text: str) -> int:
    """'7d' -> 604800 seconds (ASCII digits and one unit of s, m, h, d, w; at most ten years)."""
    m = _WINDOW_RE.fullmatch(text)
    if m is None:
        raise BadWindow(f"expected a window like 7d, 24h, 90m, 30s or 2w, got {text[:40]!r}")
    seconds = int(m.group(1)) * WINDOW_UNITS[m.group(2)]
    if not 0 < seconds <= MAX_WINDOW_S:
        raise BadWindow(f"window {text!r} must be longer than zero and at most {MAX_WINDOW_S // 86400} days")
    return seconds


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat()


def _r(v: float | None, nd: int = 6) -> float | None:
    return None if v is None else round(float(v), nd)


@dataclass(frozen=True)
class Query:
    pipeline: str
    window: str = "7d"
    stage: str | None = None
    now_us: int | None = None  # default: now


def _stats(df: pl.DataFrame) -> dict[str, Any]:
    """Counts by outcome and duration percentiles of end rows."""
    counts = {k: 0 for k in ("success", "failure", "cancelled", "skipped")}
    for kind, n in df.group_by("event").len().iter_rows():
        counts[kind] = n
    durations = df.get_column("duration_s").drop_nulls()
    ran = counts["success"] + counts["failure"] + counts["cancelled"]
    return {
        "runs": ran + counts["skipped"], **counts,
        "success_rate": _r(counts["success"] / ran, 4) if ran else None,
        "duration_s": {"p50": _r(durations.quantile(0.5, "linear")), "p95": _r(durations.quantile(0.95, "linear")),
                       "max": _r(durations.max())},  # type: ignore[arg-type]
    }


def _change(cur: dict[str, Any], prev: dict[str, Any]) -> dict[str, Any]:
    def pct(a: float | None, b: float | None) -> float | None:
        return _r((a / b - 1) * 100, 1) if a is not None and b else None

    rate = (_r(cur["success_rate"] - prev["success_rate"], 4)
            if cur["success_rate"] is not None and prev["success_rate"] is not None else None)
    return {"runs": cur["runs"] - prev["runs"], "success_rate": rate,
            "p50_pct": pct(cur["duration_s"]["p50"], prev["duration_s"]["p50"]),
            "p95_pct": pct(cur["duration_s"]["p95"], prev["duration_s"]["p95"])}


def _with_trend(cur: pl.DataFrame, prev: pl.DataFrame) -> dict[str, Any]:
    a, b = _stats(cur), _stats(prev)
    return {**a, "previous": b, "change": _change(a, b)}


def _skip_kind(reason: str) -> str:
    m = re.match(r"[a-z_]+", reason)
    return m.group(0) if m else "other"


def load_ends(archive_dir: Path, pipeline: str, since_us: int, until_us: int) -> pl.DataFrame:
    """End rows of the pipeline's runs queued in [since, until) (blocking: a worker thread)."""
    with archive_lock(archive_dir, exclusive=False), Ledger(archive_dir, create=False) as ledger:
        files = [str(archive_dir / f.name) for f in ledger.files(pipeline=pipeline, since_us=since_us)
                 if f.first_us < until_us]
        if not files:
            return pl.DataFrame(schema={"run_id": pl.String, "run_ts": pl.Int64, "stage": pl.String, "event": pl.String,
                                        "item": pl.String, "duration_s": pl.Float64, "msg": pl.String})
        return (pl.scan_parquet(files)
                .select(_COLUMNS)
                .with_columns(pl.col("run_ts").dt.epoch("us"))
                .filter(pl.col("event").is_in(["success", "failure", "skipped", "cancelled"])
                        & (pl.col("run_ts") >= since_us) & (pl.col("run_ts") < until_us))
                .collect())


def history(archive_dir: Path, q: Query) -> dict[str, Any]:
    """The history report of one pipeline (blocking: a worker thread)."""
    window_s = parse_window(q.window)
    now_us = q.now_us if q.now_us is not None else int(time.time() * 1_000_000)
    start_us = now_us - window_s * 1_000_000
    prev_us = start_us - window_s * 1_000_000
    df = load_ends(archive_dir, q.pipeline, prev_us, now_us + 1)
    df = df.with_columns((pl.col("run_ts") >= start_us).alias("cur"))

    pipe = df.filter(pl.col("stage") == "pipeline")
    skipped_ids = pipe.filter(pl.col("event") == "skipped").get_column("run_id")
    slots = pipe.filter(pl.col("event") == "skipped")
    runs = pipe.filter(pl.col("event").is_in(_RUN_ENDS) & ~pl.col("run_id").is_in(skipped_ids.implode()))
    stages = df.filter((pl.col("stage") != "pipeline") & pl.col("item").is_null())
    items = df.filter(pl.col("item").is_not_null())
    if q.stage is not None:
        stages = stages.filter(pl.col("stage") == q.stage)
        items = items.filter(pl.col("stage") == q.stage)

    summary = _with_trend(runs.filter("cur"), runs.filter(~pl.col("cur")))
    stage_rows = []
    for name in sorted(set(stages.get_column("stage").to_list()) | set(items.get_column("stage").to_list())):
        one = stages.filter(pl.col("stage") == name)
        stage_rows.append({"stage": name, **_with_trend(one.filter("cur"), one.filter(~pl.col("cur")))})

    cur_items = items.filter("cur")
    item_rows = (cur_items.group_by(["stage", "item"]).agg(
        pl.len().alias("runs"),
        (pl.col("event") == "failure").sum().alias("failures"),
        (pl.col("event") == "success").sum().alias("successes"),
        pl.col("duration_s").quantile(0.5, "linear").alias("p50"),
        pl.col("duration_s").quantile(0.95, "linear").alias("p95"),
        pl.col("duration_s").max().alias("max"),
        pl.col("msg").filter(pl.col("event") == "failure").last().alias("last_failure"),
    ).sort(["stage", "item"]))
    item_list = [{"stage": r["stage"], "item": r["item"], "runs": r["runs"], "failures": r["failures"],
                  "success_rate": _r(r["successes"] / r["runs"], 4) if r["runs"] else None,
                  "duration_s": {"p50": _r(r["p50"]), "p95": _r(r["p95"]), "max": _r(r["max"])},
                  "last_failure": r["last_failure"]} for r in item_rows.iter_rows(named=True)]
    slowest = sorted((i for i in item_list if i["duration_s"]["p95"] is not None),
                     key=lambda i: (-i["duration_s"]["p95"], i["stage"], i["item"]))[:TOP_ITEMS]
    failing = sorted((i for i in item_list if i["failures"]),
                     key=lambda i: (-i["failures"], i["stage"], i["item"]))[:TOP_ITEMS]

    cur_slots = slots.filter("cur").sort("run_ts")
    reasons = cur_slots.get_column("msg").to_list()
    by_kind: dict[str, int] = {}
    for reason in reasons:
        by_kind[_skip_kind(reason)] = by_kind.get(_skip_kind(reason), 0) + 1
    recent_slots = [{"run_id": r, "queued_at": _iso(t), "reason": m}
                    for r, t, m in cur_slots.select(["run_id", "run_ts", "msg"]).tail(20).iter_rows()]

    recent = runs.filter("cur").sort(["run_ts", "run_id"]).tail(RECENT_RUNS)
    ids = recent.get_column("run_id")
    per_stage: dict[str, dict[str, float | None]] = {}
    for rid, name, dur in stages.filter(pl.col("run_id").is_in(ids.implode())).select(["run_id", "stage", "duration_s"]).iter_rows():
        per_stage.setdefault(rid, {})[name] = _r(dur)
    recent_list = [{"run_id": rid, "queued_at": _iso(t), "status": ev, "duration_s": _r(d), "stages": per_stage.get(rid, {})}
                   for rid, t, ev, d in recent.select(["run_id", "run_ts", "event", "duration_s"]).iter_rows()]

    return {
        "pipeline": q.pipeline, "stage": q.stage, "since": q.window, "window_s": window_s,
        "window": {"from": _iso(start_us), "to": _iso(now_us)},
        "previous_window": {"from": _iso(prev_us), "to": _iso(start_us)},
        "summary": summary, "stages": stage_rows, "items": item_list,
        "slowest_items": slowest, "failing_items": failing,
        "skipped_slots": {"count": len(reasons),
                          "by_reason": [{"reason": k, "count": n} for k, n in sorted(by_kind.items(), key=lambda kv: -kv[1])],
                          "recent": recent_slots},
        "recent_runs": recent_list,
    }
