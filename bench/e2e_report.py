"""bench/RESULTS.md from the end-to-end benchmark's results: the machine and versions, each system's
figures (medians with min-max), the ratios, and the figures against the goals of issue 14."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.e2e_workloads import median

NAMES = {"runwire": "runwire", "redis": "Redis pub/sub -> aiohttp", "polling": "seeds' polling design",
         "cluster": "runwire cluster mode (JetStream + PostgreSQL)"}
NO_FEATURE = {"redis": "no replay or resume: Redis pub/sub keeps nothing",
              "polling": "no cursor, no replay: the seeds' WebSocket streams from its subscription on"}


def machine() -> list[str]:
    model = mem = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
        mem = next((line.split(":", 1)[1].strip() for line in meminfo if line.startswith("MemTotal")), "")
    except OSError:
        pass
    versions = []
    for dist in ("aiohttp", "pyzmq", "msgspec", "anyio", "uvloop", "redis", "hiredis"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    try:
        import zmq

        versions.append(f"libzmq {zmq.zmq_version()}")
    except ImportError:
        pass
    return [f"- nproc {os.cpu_count()}, CPU {model or '?'}, memory {mem or '?'}, Linux {platform.release()}",
            f"- Python {platform.python_version()}; " + ", ".join(versions)]


def _f(m: tuple[float, float, float], digits: int = 2) -> str:
    med, lo, hi = m
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def _ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or a <= 0 or b <= 0:  # nan or nothing
        return "-"
    return f"{b / a:.1f}x" if b >= a else f"1/{a / b:.1f}x"


def _exact(runs: list[dict[str, Any]], kind: str = "ws") -> str:
    return f"{min(r[kind]['exact'] for r in runs)}/{runs[0][kind]['clients']}"


def render(res: dict[str, Any], command: str) -> str:
    s = res["sizes"]
    out = ["# End-to-end benchmark results", "",
           f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')}, in {res.get('elapsed_s', 0):.0f} s.", "",
           "Figures are medians of the runs with the spread (min-max) in brackets; latency is a tick's emit time",
           "(`time.time_ns()` in the stage or producer) to its arrival at the client, same host clock. CPU is",
           "per service, from /proc/<pid>/stat (runwire's gateway with its archive worker process), divided by",
           "the ticks of the run; peak RSS is VmHWM over the run.",
           "The machine is shared (other work was running on it during this run): host steal time per part:",
           ", ".join(f"{k} {v.strip(' []').removeprefix('host steal ')}" for k, v in res["steal"].items()) or "-", "",
           "## Machine", *machine(), *(f"- {k}-server {v}" for k, v in res["versions"].items()), "",
           "## Systems",
           "- **runwire**: scheduler, runner, gateway as subprocesses; the load a pipeline launched over the API whose",
           "  callable stage emits `ctx.metric('tick', i=..., t=time.time_ns())` (bench/e2e_load.py).",
           "- **Redis pub/sub -> aiohttp** (bench/baselines/redis_gateway.py): a redis-server of its own, a producer",
           "  process PUBLISHing each event (the commands of each 1 ms tick pipelined), one redis-py asyncio",
           "  subscription, `send_str` of each message to each client. **It has no replay and no resume.**",
           "- **seeds' polling design** (bench/baselines/polling.py): a producer appending JSONL lines through a",
           "  journal writer; a monitor scanning `pipeline_*.jsonl` every 2 s from stored offsets, `json.loads` per",
           "  line, dedupe on (run_id, line index), an in-process bus, `send_json` per event per client (aiohttp).",
           "  No cursor and no replay.",
           "- Every system: the same event shape, the same rates (bench/e2e_load.py's pacing), the same clients",
           "  (bench/e2e_clients.py). `exact` = clients that got every event once, in order, to the terminal one.", ""]
    lat = res["latency"]
    if lat:
        out += ["## Latency (one WebSocket client each)", "",
                f"{s['seconds']:g} s per run, {s['repeat']} runs per cell, each system serving one WebSocket client. runwire's SSE and"
                " ZeroMQ rows: one run per rate with those two clients together (the SSE client through the gateway, the"
                " ZeroMQ one on the runner's PUB socket); their CPU column is that run's.", "",
                "| system | client | rate | p50 ms | p99 ms | exact | CPU us/event per service | peak RSS MB |",
                "|---|---|---|---|---|---|---|---|"]
        cells = [(name, rate, runs) for name, by_rate in lat.items() for rate, runs in by_rate.items()]
        cells += [("runwire", rate, runs) for rate, runs in res.get("latency_other", {}).items()]
        for name, rate, runs in cells:
            first = True
            for kind in ("ws", "sse", "zmq"):
                if kind not in runs[0]:
                    continue
                cpu = ", ".join(f"{k} {_f(median(runs, 'cpu_us_per_event', k), 0)}" for k in runs[0]["cpu_us_per_event"])
                rss = ", ".join(f"{k} {max(r['peak_rss_mb'][k] for r in runs):.0f}" for k in runs[0]["peak_rss_mb"])
                out.append(f"| {NAMES[name]} | {kind} | {int(rate):,}/s | {_f(median(runs, kind, 'p50'))} |"
                           f" {_f(median(runs, kind, 'p99'))} | {_exact(runs, kind)} |"
                           f" {cpu if first else ''} | {rss if first else ''} |")
                first = False
        out.append("")
    if res["held"]:
        out += ["## Highest rate held with nothing lost", "",
                f"Each rung {s['hold_seconds']:g} s, one run per rung, stepping up until one is not held. Held: every",
                "event once in order, the ticks emitted at the rate (a stage slowed by its pipe to the runner is not),",
                "the last tick within 5 s of its emit.", "",
                "| system | highest held | its p99 ms | first not held | why |", "|---|---|---|---|---|"]
        for name, steps in res["held"].items():
            ok = [r for r in steps if r["held"]]
            bad = [r for r in steps if not r["held"]]
            why = ""
            if bad:
                c = bad[0]["ws"]
                why = ((f"{bad[0]['failed']}; " if bad[0].get("failed") else "")
                       + f"{c['received']:,}/{c['expected']:,} received, exact {c['exact']}, emit span {c['emit_span_s']:.1f} s,"
                       f" last tick {c['last_latency_s']:.2f} s late")
            best = f"{ok[-1]['rate']:,.0f}/s" if ok else f"< {steps[0]['rate']:,.0f}/s"
            best_p99 = f"{ok[-1]['ws']['p99']:.1f}" if ok else "-"
            first_bad = f"{bad[0]['rate']:,.0f}/s" if bad else "(ladder top)"
            out.append(f"| {NAMES[name]} | {best} | {best_p99} | {first_bad} | {why} |")
        out.append("")
    if res["fanout"]:
        out += [f"## Fan-out at {s['fanout_rate']:,}/s", "",
                f"{s['fanout_seconds']:g} s per run, clients in {s['fanout_procs']} processes (uvloop), 1 in 10 timing every"
                " event, the rest counting (each frame's first and last event decoded).", "",
                "| system | clients | p50 ms | p99 ms | complete (worst run) | server CPU us/event |", "|---|---|---|---|---|---|"]
        for name, by_n in res["fanout"].items():
            for n, runs in by_n.items():
                cpu = ", ".join(f"{k} {_f(median(runs, 'cpu_us_per_event', k), 0)}" for k in runs[0]["cpu_us_per_event"])
                out.append(f"| {NAMES[name]} | {int(n)} | {_f(median(runs, 'ws', 'p50'), 1)} | {_f(median(runs, 'ws', 'p99'), 1)} |"
                           f" {_exact(runs)} | {cpu} |")
        out.append("")
    if res["resume"] or res["replay"]:
        out += ["## runwire only", ""]
        for name in res["systems"]:
            if name in NO_FEATURE:
                out.append(f"- {NAMES[name]}: {NO_FEATURE[name]}.")
        if res["resume"]:
            r = res["resume"]
            out.append(f"- A client away for {s['resume_events']:,} events, back with its cursor: caught up in"
                       f" {_f(median(r, 'seconds'))} s = {_f(median(r, 'rate'), 0)} events/s; exact in"
                       f" {sum(x['exact'] for x in r)}/{len(r)} runs.")
        if res["replay"]:
            r = res["replay"]
            out.append(f"- Replay of a {s['replay_events']:,}-event run from seq 0 (`/ws/events/{{run_id}}?after_seq=0`),"
                       " written behind the gateway's back and delivered by its hub when found (its blocks learned:"
                       f" sent as they are): {_f(median(r, 'seconds'))} s = {_f(median(r, 'rate'), 0)} events/s; exact in"
                       f" {sum(x['exact'] for x in r)}/{len(r)} runs.")
        if res.get("replay_first"):
            r = res["replay_first"]
            out.append("- The same replay, the first after a restart of the gateway (the run's blocks loaded from what"
                       f" it kept in its state directory, each checked against its digest): {_f(median(r, 'seconds'))} s ="
                       f" {_f(median(r, 'rate'), 0)} events/s; exact in {sum(x['exact'] for x in r)}/{len(r)} runs.")
        if res.get("replay_cold"):
            r = res["replay_cold"]
            out.append("- The same replay after a restart with those kept blocks removed (a gateway that never saw the"
                       f" run: every line decoded and checked): {_f(median(r, 'seconds'))} s ="
                       f" {_f(median(r, 'rate'), 0)} events/s; exact in {sum(x['exact'] for x in r)}/{len(r)} runs.")
        if res.get("beside_replay"):
            r = res["beside_replay"]
            out.append(f"- A live WebSocket client at {r[0]['rate']:,.0f}/s while another client replays that run from seq 0"
                       f" again and again: p50 {_f(median(r, 'ws', 'p50'))} ms, p99 {_f(median(r, 'ws', 'p99'))} ms"
                       f" (alone: the latency table); exact {sum(x['ws']['exact'] for x in r)}/{len(r)};"
                       f" {sum(x['replays'] for x in r)} replays finished meanwhile.")
        out.append("")
    out += _ratios(res) + _goals(res)
    return "\n".join(out) + "\n"


def _med(res: dict[str, Any], part: str, name: str, key: str, *path: str) -> float:
    runs = res[part].get(name, {}).get(key)
    return median(runs, *path)[0] if runs else float("nan")


def _ratios(res: dict[str, Any]) -> list[str]:
    if "runwire" not in res["systems"] or len(res["systems"]) < 2:
        return []
    out = ["## Ratios (the other system's median / runwire's: 3.0x = runwire 3 times better, 1/3.0x = 3 times worse)", "",
           "| figure | " + " | ".join(NAMES[n] for n in res["systems"] if n != "runwire") + " |",
           "|---|" + "---|" * (len(res["systems"]) - 1)]
    others = [n for n in res["systems"] if n != "runwire"]
    for rate in map(str, res["sizes"]["rates"]):
        for q in ("p50", "p99"):
            if res["latency"]:
                base = _med(res, "latency", "runwire", rate, "ws", q)
                out.append(f"| WebSocket {q} at {int(rate):,}/s | "
                           + " | ".join(_ratio(base, _med(res, "latency", n, rate, "ws", q)) for n in others) + " |")
        if res["latency"]:
            base = sum(_med(res, "latency", "runwire", rate, "cpu_us_per_event", k) for k in ("runner", "gateway"))
            cells = []
            for n in others:
                runs = res["latency"].get(n, {}).get(rate)
                cells.append(_ratio(base, sum(median(runs, "cpu_us_per_event", k)[0] for k in runs[0]["cpu_us_per_event"]))
                             if runs else "-")
            out.append(f"| service CPU per event at {int(rate):,}/s (runner+gateway vs all of its services) | " + " | ".join(cells) + " |")
    if res["held"]:
        def top(n: str) -> float:
            ok = [r["rate"] for r in res["held"].get(n, []) if r["held"]]
            return ok[-1] if ok else float("nan")
        def at_top(n: str) -> str:
            steps = res["held"].get(n, [])
            return " (held the ladder's top: at least)" if steps and all(r["held"] for r in steps) else ""
        out.append("| highest rate held (runwire's / the other's) | "
                   + " | ".join(_ratio(top(n), top("runwire")) + at_top(n) for n in others) + " |")
    for n_clients in map(str, res["sizes"]["fanout"]):
        if res["fanout"]:
            base = _med(res, "fanout", "runwire", n_clients, "ws", "p99")
            out.append(f"| fan-out {n_clients} clients p99 | "
                       + " | ".join(_ratio(base, _med(res, "fanout", n, n_clients, "ws", "p99")) for n in others) + " |")
    return out + [""]


def _goals(res: dict[str, Any]) -> list[str]:
    if "runwire" not in res["systems"]:
        return []
    rows = []

    def row(goal: str, figure: str, met: bool | None) -> None:
        rows.append(f"| {goal} | {figure} | {'-' if met is None else ('met' if met else 'not met')} |")

    lat = res["latency"].get("runwire", {})
    if lat:
        p99_1k, p99_10k = (_med(res, "latency", "runwire", r, "ws", "p99") for r in ("1000", "10000"))
        p50_1k, p50_10k = (_med(res, "latency", "runwire", r, "ws", "p50") for r in ("1000", "10000"))
        redis_1k = _med(res, "latency", "redis", "1000", "ws", "p99")
        row("p99 <= 1 ms at 1k/s, and <= Redis's p99 in the same run", f"{p99_1k:.2f} ms (Redis {redis_1k:.2f} ms)",
            p99_1k <= 1.0 and (redis_1k != redis_1k or p99_1k <= redis_1k))
        row("p99 <= 2 ms at 10k/s", f"{p99_10k:.2f} ms", p99_10k <= 2.0)
        row("p50 <= 0.5 ms at 1k/s and 10k/s", f"{p50_1k:.2f} / {p50_10k:.2f} ms", max(p50_1k, p50_10k) <= 0.5)
        for rate, limit in (("10000", 30), ("1000", 80)):
            r_, g_ = (_med(res, "latency", "runwire", rate, "cpu_us_per_event", k) for k in ("runner", "gateway"))
            row(f"CPU per event <= {limit} us in runner and gateway at {int(rate) // 1000}k/s", f"runner {r_:.0f} us, gateway {g_:.0f} us",
                max(r_, g_) <= limit)
    steps = res["held"].get("runwire", [])
    if steps:
        ok = [r for r in steps if r["held"]]
        top = ok[-1] if ok else None
        row(">= 50k events/s from one stage, nothing lost, p99 <= 50 ms",
            f"{top['rate']:,.0f}/s held, p99 {top['ws']['p99']:.1f} ms" if top else "no rung held",
            bool(top and top["rate"] >= 50_000 and top["ws"]["p99"] <= 50))
    fan = res["fanout"].get("runwire", {}).get("500")
    if fan:
        p99 = median(fan, "ws", "p99")[0]
        row("fan-out 500 clients at 1k/s: every client complete, p99 <= 50 ms", f"complete {_exact(fan)}, p99 {p99:.1f} ms",
            min(r["ws"]["exact"] for r in fan) == 500 and p99 <= 50)
    if res["resume"]:
        rate = median(res["resume"], "rate")[0]
        row(f"a {res['sizes']['resume_events']:,}-event resume exact and >= 500k events/s", f"{rate:,.0f}/s, exact"
            f" {sum(x['exact'] for x in res['resume'])}/{len(res['resume'])}", rate >= 500_000 and all(x["exact"] for x in res["resume"]))
    if res["replay"]:
        rate = median(res["replay"], "rate")[0]
        first = median(res["replay_first"], "rate")[0] if res.get("replay_first") else float("nan")
        cold = f"; never seen (nothing kept) {median(res['replay_cold'], 'rate')[0]:,.0f}/s" if res.get("replay_cold") else ""
        row(f"replay of {res['sizes']['replay_events']:,} events >= 1M events/s",
            f"{rate:,.0f}/s; the first after a gateway restart {first:,.0f}/s{cold}", rate >= 1_000_000 and first >= 1_000_000)
    if not rows:
        return []
    return ["## Against the goals of issue 14 (runwire's medians)", "", "| goal | figure | |", "|---|---|---|", *rows, ""]
