"""The end-to-end benchmark's load: one pacing loop, used by runwire's load stage (`emit`, a callable
stage: `ctx.metric` in the runner's child process) and by the baselines' producers, so every system
gets the same events at the same rate.

Each event is a `metric` named `tick` whose data carries `i` (0, 1, 2 ...) and `t`, the wall-clock
emit time in ns (time.time_ns), which the clients subtract from their own clock on arrival.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

STAGE = "load"
TICK = "tick"


def pace(rate: float, count: int, emit: Callable[[int], None], *, lead: int = 0, pause: float = 0.0,
         flush: Callable[[], None] | None = None) -> float:
    """Call emit(i) for i in 0..count-1 at `rate` per second (0: as fast as emit allows), in 1 ms ticks
    (no busy wait: the machine has two cores for everything). After the first `lead` events, sleep
    `pause` seconds (a resuming client leaves in that gap). `flush` runs at the end of each tick.
    Returns the seconds the paced part took."""
    i = 0
    if lead:
        for i in range(min(lead, count)):
            emit(i)
        i = min(lead, count)
        if flush:
            flush()
        time.sleep(pause)
    start = time.perf_counter()
    done_before = i
    while i < count:
        due = count if not rate else min(count, done_before + int((time.perf_counter() - start) * rate) + 1)
        while i < due:
            emit(i)
            i += 1
        if flush:
            flush()
        if rate and i < count:
            time.sleep(0.001)
    return time.perf_counter() - start


def tick_data(i: int) -> dict[str, Any]:
    return {"i": i, "t": time.time_ns()}


def emit(ctx: Any) -> None:
    """runwire's load stage: params `rate` (events/s, 0 = flat out), `count`, `lead`, `pause`."""
    p = ctx.params
    metric = ctx.metric
    pace(float(p["rate"]), int(p["count"]), lambda i: metric(TICK, i=i, t=time.time_ns()),
         lead=int(p["lead"]), pause=float(p["pause"]))


LOAD_PIPELINE = """
[pipelines.load]
description = "end-to-end benchmark load: metric events at a fixed rate"
[pipelines.load.params.rate]
type = "float"
default = 1000.0
[pipelines.load.params.count]
type = "int"
default = 1000
[pipelines.load.params.lead]
type = "int"
default = 0
[pipelines.load.params.pause]
type = "float"
default = 0.0
[[pipelines.load.stages]]
name = "load"
callable = "bench.e2e_load:emit"
timeout = 3600
progress_interval = 3600
"""
