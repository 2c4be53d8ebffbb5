"""The archive's row: one event, every field kept (`data` as its JSON text), plus columns taken from
`data` and the run for fast scans: the pipeline, the run's queued time, the fan-out item, the attempt,
elapsed seconds and return codes where present, and the duration of each ended span (run, stage, item)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import msgspec
import pyarrow as pa

from shared.events import PIPELINE_STAGE, Event

SCHEMA_VERSION = "1"
END_KINDS = frozenset({"success", "failure", "skipped", "cancelled"})
_INT64 = (-(2**63), 2**63 - 1)

SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("timestamp", pa.string(), nullable=False),  # as journaled (RFC 3339 with its offset)
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("event", pa.string(), nullable=False),
    pa.field("msg", pa.string(), nullable=False),
    pa.field("data", pa.string()),  # the event's data object as JSON, null when it had none
    pa.field("pipeline", pa.string(), nullable=False),  # from the run's `queued` event
    pa.field("run_ts", pa.timestamp("us", tz="UTC"), nullable=False),  # the run's `queued` time
    pa.field("item", pa.string()),  # data.item
    pa.field("attempt", pa.int64()),  # data.attempt
    pa.field("elapsed_s", pa.float64()),  # data.elapsed_s
    pa.field("returncode", pa.int64()),  # data.returncode
    # an end event (success/failure/skipped/cancelled) of the run, a stage or an item: seconds since
    # that span's `start` (null without one, e.g. a stage skipped before it started)
    pa.field("duration_s", pa.float64()),
], metadata={"runwire.archive.schema": SCHEMA_VERSION})

_json = msgspec.json.Encoder()


class NotArchivable(ValueError):
    """The events cannot form an archived run (empty, or no terminal event)."""


def to_us(ts: str) -> int:
    moment = datetime.fromisoformat(ts)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {ts!r} has no UTC offset")
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def day_of(us: int) -> str:
    return datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).strftime("%Y-%m-%d")


def _int(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool) and _INT64[0] <= v <= _INT64[1]:
        return v
    return None


def _float(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


class RunRows:
    """A run's events as an Arrow table, with what the ledger records about the run."""

    def __init__(self, run_id: str, pipeline: str, run_us: int, status: str, table: pa.Table) -> None:
        self.run_id = run_id
        self.pipeline = pipeline
        self.run_us = run_us
        self.status = status
        self.table = table

    @property
    def day(self) -> str:
        return day_of(self.run_us)


def run_table(run_id: str, events: Sequence[Event]) -> RunRows:
    """The archive rows of one ended run (events in seq order, as a journal reader yields them)."""
    if not events:
        raise NotArchivable(f"run {run_id}: no events")
    last = events[-1]
    if not last.is_terminal:
        raise NotArchivable(f"run {run_id}: not ended (last event seq {last.seq} is {last.stage} {last.event})")
    first = events[0]
    queued = first.data or {}
    pipeline = str(queued.get("pipeline") or "") if first.event == "queued" else ""
    pipeline = pipeline or "unknown"
    run_us = to_us(first.timestamp)
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    starts: dict[tuple[str, str | None], int] = {}
    for ev in events:
        data = ev.data
        us = to_us(ev.timestamp)
        item = data.get("item") if data else None
        item = None if item is None else str(item)
        key = (ev.stage, item)
        duration = None
        if ev.event == "start":
            starts[key] = us
        elif ev.event in END_KINDS and (ev.stage != PIPELINE_STAGE or ev.is_terminal or ev.event == "skipped"):
            began = starts.pop(key, None)
            if began is not None:
                duration = (us - began) / 1e6
        cols["run_id"].append(ev.run_id)
        cols["seq"].append(ev.seq)
        cols["timestamp"].append(ev.timestamp)
        cols["ts"].append(us)
        cols["stage"].append(ev.stage)
        cols["event"].append(ev.event)
        cols["msg"].append(ev.msg)
        cols["data"].append(None if data is None else _json.encode(data).decode())
        cols["item"].append(item)
        cols["attempt"].append(_int(data.get("attempt")) if data else None)
        cols["elapsed_s"].append(_float(data.get("elapsed_s")) if data else None)
        cols["returncode"].append(_int(data.get("returncode")) if data else None)
        cols["duration_s"].append(duration)
    n = len(events)
    cols["pipeline"] = [pipeline] * n
    cols["run_ts"] = [run_us] * n
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    return RunRows(run_id, pipeline, run_us, last.event, table)
