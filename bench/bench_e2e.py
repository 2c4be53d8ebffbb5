"""End to end, where the user stands: a stage's `ctx.metric(...)` -> runner -> journal -> PUB -> gateway ->
client, against the seeds' polling design and a Redis pub/sub gateway, on the same events, at the same
rates, read by the same clients (bench/e2e_clients.py). Writes bench/RESULTS.md.

Workloads (sizes in `Sizes`; --quick is a ~1 minute smoke run):
- latency at 1k and 10k events/s: WebSocket for every system; runwire also SSE and a plain ZeroMQ SUB;
  per-service CPU seconds and peak RSS;
- the highest rate held `hold_seconds` with nothing lost, stepping up a ladder of rates;
- fan-out to 100 and 500 WebSocket clients at 1k/s (clients in several processes; 1 in 10 times every
  event, the rest count);
- runwire only (the others have no such feature): a client away for 100,000 events resuming with its
  cursor; the replay of a 1,000,000-event run.
Latency and fan-out runs are interleaved across systems (rep 1 of each, then rep 2 ...), so that each
system sees the same moments of a shared, noisy host; medians with min-max.

    python -m bench e2e [--quick] [--systems runwire redis polling] [--only latency held fanout resume replay]
                        [--repeat N] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import e2e_workloads as w  # noqa: E402
from bench.bench_gateway import Steal  # noqa: E402
from bench.e2e_report import render  # noqa: E402
from bench.e2e_systems import SYSTEMS, Runwire, System  # noqa: E402

PARTS = ("latency", "held", "fanout", "resume", "replay")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclasses.dataclass
class Sizes:
    rates: tuple[int, ...] = (1_000, 10_000)
    seconds: float = 3.0  # per latency run
    ladder: tuple[int, ...] = (10_000, 20_000, 30_000, 40_000, 50_000, 75_000, 100_000)  # every system held 5k in every run
    hold_seconds: float = 10.0
    fanout: tuple[int, ...] = (100, 500)
    fanout_rate: int = 1_000
    fanout_seconds: float = 3.0
    fanout_procs: int = 4
    resume_events: int = 100_000
    replay_events: int = 1_000_000
    repeat: int = 3


FULL = Sizes()
QUICK = Sizes(seconds=1.0, ladder=(5_000, 20_000, 50_000), hold_seconds=2.0, fanout=(100,), fanout_seconds=1.0,
              resume_events=20_000, replay_events=100_000, repeat=1)


async def run_benchmark(sizes: Sizes, systems: list[str], parts: list[str], out: Path | None,
                        log: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))  # 500 clients; the services inherit it
    res: dict[str, Any] = {"sizes": dataclasses.asdict(sizes), "systems": systems, "parts": parts, "steal": {},
                           "latency": {}, "latency_other": {}, "held": {}, "fanout": {}, "resume": [], "replay": [], "replay_first": [], "replay_cold": [], "beside_replay": [],
                           "versions": {}}
    t_start = time.perf_counter()
    steal = Steal()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        up: dict[str, System] = {}
        try:
            for name in systems:
                up[name] = SYSTEMS[name](tmp)
                if hasattr(up[name], "version"):
                    res["versions"][name] = up[name].version()  # type: ignore[attr-defined]
            if "latency" in parts:
                for rate in sizes.rates:
                    for rep in range(sizes.repeat):
                        for name, system in up.items():
                            r = await w.latency(system, rate, sizes.seconds)
                            res["latency"].setdefault(name, {}).setdefault(str(rate), []).append(r)
                            log(f"latency {name:<8} {rate:>6,}/s #{rep + 1}: " + _line(r))
                    if "runwire" in up:  # runwire's other clients, together, once: not beside the compared WebSocket
                        r = await w.latency(up["runwire"], rate, sizes.seconds, ("sse", "zmq"))
                        res["latency_other"].setdefault(str(rate), []).append(r)
                        log(f"latency runwire  {rate:>6,}/s sse+zmq: " + _line(r))
                res["steal"]["latency"] = steal.since_last()
            if "held" in parts:
                for name, system in up.items():
                    for rate in sizes.ladder:
                        r = await w.held(system, rate, sizes.hold_seconds)
                        res["held"].setdefault(name, []).append(r)
                        log(f"held    {name:<8} {rate:>6,}/s for {sizes.hold_seconds:g}s: {'held' if r['held'] else 'NOT held'}: "
                            + _line(r) + f" emit span {r['ws']['emit_span_s']:.2f}s, last tick {r['ws']['last_latency_s'] * 1000:.0f} ms late"
                            + (f"; {r['failed']}" if r["failed"] else ""))
                        if not r["held"]:
                            break
                res["steal"]["held"] = steal.since_last()
            if "fanout" in parts:
                for n in sizes.fanout:
                    for rep in range(sizes.repeat):
                        for name, system in up.items():
                            r = await w.fanout(system, n, sizes.fanout_rate, sizes.fanout_seconds, sizes.fanout_procs)
                            res["fanout"].setdefault(name, {}).setdefault(str(n), []).append(r)
                            log(f"fan-out {name:<8} {n:>4} clients #{rep + 1}: " + _line(r)
                                + f" clients' CPU {r['ws']['client_cpu_s']:.1f}s")
                res["steal"]["fanout"] = steal.since_last()
            rw = up.get("runwire")
            if "resume" in parts and isinstance(rw, Runwire):
                for rep in range(sizes.repeat):
                    r = await w.resume(rw, sizes.resume_events)
                    res["resume"].append(r)
                    log(f"resume  runwire away {r['away']:,} events #{rep + 1}: {r['received']:,} in {r['seconds']:.2f}s"
                        f" = {r['rate']:,.0f}/s, exact {r['exact']}")
                res["steal"]["resume"] = steal.since_last()
            if "replay" in parts and isinstance(rw, Runwire):
                t0 = time.perf_counter()
                run_id = await anyio.to_thread.run_sync(w.write_long_run, rw.journal_dir, sizes.replay_events)
                log(f"(wrote a {sizes.replay_events:,}-tick journal in {time.perf_counter() - t0:.1f}s; the gateway "
                    f"indexed it and went quiet {await w.indexed(rw, run_id):.1f}s later)")
                steal.since_last()
                for rep in range(sizes.repeat):
                    r = await w.replay(rw, run_id)
                    res["replay"].append(r)
                    log(f"replay  runwire {r['received']:,} events #{rep + 1}: {r['seconds']:.2f}s = {r['rate']:,.0f}/s,"
                        f" exact {r['exact']} (gateway CPU {r['gateway_cpu_s']:.2f}s, client CPU {r['client_cpu_s']:.2f}s)")
                for key, forget, what in (("replay_first", False, "first after a gateway restart"),
                                          ("replay_cold", True, "first after a restart, kept blocks removed")):
                    for rep in range(sizes.repeat):  # the gateway delivered the run (its fill): now one that did not
                        await anyio.to_thread.run_sync(rw.restart_gateway, forget)
                        await w.indexed(rw, run_id)
                        r = await w.replay(rw, run_id)
                        res[key].append(r)
                        log(f"replay  runwire {what} #{rep + 1}: {r['seconds']:.2f}s = {r['rate']:,.0f}/s,"
                            f" exact {r['exact']} (gateway CPU {r['gateway_cpu_s']:.2f}s)")
                for rep in range(sizes.repeat):
                    r = await w.live_beside_replay(rw, run_id, sizes.rates[0], sizes.seconds)
                    res["beside_replay"].append(r)
                    log(f"live    runwire {sizes.rates[0]:,}/s beside replays #{rep + 1}: ws p50 {r['ws']['p50']:.2f} ms"
                        f" p99 {r['ws']['p99']:.2f} ms exact {r['ws']['exact']}/{r['ws']['clients']},"
                        f" {r['replays']} replay(s) done meanwhile")
                res["steal"]["replay"] = steal.since_last()
        finally:
            for system in up.values():
                system.stop()
    res["elapsed_s"] = time.perf_counter() - t_start
    log(f"(benchmark took {res['elapsed_s']:.0f}s)")
    if out is not None:
        out.write_text(render(res, command))
        log(f"wrote {out}")
    return res


def _line(r: dict[str, Any]) -> str:
    parts = []
    for kind in ("ws", "sse", "zmq"):
        if kind in r:
            c = r[kind]
            parts.append(f"{kind} p50 {c['p50']:.2f} ms p99 {c['p99']:.2f} ms exact {c['exact']}/{c['clients']}"
                         f" ({c['received']:,}/{c['expected']:,})")
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_event"].items())
    return "; ".join(parts) + f"; CPU us/event: {cpu}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each (~1 minute)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=["runwire", "redis", "polling"])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeat", type=int, help="runs of each latency, fan-out, resume and replay figure")
    parser.add_argument("--out", type=Path, help=f"where to write the results (default {RESULTS.name} for a full run; "
                        "a --quick run writes none unless asked)")
    for field in dataclasses.fields(Sizes):  # every size can be set: --seconds 2 --fanout 10 20 ...
        if field.name == "repeat":
            continue
        default = getattr(FULL, field.name)
        if isinstance(default, tuple):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, nargs="+", dest=field.name)
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), dest=field.name)
    a = parser.parse_args(argv)
    sizes = dataclasses.replace(QUICK if a.quick else FULL)
    for field in dataclasses.fields(Sizes):
        value = getattr(a, field.name, None)
        if value is not None:
            setattr(sizes, field.name, tuple(value) if isinstance(value, list) else value)
    out = a.out if a.out is not None else (None if a.quick else RESULTS)
    command = "python -m bench e2e " + " ".join(sys.argv[1:])
    anyio.run(run_benchmark, sizes, a.systems, a.only, out, lambda line: print(line, flush=True), command.strip())


if __name__ == "__main__":
    main()
