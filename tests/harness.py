"""Test harness: configs with free loopback ports, and the services as real subprocesses.

Each service logs `<service> ready` once every socket it owns is bound or connected; `Service.start`
waits for that line, so a test never races a bind.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS_FROM = 15000
_PORTS_TO = _ephemeral_low()
_handed_out: set[int] = set()
_rng = random.Random()


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range: a port from that range
    (what binding port 0 gives) can become the source port of an outgoing connection, e.g. one of
    ZeroMQ's reconnects to an absent peer every 100 ms, before the service binds it ("Address already
    in use" in CI). Never the same port twice in one test process."""
    if _PORTS_TO - _PORTS_FROM >= 2000:
        for _ in range(500):
            port = _rng.randrange(_PORTS_FROM, _PORTS_TO)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port


@dataclass
class Ports:
    control: int = field(default_factory=free_port)
    dispatch: int = field(default_factory=free_port)
    scheduler_publish: int = field(default_factory=free_port)
    publish: int = field(default_factory=free_port)
    runner_control: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)


SLEEP_PIPELINE = """
[pipelines.sleepy]
description = "one stage that sleeps"
[pipelines.sleepy.params.seconds]
type = "float"
default = 0.2
[[pipelines.sleepy.stages]]
name = "nap"
command = ["{python}", "-c", "import time,sys; print('napping'); sys.stdout.flush(); time.sleep({seconds})"]
timeout = 60
"""


def write_config(
    tmp: Path,
    body: str = SLEEP_PIPELINE,
    *,
    ports: Ports | None = None,
    home: Path | None = None,
    scheduler: str = "",
    runner: str = "",
    gateway: str = "",
    timezone: str = "America/Chicago",
) -> tuple[Path, Ports]:
    """A runwire.toml in `tmp` with free ports; `body` holds pipelines and schedules ({python} is
    replaced by this interpreter). Extra lines for each service table go in scheduler/runner/gateway."""
    ports = ports or Ports()
    home = home or (tmp / "home")
    text = f"""
home = "{home}"
timezone = "{timezone}"
log_level = "DEBUG"

[scheduler]
control = "tcp://127.0.0.1:{ports.control}"
dispatch = "tcp://127.0.0.1:{ports.dispatch}"
publish = "tcp://127.0.0.1:{ports.scheduler_publish}"
runner_lost_after = 3.0
{scheduler}

[runner]
publish = "tcp://127.0.0.1:{ports.publish}"
control = "tcp://127.0.0.1:{ports.runner_control}"
id = "test-runner"
heartbeat_interval = 0.5
kill_grace = 1.0
{runner}

[gateway]
host = "127.0.0.1"
port = {ports.http}
subscribe = ["tcp://127.0.0.1:{ports.publish}", "tcp://127.0.0.1:{ports.scheduler_publish}"]
{gateway}
""" + body.replace("{python}", sys.executable.replace("\\", "/"))
    path = tmp / "runwire.toml"
    path.write_text(text)
    return path, ports


class Service:
    """One service (`python -m <module> --config <path>`) as a subprocess, its output in a log file."""

    def __init__(self, module: str, config: Path, log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO, name: str | None = None) -> None:
        self.module = module
        self.name = name or module.removesuffix("_svc")  # what it logs as "<name> ready"
        self.cwd = cwd  # `python -m` imports the service from here (another checkout, for a snapshot)
        self.config = config
        self.log_path = log_dir / f"{module}.{int(time.time() * 1000)}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for var in ("RUNWIRE_HOME", "RUNWIRE_CONFIG", "RUNWIRE_TOKEN"):
            if var not in (env or {}):
                self.env.pop(var, None)  # the outer shell's settings must not leak into a test
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> Service:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.cwd),
            start_new_session=True,
        )
        if wait_ready:
            try:
                self.wait_for(rf"{self.name} ready", timeout)
            except BaseException:
                # never handed to the caller, so never stopped by it: end it and close its log here
                if self.proc.poll() is None:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
                self._log.close()
                raise
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < end:
            m = rx.search(self.output())
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.module} exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.module}: no {pattern!r} within {timeout}s:\n{self.output()[-4000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; SIGKILL the whole group if it does not end in time (and fail loudly)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:  # already gone (killed by the test, or crashed)
            self._log.close()
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"{self.module} did not stop within {timeout}s of SIGTERM:\n{self.output()[-4000:]}") from None
        finally:
            self._log.close()


def demo_config(tmp: Path, *, ports: Ports | None = None, home: Path | None = None, schedules: bool = False) -> tuple[Path, Ports]:
    """The repo's own runwire.toml (the demo pipeline) with free ports and a home in `tmp`.

    Schedules are dropped unless asked for, so a test decides when runs happen.
    """
    ports = ports or Ports()
    text = (REPO / "runwire.toml").read_text()
    subs = {
        r'(?m)^home = "[^"]*"': f'home = "{home or (tmp / "home")}"',
        r'(?m)^control = "tcp://127.0.0.1:5555"': f'control = "tcp://127.0.0.1:{ports.control}"',
        r'(?m)^dispatch = "tcp://127.0.0.1:5557"': f'dispatch = "tcp://127.0.0.1:{ports.dispatch}"',
        r'(?m)^publish = "tcp://127.0.0.1:5559"': f'publish = "tcp://127.0.0.1:{ports.scheduler_publish}"',
        r'(?m)^publish = "tcp://127.0.0.1:5556"': f'publish = "tcp://127.0.0.1:{ports.publish}"',
        r'(?m)^control = "tcp://127.0.0.1:5558"': f'control = "tcp://127.0.0.1:{ports.runner_control}"',
        r"(?m)^port = 8080": f"port = {ports.http}",
        r'(?m)^subscribe = \[[^\]]*\]': f'subscribe = ["tcp://127.0.0.1:{ports.publish}", "tcp://127.0.0.1:{ports.scheduler_publish}"]',
    }
    for pattern, repl in subs.items():
        text, n = re.subn(pattern, lambda _m, r=repl: r, text)
        assert n == 1, f"runwire.toml changed shape: {pattern!r} matched {n} times"
    if not schedules:
        text = text[: text.index("[schedules.")] if "[schedules." in text else text
    path = tmp / "runwire.toml"
    path.write_text(text)
    return path, ports
