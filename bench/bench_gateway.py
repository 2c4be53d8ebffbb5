"""Gateway figures: publisher -> gateway -> WebSocket latency at 1k and 10k events/s, the sustained rate
to one client with nothing lost, fan-out to 500 clients at 1k events/s (with the gateway's CPU), replay
of a 1,000,000-event run from seq 0, and memory per idle connection with 5,000 connections.

The gateway runs as `python -m gateway_svc` (a real subprocess); the publisher is a separate process
that journals each event (JournalWriter) and then publishes it (PUB), as the runner does; the clients
are aiohttp WebSockets, in this process except for the fan-out, whose 500 clients live in
FANOUT_PROCS worker processes of their own (one event loop decoding 500 streams would add its own
queueing to the latency it reports). Those workers run on uvloop: the clients stand in for 500
browsers on other machines, yet here they share the gateway's two cores, and on asyncio's own loop
they took ~120% CPU (more than the gateway) and their own queueing showed as gateway latency
(interleaved runs, same gateway: p99 44-54 ms on asyncio's loop, 32-34 ms on uvloop, clients' CPU 75%).
The gateway runs as in production: on uvloop where installed since the services took it on
(RUNWIRE_UVLOOP=0 for asyncio's loop, on which the figures quoted here were taken; uvloop changed nothing
measurable in this bench then: its cost is the send syscalls); the single client of the other parts stays on asyncio's loop too (on
uvloop its latency tail was worse). The latency part also measures the building blocks alone
(bench/reference_forwarder.py: zmq.asyncio SUB -> aiohttp WebSocket, nothing else), interleaved with the
gateway, so its figures can be read against what the host gives a bare pipeline at the same moment
(on this shared 2-core VM that floor itself moves between ~0.7 and 3 ms). Prints figures; asserts nothing.
Goals: p99 <= 1 ms at 10k/s; >= 50k events/s to one client; 500 clients held at 1k/s with p99 <= 50 ms;
replay >= 500k events/s; <= 30 KB per idle connection.

    python bench/bench_gateway.py [--only latency|rate|fanout|replay|idle ...] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import anyio
import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.config import load_settings  # noqa: E402
from shared.ids import new_run_id  # noqa: E402
from shared.journal import JournalWriter, begin_run  # noqa: E402
from tests.harness import Service, write_config  # noqa: E402

TZ = ZoneInfo("UTC")
PARTS = ("latency", "rate", "fanout", "replay", "idle")


class _Sent(msgspec.Struct):
    t: int = 0  # the publisher's time.time_ns() when it journaled the event


class _Stamp(msgspec.Struct):
    seq: int
    event: str
    data: _Sent | None = None


class _Frame(msgspec.Struct):
    type: str
    events: list[_Stamp] = []
    cursor: str = ""


class _RawFrame(msgspec.Struct):
    type: str
    events: list[msgspec.Raw] = []
    cursor: str = ""


_frame = msgspec.json.Decoder(_Frame)  # one call per frame reads every event's seq and send time
_raw_frame = msgspec.json.Decoder(_RawFrame)  # cheaper: events left undecoded
_stamp = msgspec.json.Decoder(_Stamp)

# The publisher: its own process, as the runner is. Paced at RATE events/s (0: as fast as it can),
# journal first, then PUB; heartbeats every 0.5 s; the send time (ns) rides in data.t.
_PUBLISHER = r"""
import sys, time, zmq
from zoneinfo import ZoneInfo
from pathlib import Path
from shared.journal import JournalWriter, begin_run
from shared.wire import Heartbeat, configure_socket, encode_event_frames, encode_heartbeat_frames
endpoint, journal_dir, run_id, rate, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
ctx = zmq.Context(); sock = ctx.socket(zmq.PUB); configure_socket(sock, sndhwm=1_000_000); sock.bind(endpoint)
tz = ZoneInfo("UTC")
print("bound", flush=True); sys.stdin.readline()  # go
def send(frames):
    try: sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again: pass  # counted by the gateway as a gap it fills from the journal
