"""Fault run: the real trio (scheduler, runner, gateway) under random kill -9 and SIGSTOP/SIGCONT of each
service, scheduled and manual launches, clients that stall, disconnect and resume, ZeroMQ drops forced by
a tiny `runner.send_hwm`; then a settle phase and the invariants, printed as figures.

A long soak, replayable from its seed (printed first):

    .venv/bin/python -m tests.faultrun --seconds 600 --seed 7

tests/test_faults.py runs it in a quick setting. The seed fixes the faults' schedule and every client's
whims; timing on a loaded machine still differs from one run to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from tests.faultrun_checks import (
    ClientLog,
    Interval,
    Journal,
    Launch,
    client_figures,
    event_time,
    false_runner_lost,
    launch_figures,
    orphans,
    processes_of,
    read_journals,
)
from tests.faultrun_clients import Mood, ZmqSubscriber, run_ws_client, sse_client, ws_all_client
from tests.harness import REPO, Ports, Service, write_config

SERVICES = ("scheduler", "runner", "gateway")
SCHEDULE = "faultrun-5s"
LOST_AFTER = 3.0  # scheduler.runner_lost_after in the harness's config

STAGE_SCRIPT = '''\
"""Stages of the fault run's pipeline: a little output, a little time, one background grandchild."""
import subprocess, sys, time
kind = sys.argv[1]
if kind == "spawn":  # a grandchild in its own session: it escapes the stage's process group
    subprocess.Popen(["sleep", "300"], start_new_session=True)
    print("spawned a background sleeper", flush=True)
elif kind == "burst":  # enough output that a client which stops reading fills its socket buffers
    line = "x" * 120
    for i in range(1000):
        print(f"burst {i} {line}")
elif kind == "work":
    for burst in range(3):
        for i in range(20):
            print(f"work burst {burst} line {i}")
        sys.stdout.flush()
        time.sleep(0.4)
else:
    for i in range(8):
        print(f"{kind} {sys.argv[2:]} step {i}", flush=True)
        time.sleep(0.05)
