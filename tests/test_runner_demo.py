"""The shipped demo pipeline (`market-data` in the repo's runwire.toml) run by a real runner on small
generated data: translator -> analyzer (fan-out over instruments) -> merger, Parquet files with rows,
and the expected event sequence.

A raw pyzmq ROUTER (tests/runner_peer.py) plays the scheduler's side of shared/dispatch.py (the real
scheduler is written in parallel); events are received on a plain pyzmq SUB.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pytest

from runwire_demo import data
from tests.harness import REPO
from tests.runner_peer import RunnerRig


def shipped_pipeline() -> str:
    text = (REPO / "runwire.toml").read_text()
    start = text.index("[pipelines.market-data]")
    end = text.find("[schedules", start)
    return text[start : end if end >= 0 else None]


@pytest.fixture
def rig(tmp_path: Path, services: list) -> RunnerRig:
    r = RunnerRig(tmp_path, shipped_pipeline(), services=services).start()
    yield r
    r.close()


def test_demo_market_data_pipeline(rig: RunnerRig) -> None:
    data.generate(rig.home / "data" / "raw", days=3, end=date(2025, 3, 14), instruments=["ES", "GC"])
    run_id, events, published = rig.run("market-data", {"instruments": ["ES", "GC"]}, timeout=110)
    outline = [(e.stage, e.event, (e.data or {}).get("item")) for e in events if e.event not in ("log", "metric")]
    assert outline[:4] == [("pipeline", "queued", None), ("pipeline", "start", None),
                           ("translator", "start", None), ("translator", "success", None)], outline
    analyzer = [x for x in outline if x[0] == "analyzer"]
    assert analyzer[0] == ("analyzer", "start", None) and analyzer[-1] == ("analyzer", "success", None)
    for item in ("ES", "GC"):
        assert [x[1] for x in analyzer if x[2] == item] == ["start", "success"], analyzer
    assert outline[-2:] == [("merger", "success", None), ("pipeline", "success", None)], outline
    assert [e["seq"] for e in published] == [e.seq for e in events[1:]]

    processed = sorted((rig.home / "data" / "processed").glob("*.parquet"))
    monthly = sorted((rig.home / "data" / "analyzer_runs").rglob("*.parquet"))
    assert processed and monthly
    for path in processed + monthly:
        assert pl.read_parquet(path).height > 0, path
    # the stages' counters reached the journal as metrics
    metrics = [e for e in events if e.event == "metric" and e.stage == "merger"]
    assert any((e.data or {}).get("monthly_files", 0) >= 1 for e in metrics), metrics