ev = begin_run(journal_dir, run_id, tz, "bench", {}, {"trigger": "manual"}); send(encode_event_frames(ev))
w = JournalWriter.open(journal_dir, run_id, tz)
def hb():
    send(encode_heartbeat_frames(Heartbeat(runner_id="bench", timestamp="", journal_dir=str(journal_dir),
         config_path="", runs={run_id: w.last_seq}, interval=0.5)))
start = time.perf_counter(); next_hb = start; i = 0
while i < count:
    # paced in 1 ms ticks (no busy wait: the machine has two cores for everything)
    due = count if not rate else min(count, int((time.perf_counter() - start) * rate) + 1)
    while i < due:
        e = w.append("stage", "log", "a line of output", {"t": time.time_ns()})
        send(encode_event_frames(e))
        i += 1
    if time.perf_counter() >= next_hb:
        hb(); next_hb += 0.5
    if rate and i < count:
        time.sleep(0.001)
e = w.append("pipeline", "success", "done"); send(encode_event_frames(e)); hb()
print("done", time.perf_counter() - start, flush=True)
sys.stdin.readline()
"""


class Bench:
    def __init__(self, tmp: Path, gateway_extra: str = "") -> None:
        self.tmp = tmp
        self.cfg, self.ports = write_config(tmp, gateway=gateway_extra)
        self.settings = load_settings(self.cfg)
        self.settings.journal_dir.mkdir(parents=True, exist_ok=True)
        self.start()
        self.base = f"http://127.0.0.1:{self.ports.http}"
        self.ws = f"ws://127.0.0.1:{self.ports.http}"

    def start(self) -> None:
        self.gateway = Service("gateway_svc", self.cfg, self.tmp).start()

    def close(self) -> None:
        self.gateway.stop()

    @property
    def pid(self) -> int:
        return self.gateway.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.gateway.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def publisher(self, run_id: str, rate: float, count: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER, f"tcp://127.0.0.1:{self.ports.publish}", str(self.settings.journal_dir),
             run_id, str(rate), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO),
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "bound"
        return proc


class Reference(Bench):
    """The building blocks alone (bench/reference_forwarder.py) in the gateway's place, measured the same
    way: what the machine gives a bare ZeroMQ -> aiohttp WebSocket pipeline at the same moment."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "reference_forwarder.py"), f"tcp://127.0.0.1:{self.ports.publish}",
             str(self.ports.http)], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.stdin.close()
    except BrokenPipeError:
        pass
    proc.wait(30)


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


class Receiver:
    """Counts one run's events on a WebSocket and records publish-to-receive latency (ms): of every
    event (`per_event`), else of each frame's first (oldest) event only."""

    def __init__(self, run_id: str, per_event: bool = True) -> None:
        self.run_id = run_id
        self.per_event = per_event
        self.latencies: list[float] = []
        self.oldest: list[float] = []  # each frame's first event
        self.count = 0
        self.last_seq = 0
        self.gaps = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.ended = False

    def frame(self, data: bytes | str) -> None:
        now = time.time_ns()
        if self.per_event:
            f = _frame.decode(data)
            if f.type != "events" or not f.events:
                return
            first, last, n = f.events[0], f.events[-1], len(f.events)
            self.latencies.extend((now - s.data.t) / 1e6 for s in f.events if s.data is not None and s.data.t)
        else:
            raw = _raw_frame.decode(data)
            if raw.type != "events" or not raw.events:
                return
            first, last, n = _stamp.decode(raw.events[0]), _stamp.decode(raw.events[-1]), len(raw.events)
        if not self.first_at:
            self.first_at = time.perf_counter()
        self.last_at = time.perf_counter()
        if first.data is not None and first.data.t:
            self.oldest.append((now - first.data.t) / 1e6)
        if first.seq != self.last_seq + 1:
            self.gaps += 1
        self.count += n
        self.last_seq = last.seq
        if last.event == "success":
            self.ended = True


async def _receive(http: aiohttp.ClientSession, url: str, rec: Receiver, *, connected: Callable[[], None] | None = None,
                   timeout: float = 60) -> None:
    with anyio.move_on_after(timeout):
        async with http.ws_connect(url, max_msg_size=64 * 1024 * 1024, compress=0) as ws:
            if connected:
                connected()
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    rec.frame(msg.data)
                    if rec.ended:
                        return