'''

PIPELINE = """
[pipelines.faulty]
description = "short stages under faults"
max_concurrent = 3
[pipelines.faulty.params.tag]
type = "str"
default = "scheduled"

[[pipelines.faulty.stages]]
name = "prep"
command = ["{python}", "{script}", "prep"]
timeout = 30

[[pipelines.faulty.stages]]
name = "spawn"
command = ["{python}", "{script}", "spawn"]
timeout = 30

[[pipelines.faulty.stages]]
name = "work"
command = ["{python}", "{script}", "work"]
timeout = 30

[[pipelines.faulty.stages]]
name = "burst"
command = ["{python}", "{script}", "burst"]
log_rate = 5000
timeout = 30

[[pipelines.faulty.stages]]
name = "items"
command = ["{python}", "{script}", "item", "{item}"]
fan_out = ["a", "b", "c"]
max_parallel = 2
timeout = 30

[schedules.%s]
pipeline = "faulty"
every = "5s"
overlap = "allow"
fire_at_start = true
misfire_grace = 30
""" % SCHEDULE


@dataclass
class Options:
    seconds: float = 600.0
    seed: int = 0
    settle: float = 120.0  # at most this long for every run to end once the faults stop
    catch_up: float = 30.0  # then at most this long for every client to hold what it should
    workdir: Path | None = None
    source: str = "tree"  # the services' code: "tree" (this checkout as it is), "HEAD" or a commit (a snapshot)


def snapshot(rev: str, dest: Path) -> Path:
    """The repo's files at `rev`, unpacked in `dest` (others may be editing the working tree meanwhile)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


@dataclass
class Report:
    seed: int
    workdir: Path
    figures: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)  # invariant -> evidence (empty: holds)

    def text(self) -> str:
        lines = [f"fault run seed={self.seed} workdir={self.workdir}"]
        for name, value in self.figures.items():
            lines.append(f"  {name}: {value}")
        failed = [name for name, ev in self.failures.items() if ev]
        lines.append(f"invariants: {len(self.failures) - len(failed)} hold, {len(failed)} fail"
                     + (f" ({', '.join(failed)})" if failed else ""))
        for name in failed:
            lines.append(f"FAIL {name} ({len(self.failures[name])}):")
            lines.extend(f"    {e}" for e in self.failures[name][:8])
            if len(self.failures[name]) > 8:
                lines.append(f"    ... {len(self.failures[name]) - 8} more")
        lines.append(f"replay: .venv/bin/python -m tests.faultrun --seconds {self.figures.get('fault seconds', '?')}"
                     f" --seed {self.seed}")
        return "\n".join(lines)


class Trio:
    """The three services on free ports in one temporary home; faults and restarts, with their times."""

    def __init__(self, workdir: Path, source: str = "tree") -> None:
        self.workdir = workdir
        self.source = REPO if source == "tree" else snapshot(source, workdir / "src")
        self.env = {} if source == "tree" else {"PYTHONPATH": str(self.source)}  # stage children too
        self.home = workdir / "home"
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        script = workdir / "stage.py"
        script.write_text(STAGE_SCRIPT)
        self.config, self.ports = write_config(
            workdir, PIPELINE.replace("{script}", str(script)), ports=Ports(), home=self.home,
            scheduler="max_concurrent_runs = 4",
            runner="capacity = 4\nsend_hwm = 4",
            gateway="send_timeout = 3.0\nclient_queue_events = 2000",
        )
        self.base = f"http://127.0.0.1:{self.ports.http}"
        self.services: dict[str, Service] = {}
        self.all_started: list[Service] = []
        self.stopped: set[str] = set()  # SIGSTOPped right now
        self.down: list[Interval] = []
        self.faults: Counter[str] = Counter()
        self.unexpected_exits: list[str] = []
        self.restart_failures: list[str] = []

    def _start_sync(self, name: str) -> None:
        for attempt in range(5):
            svc = Service(f"{name}_svc", self.config, self.logs, env=self.env, cwd=self.source)
            self.all_started.append(svc)
            try:
                svc.start(timeout=30)
            except AssertionError as e:
                self.restart_failures.append(f"{name} start {attempt + 1}: {str(e)[-600:]}")
                time.sleep(1.0)
                continue
            self.services[name] = svc
            return
        raise RuntimeError(f"{name} did not start in 5 attempts: {self.restart_failures[-1]}")

    async def start(self, name: str) -> None:
        await anyio.to_thread.run_sync(self._start_sync, name)

    def alive(self, name: str) -> bool:
        svc = self.services.get(name)
        return svc is not None and svc.proc is not None and svc.proc.poll() is None

    async def ensure_up(self, name: str) -> None:
        """A service that exited without being killed is a finding: recorded, then restarted."""
        if not self.alive(name):
            svc = self.services.get(name)
            if svc is not None and svc.proc is not None:
                tail = "\n".join(svc.output().splitlines()[-5:])
                self.unexpected_exits.append(f"{name} exited {svc.proc.returncode}: {tail}")
            t = time.time()
            await self.start(name)
            self.down.append(Interval(name, "exit", t, time.time()))

    async def kill9(self, name: str, rng: random.Random) -> None:
        t = time.time()
        self.services[name].kill9()
        self.faults[f"{name} kill -9"] += 1
        await anyio.sleep(rng.uniform(0.3, 3.0))
        await self.start(name)
        self.down.append(Interval(name, "kill", t, time.time()))

    async def pause(self, name: str, rng: random.Random) -> None:
        svc = self.services[name]
        t = time.time()
        os.kill(svc.pid, signal.SIGSTOP)
        self.stopped.add(name)
        self.faults[f"{name} SIGSTOP"] += 1
        try:
            await anyio.sleep(rng.uniform(1.0, 8.0))
        finally:  # no await here: a cancel cannot skip the SIGCONT
            os.kill(svc.pid, signal.SIGCONT)
            self.stopped.discard(name)
            self.down.append(Interval(name, "stop", t, time.time()))

    def end_all(self) -> list[str]:
        """Every process this run started: services (woken first), then stage leftovers of this home."""
        notes = []
        for name in list(self.stopped):
            os.kill(self.services[name].pid, signal.SIGCONT)
        for svc in reversed(self.all_started):
            if svc.proc is None:
                continue
            try:
                code = svc.stop(timeout=20)
                if code not in (0, -signal.SIGTERM, -signal.SIGKILL) and svc in self.services.values():
                    notes.append(f"{svc.module} stopped with status {code}")
            except AssertionError as e:
                notes.append(str(e)[:600])
            if svc.proc.poll() is None:
                os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait(5)
        for pid, _env, _cmd in processes_of(self.home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return notes


class FaultRun:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.trio = Trio(workdir, opts.source)
        self.mood = Mood()
        self.faulting = True
        self.launches: list[Launch] = []
        self.clients: list[ClientLog] = []
        self.run_clients: list[ClientLog] = []

    # ------------------------------------------------------------------ faults and launches
    async def fault_loop(self, name: str) -> None:
        rng = random.Random(f"{self.opts.seed}-fault-{name}")
        while self.faulting:
            await anyio.sleep(rng.uniform(3.0, 12.0))
            if not self.faulting:
                break
            await self.trio.ensure_up(name)
            if rng.random() < 0.5:
                await self.trio.kill9(name, rng)
            else:
                await self.trio.pause(name, rng)

    async def launch(self, http: aiohttp.ClientSession, key: str, tg: Any, rng: random.Random) -> None:
        for attempt in range(2):
            la = await self._post(http, key)
            self.launches.append(la)
            if la.answer == "202":
                if rng.random() < 0.7:
                    log = ClientLog(f"run-ws {la.run_id}", "run", run_id=la.run_id)
                    self.run_clients.append(log)
                    tg.start_soon(self._run_client_later, log, rng.uniform(0.0, 8.0),
                                  random.Random(f"{self.opts.seed}-{key}"))
                return
            if attempt == 0 and rng.random() < 0.5:  # a client that retries, with the same key
                await anyio.sleep(rng.uniform(0.5, 3.0))
            else:
                return

    async def _post(self, http: aiohttp.ClientSession, key: str) -> Launch:
        t = time.time()
        try:
            async with http.post(f"{self.trio.base}/api/runs", json={"pipeline": "faulty", "params": {"tag": key}},
                                 headers={"Idempotency-Key": key}, timeout=aiohttp.ClientTimeout(total=20)) as resp:
                body = await resp.text()
                if resp.status == 202:
                    return Launch(key, "202", (await resp.json())["run_id"], t, body)
                return Launch(key, "503" if resp.status == 503 else f"other: {resp.status}", None, t, body)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return Launch(key, f"other: {type(e).__name__}", None, t, str(e))

    async def _run_client_later(self, log: ClientLog, delay: float, rng: random.Random) -> None:
        await anyio.sleep(delay)
        await run_ws_client(self.trio.base, log, rng, self.mood)

    async def launcher(self, tg: Any) -> None:
        rng = random.Random(f"{self.opts.seed}-launch")
        async with aiohttp.ClientSession() as http:
            n = 0
            async with anyio.create_task_group() as launches:
                while self.faulting:
                    await anyio.sleep(rng.uniform(1.5, 6.0))
                    n += 1
                    launches.start_soon(self.launch, http, f"fr{self.opts.seed}-{n}", tg,
                                        random.Random(f"{self.opts.seed}-key-{n}"))

    # ------------------------------------------------------------------ settle
    async def _http_ok(self, method: str, path: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.request(method, f"{self.trio.base}{path}",
                                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        if resp.status == 200:
                            return True
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await anyio.sleep(0.5)
        return False

    def journals(self) -> dict[str, Journal]:
        return read_journals(self.trio.home / "events")

    async def settle(self) -> dict[str, float]:
        t = time.monotonic()
        for name in SERVICES:
            await self.trio.ensure_up(name)
        paused = await self._http_ok("POST", f"/api/schedules/{SCHEDULE}/pause", 30)
        healthy = await self._http_ok("GET", "/healthz", 30)
        deadline = time.monotonic() + self.opts.settle
        while time.monotonic() < deadline:
            for name in SERVICES:
                await self.trio.ensure_up(name)
            if all(j.ended for j in self.journals().values()):
                break
            await anyio.sleep(1.0)
        ended_s = time.monotonic() - t
        self.mood.calm = True
        deadline = time.monotonic() + self.opts.catch_up
        while time.monotonic() < deadline:
            journals = self.journals()
            if all(client_figures(c, journals).lost == 0 for c in self.clients + self.run_clients):
                break
            await anyio.sleep(1.0)
        # orphans are looked for a few seconds after the last end, not in the instant of it
        last_end = max((event_time(j.last) for j in self.journals().values() if j.ended and j.last), default=0.0)
        await anyio.sleep(max(0.0, last_end + 5.0 - time.time()))
        return {"paused": float(paused), "healthy": float(healthy), "ended_after_s": round(ended_s, 1),
                "settle_s": round(time.monotonic() - t, 1)}

    # ------------------------------------------------------------------ the run
    async def run(self) -> Report:
        trio = self.trio
        print(f"fault run seed={self.opts.seed} seconds={self.opts.seconds} source={self.opts.source}"
              f" workdir={trio.workdir}", flush=True)
        for name in SERVICES:
            await trio.start(name)
        await self._http_ok("GET", "/healthz", 30)
        ws = [ClientLog(f"ws-all-{i}", "all") for i in range(2)]
        sse = ClientLog("sse", "all")
        zmq_log = ClientLog("zmq", "zmq")
        self.clients = [*ws, sse, zmq_log]
        pubs = [f"tcp://127.0.0.1:{trio.ports.publish}", f"tcp://127.0.0.1:{trio.ports.scheduler_publish}"]
        zsub = ZmqSubscriber(pubs, trio.base, zmq_log, random.Random(f"{self.opts.seed}-zmq"), self.mood)
        zsub.start()
        t0 = time.monotonic()
        settle: dict[str, float] = {}
        try:
            async with anyio.create_task_group() as tg:
                for i, log in enumerate(ws):
                    tg.start_soon(ws_all_client, trio.base, log, random.Random(f"{self.opts.seed}-ws{i}"), self.mood)
                tg.start_soon(sse_client, trio.base, sse, random.Random(f"{self.opts.seed}-sse"), self.mood)
                async with anyio.create_task_group() as faults:
                    for name in SERVICES:
                        faults.start_soon(self.fault_loop, name)
                    faults.start_soon(self.launcher, tg)
                    await anyio.sleep(self.opts.seconds)
                    self.faulting = False
                fault_s = time.monotonic() - t0
                settle = await self.settle()
                self.mood.stop = True
                tg.cancel_scope.cancel()
        finally:
            self.mood.stop = True
            zsub.join()
        return self.report(fault_s, settle)

    def report(self, fault_s: float, settle: dict[str, float]) -> Report:
        trio = self.trio
        journals = self.journals()
        rep = Report(self.opts.seed, trio.workdir)
        f = rep.figures
        f["fault seconds"] = round(self.opts.seconds)
        f["faults phase s"] = round(fault_s, 1)
        f["faults injected"] = dict(sorted(trio.faults.items()))
        f["faults per service"] = {s: sum(n for k, n in trio.faults.items() if k.startswith(s)) for s in SERVICES}
        f["settle"] = settle
        f["runs"] = len(journals)
        f["runs by end"] = dict(Counter((j.last or {}).get("event", "none") if j.ended else "not ended"
                                        for j in journals.values()))
        f["events journaled"] = sum(len(j.events) for j in journals.values())
        f["launch answers"] = dict(Counter(la.answer for la in self.launches))
        unrecovered, client_fail = [], []
        for c in self.clients + self.run_clients:
            fig = client_figures(c, journals)
            if c.kind != "run" or fig.lost or fig.duplicated or fig.reordered or fig.phantom:
                f[f"client {c.name}"] = (f"received {fig.received} expected {fig.expected} lost {fig.lost}"
                                         f" duplicated {fig.duplicated} reordered {fig.reordered} phantom {fig.phantom}"
                                         f" | connects {c.connects} stalls {c.stalls} disconnects {c.disconnects}"
                                         f" closes {dict(c.closes)}")
            if c.unrecovered:
                unrecovered.extend(f"{c.name}: recovered false: {r}" for r in c.unrecovered)
                f[f"client {c.name} (unrecovered, counted apart)"] = f"lost {fig.lost} duplicated {fig.duplicated}"
            elif fig.lost or fig.duplicated or fig.reordered or fig.phantom:
                client_fail.extend(f"{c.name}: {e}" for e in fig.examples)
            if c.errors:
                f[f"client {c.name} error frames"] = len(c.errors)
        run_figs = [client_figures(c, journals) for c in self.run_clients]
        f["per-run clients"] = (f"{len(self.run_clients)} clients, received {sum(x.received for x in run_figs)},"
                                f" lost {sum(x.lost for x in run_figs)}, duplicated {sum(x.duplicated for x in run_figs)},"
                                f" reordered {sum(x.reordered for x in run_figs)}")
        for c in self.clients:
            if client_figures(c, journals).received == 0:
                client_fail.append(f"{c.name}: received nothing at all")
        bad_journals = [f"{j.run_id}: {'; '.join(p)}" for j in journals.values() if (p := j.problems())]
        stuck = [f"{j.run_id}: last {j.last}" for j in journals.values() if not j.ended]
        launches = launch_figures(self.launches, journals)
        found_orphans = orphans(trio.home, journals)
        lost_false = false_runner_lost(journals, trio.down, LOST_AFTER)
        f["runner lost ends"] = sum(1 for j in journals.values()
                                    if j.ended and "runner lost" in str((j.last or {}).get("msg", "")))
        f["log lines"] = self.log_evidence()
        dump = {c.name: {"received": c.received, "hellos": c.hellos, "t0": c.t0, "errors": c.errors}
                for c in self.clients + self.run_clients}
        (trio.workdir / "clients.json").write_text(json.dumps(dump))
        rep.failures = {
            "clients lost/duplicated/reordered": client_fail,
            "resumes not recovered": unrecovered,
            "journals gapless with one terminal last": bad_journals,
            "runs stuck": stuck,
            "false runner lost": lost_false,
            "orphans": found_orphans,
            **launches,
            "services exited unasked": trio.unexpected_exits,
            "services that failed to start": trio.restart_failures,
            "every service got faults": [f"{s}: none" for s in SERVICES if not f["faults per service"][s]],
            "settled (schedule paused, healthy)": [k for k in ("paused", "healthy") if not settle.get(k)],
        }
        for name, evidence in rep.failures.items():
            f[name] = len(evidence)
        return rep

    def log_evidence(self) -> dict[str, int]:
        """Counts of telling log lines across every service log of the run."""
        patterns = {
            "ERROR/CRITICAL": re.compile(r"\b(ERROR|CRITICAL)\b"),
            "Traceback": re.compile(r"^Traceback", re.M),
            "runner lost": re.compile(r"runner lost"),
            "held by another writer": re.compile(r"held by another writer"),
            "orphan": re.compile(r"orphan", re.I),
        }
        counts: Counter[str] = Counter()
        for path in sorted(self.trio.logs.glob("*.log")):
            text = path.read_text(errors="replace")
            for name, rx in patterns.items():
                counts[name] += len(rx.findall(text))
        return dict(counts)


async def run_faults(opts: Options) -> Report:
    """The whole fault run; every process it started is ended before it returns or raises."""
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="runwire-faultrun-"))
    workdir.mkdir(parents=True, exist_ok=True)
    fr = FaultRun(opts, workdir)
    notes: list[str] = []
    try:
        return await fr.run()
    finally:
        with anyio.CancelScope(shield=True):
            notes = await anyio.to_thread.run_sync(fr.trio.end_all)
            if notes:
                print("cleanup: " + "; ".join(notes), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="seconds of faults (600)")
    ap.add_argument("--seed", type=int, default=None, help="replay a run (default: a new seed, printed)")
    ap.add_argument("--settle", type=float, default=120.0, help="at most this long for every run to end")
    ap.add_argument("--workdir", type=Path, help="keep home and logs here (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--source", default="tree",
                    help="the services' code: 'tree' (the working tree, default), or a commit such as HEAD")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    print(f"seed {seed}", flush=True)
    opts = Options(seconds=args.seconds, seed=seed, settle=args.settle, workdir=args.workdir,
                   source=args.source)
    rep = anyio.run(run_faults, opts)
    print(rep.text(), flush=True)
    if args.workdir is None and not args.keep:
        shutil.rmtree(rep.workdir, ignore_errors=True)
    return 1 if any(rep.failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
