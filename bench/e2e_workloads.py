"""The end-to-end benchmark's workloads, each one run of one system: latency at a rate (WebSocket, and
for runwire also SSE and ZeroMQ SUB), a rate held with nothing lost, fan-out to many WebSocket clients,
a client away for N events resuming with its cursor, and the replay of a long run. Each returns a dict
of figures; nothing here asserts: `exact` says whether every client got every event once, in order."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import aiohttp
import anyio
import msgspec

from bench.e2e_clients import Tally, ws_client
from bench.e2e_load import STAGE, TICK
from bench.e2e_systems import ENV, LoadFailed, Runwire, System, cpu_seconds, peak_rss_kb, reset_peak_rss
from shared.ids import new_run_id
from shared.journal import JournalWriter, begin_run
from tests.harness import REPO


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


@dataclass
class Clients:
    kind: str  # ws | sse | zmq
    url: str
    n: int = 1
    timed: int = 1
    procs: int = 1
    plain: bool = False
    uvloop: bool = False
    first_seq: int = 1


class _Workers:
    """Client worker processes (bench/e2e_clients.py), started and connected before the run begins."""

    def __init__(self, spec: Clients, timeout: float) -> None:
        self.spec = spec
        shares = [spec.n // spec.procs + (i < spec.n % spec.procs) for i in range(spec.procs)]
        timed = [spec.timed // spec.procs + (i < spec.timed % spec.procs) for i in range(spec.procs)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.e2e_clients", spec.kind, spec.url, "--clients", str(n), "--timed", str(t),
                 "--timeout", str(timeout), "--first-seq", str(spec.first_seq), *(["--plain"] if spec.plain else []), *(["--uvloop"] if spec.uvloop else [])],
                stdout=subprocess.PIPE, env=ENV, cwd=str(REPO), text=True)
            for n, t in zip(shares, timed, strict=True) if n
        ]

    async def connected(self) -> None:
        for p in self.procs:
            assert p.stdout is not None
            line = await anyio.to_thread.run_sync(p.stdout.readline)
            if line.strip() != "connected":
                raise RuntimeError(f"{self.spec.kind} client worker {p.pid} said {line!r}")

    async def results(self) -> dict[str, Any]:
        merged: dict[str, Any] = {"clients": [], "latencies": [], "cpu": 0.0}
        for p in self.procs:
            assert p.stdout is not None
            line = await anyio.to_thread.run_sync(p.stdout.readline)
            await anyio.to_thread.run_sync(lambda p=p: p.wait(30))
            p.stdout.close()
            if not line:
                raise RuntimeError(f"{self.spec.kind} client worker {p.pid} ended ({p.returncode}) without results")
            r = msgspec.json.decode(line)
            merged["clients"] += r["clients"]
            merged["latencies"] += r["latencies"]
            merged["cpu"] += r["cpu"]
        return merged

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
            if p.stdout is not None:
                p.stdout.close()


def _client_figures(r: dict[str, Any]) -> dict[str, Any]:
    cs = r["clients"]
    return {"p50": pct(r["latencies"], 50), "p99": pct(r["latencies"], 99), "max": max(r["latencies"], default=float("nan")),
            "clients": len(cs), "exact": sum(1 for c in cs if c["exact"]), "received": min((c["count"] for c in cs), default=0),
            "expected": max((c["last_seq"] for c in cs), default=0), "span_s": max((c["span_s"] for c in cs), default=0.0),
            "emit_span_s": max((c["emit_span_s"] for c in cs), default=0.0),
            "last_latency_s": max((c["last_latency_s"] for c in cs), default=0.0),
            "client_cpu_s": r["cpu"]}


async def one_run(system: System, rate: float, count: int, specs: list[Clients], timeout: float,
                  may_fail: bool = False) -> dict[str, Any]:
    """Clients connect, the load runs, every client reads to the terminal event: figures per client kind,
    per-service CPU seconds (and per tick, in us) and peak RSS over the run. A load run that does not
    end in success raises LoadFailed, or with `may_fail` is recorded as `failed` (its end's message)."""
    failed: str | None = None
    workers = [_Workers(s, timeout) for s in specs]
    try:
        for w in workers:
            await w.connected()
        await anyio.sleep(0.3)
        pids = system.pids()
        for pid in pids.values():
            reset_peak_rss(pid)
        cpu0 = {name: cpu_seconds(pid, name == "gateway") for name, pid in pids.items()}
        t0 = time.perf_counter()
        run_id = await system.launch(rate, count)
        results = [await w.results() for w in workers]
        try:
            await system.finish(run_id)
        except LoadFailed as e:
            if not may_fail:
                raise
            failed = str(e)
        wall = time.perf_counter() - t0
        cpu = {name: cpu_seconds(pid, name == "gateway") - cpu0[name] for name, pid in pids.items()}
    finally:
        for w in workers:
            w.kill()
    out: dict[str, Any] = {"rate": rate, "count": count, "wall_s": wall, "cpu_s": cpu, "failed": failed,
                           "cpu_us_per_event": {k: v / count * 1e6 for k, v in cpu.items()},
                           "peak_rss_mb": {name: peak_rss_kb(pid) / 1024 for name, pid in pids.items()}}
    for spec, r in zip(specs, results, strict=True):
        out[spec.kind] = _client_figures(r)
    return out


def _ws(system: System, **kw: Any) -> Clients:
    return Clients("ws", system.ws_url, plain=system.plain, **kw)


async def latency(system: System, rate: float, seconds: float, kinds: tuple[str, ...] = ("ws",)) -> dict[str, Any]:
    """One WebSocket client (as every system has), or runwire's other clients: `sse`, `zmq`."""
    specs = []
    for kind in kinds:
        if kind == "ws":
            specs.append(_ws(system))
        elif kind == "sse" and isinstance(system, Runwire):
            specs.append(Clients("sse", system.sse_url))
        elif kind == "zmq" and isinstance(system, Runwire):
            specs.append(Clients("zmq", system.zmq_url, first_seq=2))  # seq 1, `queued`, is the scheduler's
    count = int(rate * seconds)
    return await one_run(system, rate, count, specs, timeout=seconds + 30)


async def held(system: System, rate: float, seconds: float) -> dict[str, Any]:
    """One step of the step-up. Held: the client got every event once, in order; the load was emitted at
    the rate (the ticks' emit times span at most 5% + 0.2 s more than asked: a stage slowed by a full
    pipe to its runner did not hold it); and the last tick arrived within 5 s of its emit (no backlog
    left growing; 5 s leaves the polling design its 2 s scans)."""
    count = int(rate * seconds)
    r = await one_run(system, rate, count, [_ws(system)], timeout=seconds * 3 + 20, may_fail=True)
    ws = r["ws"]
    r["held"] = bool(r["failed"] is None and ws["exact"] == 1 and ws["emit_span_s"] <= seconds * 1.05 + 0.2
                     and ws["last_latency_s"] <= 5.0)
    return r


async def fanout(system: System, clients: int, rate: float, seconds: float, procs: int) -> dict[str, Any]:
    # one client in 10 times every event; the others count frames (first and last event decoded)
    spec = _ws(system, n=clients, timed=max(1, clients // 10), procs=procs, uvloop=True)
    return await one_run(system, rate, int(rate * seconds), [spec], timeout=seconds + 15)


async def resume(system: Runwire, away: int) -> dict[str, Any]:
    """A client reads the run's first tick, leaves; the stage emits `away` more as fast as it can; the
    client comes back with its cursor once the run has ended and reads to the end."""
    before = Tally(timed=False)
    async with aiohttp.ClientSession() as http:
        async with anyio.create_task_group() as tg:
            connected = anyio.Event()
            got_tick = anyio.Event()

            async def first_part() -> None:
                with anyio.move_on_after(60):
                    async with http.ws_connect(system.ws_url, compress=0) as ws:
                        await ws.receive_json()  # hello
                        connected.set()
                        async for msg in ws:
                            f = msgspec.json.decode(msg.data)
                            before.runwire_frame(msg.data)
                            if any(e.get("stage") == STAGE and e.get("event") == "metric" for e in f.get("events", [])):
                                got_tick.set()
                                return

            tg.start_soon(first_part)
            await connected.wait()
            run_id = await system.launch(0, away + 1, lead=1, pause=1.0)
            with anyio.fail_after(60):
                await got_tick.wait()
        cursor, seen = before.cursor, before.last_seq
        await system.finish(run_id)
        after = Tally(timed=False)
        gw = system.pids()["gateway"]
        cpu0 = cpu_seconds(gw, True)
        t0 = time.perf_counter()
        await ws_client(http, f"{system.ws_url}?cursor={quote(cursor, safe='')}", after, timeout=120)
        took = time.perf_counter() - t0
        cpu = cpu_seconds(gw, True) - cpu0
    return {"away": away, "seconds": took, "rate": after.count / took, "received": after.count,
            "exact": after.exact(first_seq=seen + 1), "first_seq": after.first_seq, "left_at_seq": seen,
            "gateway_cpu_s": cpu}


def write_long_run(journal_dir: Path, count: int) -> str:
    """A finished run of `count` ticks, written with the project's journal writer (as the runner would,
    but at file speed: producing it through a stage would take most of the benchmark's time)."""
    run_id = new_run_id("replay")
    tz = ZoneInfo("UTC")
    begin_run(journal_dir, run_id, tz, "load", {}, {"trigger": "manual"})
    with JournalWriter.open(journal_dir, run_id, tz) as w:
        t = time.time_ns()
        for i in range(count):
            w.append(STAGE, "metric", TICK, {"i": i, "t": t})
        w.append("pipeline", "success", "done")
    return run_id


async def indexed(system: Runwire, run_id: str, timeout: float = 120.0) -> float:
    """Wait until the gateway knows the run written behind its back (write_long_run) as ended and has
    gone quiet (its sweep reads a new journal once: timed with the replay, it doubled the replay's CPU);
    returns the seconds that took."""
    gw = system.pids()["gateway"]
    t0 = time.perf_counter()
    with anyio.fail_after(timeout):
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"{system.base}/api/runs/{run_id}") as resp:
                    if resp.status == 200 and (await resp.json()).get("status") == "success":
                        break
                await anyio.sleep(0.2)
        while True:  # quiet: under 5% of a core over half a second
            c0 = cpu_seconds(gw, True)
            await anyio.sleep(0.5)
            if cpu_seconds(gw, True) - c0 < 0.025:
                return time.perf_counter() - t0


async def replay(system: Runwire, run_id: str) -> dict[str, Any]:
    tally = Tally(timed=False)
    gw = system.pids()["gateway"]
    async with aiohttp.ClientSession() as http:
        cpu0, client0 = cpu_seconds(gw, True), time.process_time()
        t0 = time.perf_counter()
        await ws_client(http, f"{system.ws_url}/{run_id}?after_seq=0", tally, timeout=300)
        took = time.perf_counter() - t0
    return {"seconds": took, "rate": tally.count / took, "received": tally.count, "exact": tally.exact(),
            "gateway_cpu_s": cpu_seconds(gw, True) - cpu0, "client_cpu_s": time.process_time() - client0}


async def live_beside_replay(system: Runwire, long_run: str, rate: float, seconds: float) -> dict[str, Any]:
    """A live client's latency at `rate` while another client replays the long run from seq 0, again and
    again (a user opening a big old run must not stall everyone's live view): one_run's figures, and the
    replays finished meanwhile."""
    replays = 0

    async def replaying() -> None:
        nonlocal replays
        async with aiohttp.ClientSession() as http:
            while True:
                await ws_client(http, f"{system.ws_url}/{long_run}?after_seq=0", Tally(timed=False), timeout=300)
                replays += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(replaying)
        await anyio.sleep(0.5)  # the replay under way before the live run starts
        r = await one_run(system, rate, int(rate * seconds), [_ws(system)], timeout=seconds + 30)
        tg.cancel_scope.cancel()
    r["replays"] = replays
    return r


def median(runs: list[dict[str, Any]], *path: str) -> tuple[float, float, float]:
    """(median, min, max) of runs[i][path...]."""
    values = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        values.append(float(v))
    return statistics.median(values), min(values), max(values)