# ------------------------------------------------------------------------------------------- parts


async def latency(b: Bench, rate: int, seconds: float) -> dict[str, float]:
    run_id = new_run_id("lat")
    count = int(rate * seconds)
    pub = b.publisher(run_id, rate, count)
    rec = Receiver(run_id)
    async with aiohttp.ClientSession() as http:
        async with anyio.create_task_group() as tg:
            ready = anyio.Event()
            tg.start_soon(lambda: _receive(http, f"{b.ws}/ws/events/{run_id}?after_seq=0", rec, connected=ready.set))
            await anyio.sleep(0.3)
            cpu0 = b.cpu_seconds()
            t0 = time.perf_counter()
            _go(pub)
            await ready.wait()
        cpu = (b.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    _finish(pub)
    # the first events may be read from the journal (the client connects as the run is created): skip 5%
    lat = rec.latencies[len(rec.latencies) // 20 :]
    return {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "received": rec.count, "expected": count + 2, "cpu": cpu * 100}


async def sustained(b: Bench, count: int) -> dict[str, float]:
    run_id = new_run_id("rate")
    pub = b.publisher(run_id, 0, count)
    rec = Receiver(run_id, per_event=False)
    async with aiohttp.ClientSession() as http:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _receive(http, f"{b.ws}/ws/events/{run_id}?after_seq=0", rec))
            await anyio.sleep(0.3)
            t0 = time.perf_counter()
            _go(pub)
        elapsed = rec.last_at - t0
    _finish(pub)
    return {"rate": rec.count / elapsed, "received": rec.count, "expected": count + 2, "gaps_seen": rec.gaps}


FANOUT_PROCS = 4
FANOUT_SAMPLE = 10


async def _fanout_clients(url: str, n: int, timeout: float) -> None:
    """A fan-out worker process: `n` all-runs clients; prints `connected` once all are, then (when every
    client has seen the terminal event, or at the timeout) one JSON line with what they measured."""
    # every FANOUT_SAMPLE-th client times each event it gets; the others (to keep the clients' own CPU,
    # which shares the gateway's two cores, low) time each frame's first event and check seqs
    recs = [Receiver("", per_event=i % FANOUT_SAMPLE == 0) for i in range(n)]
    connected = 0

    def one_connected() -> None:
        nonlocal connected
        connected += 1
        if connected == n:
            print("connected", flush=True)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        async with anyio.create_task_group() as tg:
            for rec in recs:
                tg.start_soon(lambda r=rec: _receive(http, url, r, connected=one_connected, timeout=timeout))
    result = {
        "latencies": [x for r in recs for x in r.latencies],
        "oldest": [x for r in recs for x in r.oldest],
        "complete": sum(1 for r in recs if r.ended and r.gaps <= 1),  # gaps<=1: the first frame starts past seq 1
        "cpu": time.process_time(),
    }
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()


def fanout_worker(argv: list[str]) -> None:
    anyio.run(_fanout_clients, argv[0], int(argv[1]), float(argv[2]), backend_options={"use_uvloop": True})


async def _fanout_times(b: Bench) -> dict[str, float]:
    """The gateway's runwire_gateway_fanout_seconds histogram (count, sum, cumulative buckets by `le`)."""
    async with aiohttp.ClientSession() as http, http.get(f"{b.base}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("runwire_gateway_fanout_seconds_"):
            name, value = line.rsplit(" ", 1)
            key = name.removeprefix("runwire_gateway_fanout_seconds_")
            out[key.replace('bucket{le="', "le").removesuffix('"}')] = float(value)
    return out


def _worker_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fanout(b: Bench, clients: int, rate: int, seconds: float) -> dict[str, float]:
    run_id = new_run_id("fan")
    count = int(rate * seconds)
    pub = b.publisher(run_id, rate, count)
    shares = [clients // FANOUT_PROCS + (i < clients % FANOUT_PROCS) for i in range(FANOUT_PROCS)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", "import sys; from bench.bench_gateway import fanout_worker; fanout_worker(sys.argv[1:])",
             f"{b.ws}/ws/events", str(n), str(seconds + 40)],
            stdout=subprocess.PIPE, text=True, cwd=str(REPO),
        )
        for n in shares if n
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            line = await anyio.to_thread.run_sync(w.stdout.readline)
            assert line.strip() == "connected", f"fan-out worker {w.pid} said {line!r}"
        await anyio.sleep(0.5)
        times0 = await _fanout_times(b)
        cpu0 = b.cpu_seconds()
        wcpu0 = sum(_worker_cpu(w.pid) for w in workers)
        t0 = time.perf_counter()
        _go(pub)
        results = []
        for w in workers:
            assert w.stdout is not None
            results.append(msgspec.json.decode(await anyio.to_thread.run_sync(w.stdout.readline)))
        wall = time.perf_counter() - t0
        cpu = (b.cpu_seconds() - cpu0) / wall
        wcpu = (sum(r["cpu"] for r in results) - wcpu0) / wall
        times = await _fanout_times(b)
    finally:
        for w in workers:
            w.wait(30)
    _finish(pub)
    lat = [x for r in results for x in r["latencies"]]
    oldest = [x for r in results for x in r["oldest"]]
    batches = times["count"] - times0["count"]
    within = (times["le0.01"] - times0["le0.01"]) / batches if batches else float("nan")
    return {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "frame_p99": _pct(oldest, 99),
            "batch_ms": (times["sum"] - times0["sum"]) / batches * 1000 if batches else float("nan"),
            "batch_within_10ms": within * 100, "complete": sum(r["complete"] for r in results),
            "clients": clients, "cpu": cpu * 100, "client_cpu": wcpu * 100}


async def replay(b: Bench, run_id: str, count: int) -> dict[str, float]:
    rec = Receiver(run_id, per_event=False)
    async with aiohttp.ClientSession() as http:
        cpu0, client0 = b.cpu_seconds(), time.process_time()
        t0 = time.perf_counter()
        await _receive(http, f"{b.ws}/ws/events/{run_id}?after_seq=0", rec, timeout=120)
        elapsed = time.perf_counter() - t0
    return {"rate": rec.count / elapsed, "received": rec.count, "expected": count + 2,
            "cpu": (b.cpu_seconds() - cpu0) / elapsed * 100, "client_cpu": (time.process_time() - client0) / elapsed * 100}


def write_long_run(journal_dir: Path, count: int) -> str:
    run_id = new_run_id("replay")
    begin_run(journal_dir, run_id, TZ, "bench", {}, {"trigger": "manual"})
    with JournalWriter.open(journal_dir, run_id, TZ) as w:
        for i in range(count):
            w.append("stage", "log", "a line of output", {"i": i})
        w.append("pipeline", "success", "done")
    return run_id


async def idle(b: Bench, n: int) -> dict[str, float]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        await anyio.sleep(0.5)
        before = b.rss_kb()
        sockets = []
        for _ in range(n):
            ws = await http.ws_connect(f"{b.ws}/ws/events", compress=0)
            await ws.receive()  # hello
            sockets.append(ws)
        await anyio.sleep(1.0)
        after = b.rss_kb()
        for ws in sockets:
            await ws.close()
    return {"per_conn_kb": (after - before) / n, "rss_mb": after / 1024, "n": n}


# ------------------------------------------------------------------------------------------- main


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


class Steal:
    """The share of CPU time the hypervisor gave to other guests (/proc/stat "steal") since the last
    reading: on a shared VM, figures measured while it is high say more about the neighbours."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> list[int]:
        try:
            with open("/proc/stat") as f:
                return [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return []

    def since_last(self) -> str:
        now = self._read()
        before, self._last = self._last, now
        if len(now) < 8 or len(before) < 8:
            return ""
        total = sum(now) - sum(before)
        return f"  [host steal {100 * (now[7] - before[7]) / total:.0f}%]" if total > 0 else ""


async def run(parts: list[str], repeat: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))  # the gateway inherits it
    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp_name:
        tmp = Path(tmp_name)
        b = Bench(tmp, gateway_extra="client_queue_events = 200000\nclient_queue_bytes = 134217728")
        steal = Steal()
        try:
            if "latency" in parts:
                (tmp / "reference").mkdir()
                ref = Reference(tmp / "reference")
                try:
                    for rate in (1_000, 10_000):
                        runs, refs = [], []
                        for _ in range(repeat):  # interleaved: both see the same moments of a noisy host
                            runs.append(await latency(b, rate, 3.0))
                            refs.append(await latency(ref, rate, 3.0))
                        p99s = ", ".join(f"{r['p99']:.2f}" for r in runs)
                        print(f"latency at {rate:>6,}/s: p50 {_median(runs, 'p50'):.2f} ms  p99 {_median(runs, 'p99'):.2f} ms"
                              f"  (median of {repeat}; p99s {p99s};"
                              f" received {runs[0]['received']:,.0f}/{runs[0]['expected']:,.0f};"
                              f" gateway CPU {_median(runs, 'cpu'):.0f}%)  building blocks alone, interleaved: p50"
                              f" {_median(refs, 'p50'):.2f} ms  p99 {_median(refs, 'p99'):.2f} ms"
                              f" (CPU {_median(refs, 'cpu'):.0f}%)"
                              f"  goal at 10k/s: p99 <= 1 ms{steal.since_last()}", flush=True)
                finally:
                    ref.close()
            if "rate" in parts:
                runs = [await sustained(b, 300_000) for _ in range(repeat)]
                lost = [r["expected"] - r["received"] for r in runs]
                print(f"sustained to one client: {_median(runs, 'rate'):,.0f} events/s  (median of {repeat};"
                      f" lost {max(lost):.0f}; gaps seen by client {max(r['gaps_seen'] for r in runs):.0f})"
                      f"  goal >= 50,000/s, nothing lost{steal.since_last()}", flush=True)
            if "fanout" in parts:
                runs = [await fanout(b, 500, 1_000, 5.0) for _ in range(repeat)]
                p99s = ", ".join(f"{r['p99']:.0f}" for r in runs)
                print(f"fan-out 500 clients at 1k/s: p50 {_median(runs, 'p50'):.1f} ms  p99 {_median(runs, 'p99'):.1f} ms"
                      f" of every delivery  (median of {repeat}; p99s {p99s}; p99 of each frame's oldest event"
                      f" {_median(runs, 'frame_p99'):.1f} ms);"
                      f" clients with every event {min(r['complete'] for r in runs):.0f}/500 (worst run);"
                      f" gateway CPU {_median(runs, 'cpu'):.0f}% (the clients' {FANOUT_PROCS} processes together:"
                      f" {_median(runs, 'client_cpu'):.0f}%); one batch to all clients took {_median(runs, 'batch_ms'):.1f} ms"
                      f" on average, {_median(runs, 'batch_within_10ms'):.0f}% within 10 ms  goal p99 <= 50 ms"
                      f"{steal.since_last()}", flush=True)
            if "replay" in parts:
                t0 = time.perf_counter()
                run_id = await anyio.to_thread.run_sync(write_long_run, b.settings.journal_dir, 1_000_000)
                print(f"(wrote a 1,000,000-event journal in {time.perf_counter() - t0:.1f}s)", flush=True)
                steal.since_last()
                runs = [await replay(b, run_id, 1_000_000) for _ in range(repeat)]
                print(f"replay of 1,000,000 events from seq 0: {_median(runs, 'rate'):,.0f} events/s  (median of {repeat};"
                      f" received {runs[0]['received']:,.0f}/{runs[0]['expected']:,.0f}; gateway CPU"
                      f" {_median(runs, 'cpu'):.0f}%, the client's {_median(runs, 'client_cpu'):.0f}%)  goal >= 500,000/s"
                      f"{steal.since_last()}", flush=True)
        finally:
            b.close()
        if "idle" in parts:
            (tmp / "idle").mkdir()
            b = Bench(tmp / "idle")
            try:
                r = await idle(b, 5_000)
                print(f"idle connections: {r['per_conn_kb']:.1f} KB each with {r['n']:,.0f} open (gateway RSS"
                      f" {r['rss_mb']:.0f} MB)  goal <= 30 KB", flush=True)
            finally:
                b.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    anyio.run(run, args.only, args.repeat)


if __name__ == "__main__":
    main()
