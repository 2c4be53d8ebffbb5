"""The end-to-end benchmark's quick mode, runwire only, with tiny sizes: the trio as subprocesses, the
load stage, every client kind. Checks that every event reached each client exactly once, in order, and
that RESULTS.md-style output is written; no timing is asserted (timings belong to the benchmark)."""

from __future__ import annotations

from pathlib import Path

from bench.bench_e2e import PARTS, QUICK, Sizes, run_benchmark


async def test_quick_benchmark_delivers_every_event_once_to_every_client(tmp_path: Path) -> None:
    sizes = Sizes(**{**QUICK.__dict__, "rates": (200,), "seconds": 0.5, "ladder": (500,), "hold_seconds": 0.5,
                     "fanout": (6,), "fanout_rate": 200, "fanout_seconds": 0.5, "fanout_procs": 2,
                     "resume_events": 300, "replay_events": 1_000, "repeat": 1})
    out = tmp_path / "RESULTS.md"
    res = await run_benchmark(sizes, ["runwire"], list(PARTS), out, log=lambda _line: None, command="smoke")

    (lat,) = res["latency"]["runwire"]["200"]  # one WebSocket client, as every system has
    (other,) = res["latency_other"]["200"]  # then runwire's SSE and ZeroMQ clients together
    assert "sse" not in lat and "ws" not in other
    for kind, run in (("ws", lat), ("sse", other), ("zmq", other)):
        c = run[kind]
        assert c["exact"] == c["clients"] == 1, (kind, c)
        assert c["received"] >= 100 + 2, (kind, c)  # 100 ticks, and the run's own events around them
    (step,) = res["held"]["runwire"]
    assert step["ws"]["exact"] == 1, step["ws"]
    (fan,) = res["fanout"]["runwire"]["6"]
    assert fan["ws"]["exact"] == fan["ws"]["clients"] == 6, fan["ws"]
    (resumed,) = res["resume"]
    assert resumed["exact"], resumed
    assert resumed["received"] >= 300, resumed
    (replayed,) = res["replay"]
    assert replayed["exact"] and replayed["received"] == 1_000 + 2, replayed
    (first,) = res["replay_first"]  # after a restart of the gateway
    assert first["exact"] and first["received"] == 1_000 + 2, first
    (cold,) = res["replay_cold"]  # after a restart with its kept blocks removed
    assert cold["exact"] and cold["received"] == 1_000 + 2, cold
    text = out.read_text()
    assert "## Latency" in text and "## Against the goals of issue 14" in text
