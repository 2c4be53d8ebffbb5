"""The baselines' producers: the same tick events at the same rate as runwire's load stage (bench/e2e_load.py),
in runwire's event shape (run_id, seq, timestamp, stage, event, msg, data): `queued`, the ticks, then
the pipeline's `success`.

- `jsonl`: appended to `<dir>/pipeline_<run_id>.jsonl` as a stage would via a journal (runwire's own
  JournalWriter: one line per write, in the OS before the next), for the polling design to find;
- `redis`: PUBLISHed to the channel `events`, the commands of each 1 ms tick sent together (a pipeline).

    python -m bench.baselines.producers jsonl|redis TARGET RUN_ID RATE COUNT
prints `ready`, starts on a line `go` on stdin, prints `done SECONDS` and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench.e2e_load import STAGE, TICK, pace, tick_data  # noqa: E402
from shared.events import Event, now_timestamp  # noqa: E402
from shared.journal import JournalWriter, begin_run  # noqa: E402

TZ = ZoneInfo("UTC")


def jsonl(journal_dir: Path, run_id: str, rate: float, count: int) -> float:
    print("ready", flush=True)
    sys.stdin.readline()
    begin_run(journal_dir, run_id, TZ, "load", {}, {"trigger": "manual"})
    with JournalWriter.open(journal_dir, run_id, TZ) as w:
        seconds = pace(rate, count, lambda i: w.append(STAGE, "metric", TICK, tick_data(i)))
        w.append("pipeline", "success", "done")
    return seconds


def to_redis(port: int, run_id: str, rate: float, count: int) -> float:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    pipe = r.pipeline(transaction=False)
    encode = msgspec.json.Encoder().encode
    seq = 0

    def publish(stage: str, event: str, msg: str, data: dict | None = None) -> None:
        nonlocal seq
        seq += 1
        ev = Event(run_id=run_id, seq=seq, timestamp=now_timestamp(TZ), stage=stage, event=event, msg=msg, data=data)
        pipe.publish("events", encode(ev))

    print("ready", flush=True)
    sys.stdin.readline()
    publish("pipeline", "queued", "load queued (manual)", {"pipeline": "load"})
    pipe.execute()
    seconds = pace(rate, count, lambda i: publish(STAGE, "metric", TICK, tick_data(i)), flush=pipe.execute)
    publish("pipeline", "success", "done")
    pipe.execute()
    r.close()
    return seconds


if __name__ == "__main__":
    kind, target, run_id, rate, count = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    took = jsonl(Path(target), run_id, rate, count) if kind == "jsonl" else to_redis(int(target), run_id, rate, count)
    print(f"done {took:.3f}", flush=True)
