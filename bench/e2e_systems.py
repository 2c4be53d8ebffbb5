"""The three systems of the end-to-end benchmark, behind one shape: start, the services' pids (for CPU
and memory), where a WebSocket client connects, and `launch(rate, count)`, which starts one run of the
load and returns its id; `finish(run)` waits until the load is over.

- runwire: scheduler, runner and gateway as subprocesses (as tests/harness.py starts them), the load a
  pipeline launched with POST /api/runs, whose callable stage emits the ticks (bench/e2e_load.py);
- polling: the seeds' design (bench/baselines/polling.py) fed by a JSONL producer process;
- redis: a redis-server of its own (temp dir, free loopback port, no persistence) and the gateway of
  bench/baselines/redis_gateway.py, fed by a producer process that PUBLISHes.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import anyio

from bench.e2e_load import LOAD_PIPELINE
from gateway_svc.hub import BLOCKS_DIR
from shared.config import load_settings
from shared.ids import new_run_id
from tests.harness import REPO, Service, free_port, write_config

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
       "PYTHONUNBUFFERED": "1"}


def _ticks(stat: str) -> int:
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def cpu_seconds(pid: int, workers: bool = False) -> float:
    """CPU seconds of `pid`, every thread's (libzmq's I/O threads, anyio's workers), the ended ones
    too: the live threads in ns from /proc/<pid>/task/*/schedstat, and the ended threads' share of the
    process's /proc/<pid>/stat (which keeps them) in clock ticks. Without schedstat, the process's
    ticks (10 ms: coarse for a 1 s run, fine for the full runs' 3 s and more).

    `workers`: with its child processes' (the gateway's archive worker): the live ones', and those
    reaped (in the stat's cutime + cstime). Not for the runner, whose children are the stages, the
    load itself."""
    own = _own_cpu_seconds(pid)
    if not workers:
        return own
    tick = os.sysconf("SC_CLK_TCK")
    reaped = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = own + (int(reaped[13]) + int(reaped[14])) / tick
    for child in child_pids(pid):
        try:
            total += _own_cpu_seconds(child)
        except OSError:
            continue  # it just ended: its time is in the reaped share from now on
    return total


def child_pids(ppid: int) -> list[int]:
    """The live processes whose parent is `ppid` (from /proc: no children file on every kernel)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                    found.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _own_cpu_seconds(pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    process = _ticks(Path(f"/proc/{pid}/stat").read_text())
    live_ns = live_ticks = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                ns = int((task / "schedstat").read_text().split()[0])
                ticks = _ticks((task / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended: its time is in the process's ticks
            live_ns += ns
            live_ticks += ticks
    except OSError:
        live_ns = 0
    if not live_ns:
        return process / tick
    return live_ns / 1e9 + max(process - live_ticks, 0) / tick


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's lifetime peak; RESULTS.md says peaks are "since start" at worst


class _Proc:
    """A helper process of ours that prints `ready`; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, stdin: bool = False) -> None:
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.PIPE if stdin else None,
                                     env=ENV, cwd=str(REPO), text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"{argv}: said {line!r}, not ready; see {log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stdin):
            if f is not None:
                f.close()
        self.log.close()


class LoadFailed(RuntimeError):
    """The load run ended otherwise than success (the message says how, in the system's words)."""


class System:
    name = ""
    plain = True  # one event per WebSocket frame
    features: frozenset[str] = frozenset()  # of "sse", "zmq", "resume", "replay"
    ws_url = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp / self.name
        self.tmp.mkdir(parents=True)

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    async def launch(self, rate: float, count: int, lead: int = 0, pause: float = 0.0) -> str:
        raise NotImplementedError

    async def finish(self, run_id: str, timeout: float = 120.0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Runwire(System):
    name = "runwire"
    plain = False
    features = frozenset({"sse", "zmq", "resume", "replay"})

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.cfg, self.ports = write_config(
            self.tmp, LOAD_PIPELINE, runner="capacity = 8",
            gateway="client_queue_events = 2000000\nclient_queue_bytes = 536870912", timezone="UTC")
        text = self.cfg.read_text().replace('log_level = "DEBUG"', 'log_level = "INFO"')
        self.cfg.write_text(text + self._extra_config())  # the harness's DEBUG logs a line per event: not what a user runs
        self.settings = load_settings(self.cfg)
        self.services: list[Service] = []
        env = {"PYTHONPATH": ENV["PYTHONPATH"]}
        for module in ("scheduler_svc", "runner_svc"):
            self.services.append(Service(module, self.cfg, self.tmp, env=env).start())
        self.services.append(Service("gateway_svc", self._gateway_config(), self.tmp, env=env).start())
        self.base = f"http://127.0.0.1:{self.ports.http}"
        self.ws_url = f"ws://127.0.0.1:{self.ports.http}/ws/events"
        self.sse_url = f"{self.base}/api/events"
        self.zmq_url = f"tcp://127.0.0.1:{self.ports.publish}"

    def _extra_config(self) -> str:
        return ""

    def _gateway_config(self) -> Path:
        return self.cfg

    @property
    def journal_dir(self) -> Path:
        return self.settings.journal_dir

    def pids(self) -> dict[str, int]:
        return {s.module.removesuffix("_svc"): s.pid for s in self.services}

    async def launch(self, rate: float, count: int, lead: int = 0, pause: float = 0.0) -> str:
        body = {"pipeline": "load", "params": {"rate": float(rate), "count": count, "lead": lead, "pause": float(pause)}}
        async with aiohttp.ClientSession() as http, http.post(f"{self.base}/api/runs", json=body) as resp:
            reply = await resp.json()
            if resp.status != 202:
                raise RuntimeError(f"launch refused: {resp.status} {reply}")
            return str(reply["run_id"])

    async def finish(self, run_id: str, timeout: float = 120.0) -> None:
        with anyio.fail_after(timeout):
            async with aiohttp.ClientSession() as http:
                while True:
                    async with http.get(f"{self.base}/api/runs/{run_id}") as resp:
                        run = await resp.json()
                    status = run.get("status")
                    if status in ("success", "failure", "cancelled"):
                        if status != "success":
                            raise LoadFailed(f"load run {run_id} ended {status}: {run.get('msg') or '-'}")
                        return
                    await anyio.sleep(0.1)

    def restart_gateway(self, forget_blocks: bool = False) -> None:
        """Stop the gateway and start it again: what it held in memory is gone; with `forget_blocks`,
        so are the clean journal blocks it kept in its state directory (a gateway that never saw the runs)."""
        i = next(i for i, svc in enumerate(self.services) if svc.module == "gateway_svc")
        self.services[i].stop()
        if forget_blocks:
            shutil.rmtree(self.settings.state_dir / BLOCKS_DIR, ignore_errors=True)
        self.services[i] = Service("gateway_svc", self._gateway_config(), self.tmp,
                                   env={"PYTHONPATH": ENV["PYTHONPATH"]}).start()

    def stop(self) -> None:
        for s in reversed(self.services):
            s.stop()


class RunwireCluster(Runwire):
    """runwire in cluster mode on this one machine: a 3-node JetStream cluster and a PostgreSQL of its own
    (as the tests start them), the runner appending each batch to JetStream before it publishes, and a
    gateway on a home of its own (no journals: it fills and replays from JetStream). The cost of
    several hosts, measured beside single-host mode; resume and replay are measured for runwire only."""

    name = "cluster"
    features = frozenset({"sse", "zmq"})

    def __init__(self, tmp: Path) -> None:
        from tests.cluster_fixtures import start_nats_cluster, start_postgres

        # its readiness check runs an event loop of its own: in a thread, since the benchmark's loop is running
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            self.nats = pool.submit(start_nats_cluster).result()
        try:
            self.pg = start_postgres()
        except BaseException:
            self.nats.stop()
            raise
        try:
            super().__init__(tmp)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _extra_config(self) -> str:
        servers = ", ".join(f'"{u}"' for u in self.nats.urls)
        return f'\n[cluster]\nnats = [{servers}]\nstate = "{self.pg.url}"\nstream_replicas = 3\n'

    def _gateway_config(self) -> Path:
        path = self.tmp / "gateway.toml"
        home = self.settings.home
        path.write_text(self.cfg.read_text().replace(f'home = "{home}"', f'home = "{home}-gateway"', 1))
        return path

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        import urllib.error
        import urllib.request

        end = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not ready yet: a leader, a registered runner and the event stream are needed
            if time.monotonic() > end:
                raise RuntimeError(f"cluster mode: {self.base}/healthz not 200 within {timeout:g}s")
            time.sleep(0.25)

    def version(self) -> str:
        return "NATS JetStream 3 nodes + PostgreSQL, on loopback"

    def stop(self) -> None:
        try:
            if hasattr(self, "services"):
                super().stop()
        finally:
            self.nats.stop()
            shutil.rmtree(self.nats.root, ignore_errors=True)
            if self.pg.running():
                self.pg.stop("immediate")
            shutil.rmtree(self.pg.root, ignore_errors=True)


class _Produced(System):
    """A baseline: a server process plus one producer process per run."""

    kind = ""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.producers: dict[str, subprocess.Popen[str]] = {}

    def _target(self) -> str:
        raise NotImplementedError

    async def launch(self, rate: float, count: int, lead: int = 0, pause: float = 0.0) -> str:
        run_id = new_run_id("load")
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baselines.producers", self.kind, self._target(), run_id, str(rate), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, cwd=str(REPO), text=True)
        assert proc.stdin is not None and proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        if line.strip() != "ready":
            proc.kill()
            raise RuntimeError(f"{self.kind} producer said {line!r}")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        self.producers[run_id] = proc
        return run_id

    async def finish(self, run_id: str, timeout: float = 120.0) -> None:
        proc = self.producers.pop(run_id)
        assert proc.stdout is not None and proc.stdin is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        proc.stdin.close()
        await anyio.to_thread.run_sync(lambda: proc.wait(timeout))
        proc.stdout.close()
        if proc.returncode != 0 or not line.startswith("done"):
            raise LoadFailed(f"{self.kind} producer for {run_id} ended {proc.returncode} ({line!r})")


class Polling(_Produced):
    name = "polling"
    kind = "jsonl"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.events_dir = self.tmp / "events"
        self.events_dir.mkdir()
        port = free_port()
        self.server = _Proc([sys.executable, "-m", "bench.baselines.polling", str(self.events_dir), str(port)],
                            self.tmp / "polling.log")
        self.ws_url = f"ws://127.0.0.1:{port}/ws/events"

    def _target(self) -> str:
        return str(self.events_dir)

    def pids(self) -> dict[str, int]:
        return {"backend": self.server.pid}

    def stop(self) -> None:
        self.server.stop()


class Redis(_Produced):
    name = "redis"
    kind = "redis"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: apt-get install -y redis-server (or leave out --systems redis)")
        self.redis_port = free_port()
        log = open(self.tmp / "redis.log", "wb")
        self.redis = subprocess.Popen(
            [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.tmp), "--save", "",
             "--appendonly", "no", "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_redis()
        port = free_port()
        self.gateway = _Proc([sys.executable, "-m", "bench.baselines.redis_gateway", str(self.redis_port), str(port)],
                             self.tmp / "redis_gateway.log")
        self.ws_url = f"ws://127.0.0.1:{port}/ws/events"

    def _wait_redis(self) -> None:
        import redis

        end = time.monotonic() + 10
        r = redis.Redis(host="127.0.0.1", port=self.redis_port)
        try:
            while True:
                try:
                    r.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > end or self.redis.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.redis_port} did not start; see {self.tmp}/redis.log") from None
                    time.sleep(0.05)
        finally:
            r.close()

    def _target(self) -> str:
        return str(self.redis_port)

    def version(self) -> str:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        return out.split("v=")[1].split()[0] if "v=" in out else out.strip()

    def pids(self) -> dict[str, int]:
        return {"redis-server": self.redis.pid, "gateway": self.gateway.pid}

    def stop(self) -> None:
        self.gateway.stop()
        if self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(10)


SYSTEMS: dict[str, type[System]] = {"runwire": Runwire, "redis": Redis, "polling": Polling, "cluster": RunwireCluster}
