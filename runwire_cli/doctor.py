"""`runwire doctor`: the checklist of seed 000 ("why scheduled runs don't appear in the dashboard"),
automated for runwire. One line per check, the cause when it fails, exit status 1 on any failure.

What it checks, in the order a failure would be looked for:
one config (the file every service loaded), one journal directory (what each service writes or reads),
each service up and answering on its endpoints, the journal directory writable, the scheduler seeing a
runner, the gateway healthy, and a probe event that travels runner -> journal -> ZeroMQ -> gateway ->
WebSocket within a second.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio
import msgspec

from shared.config import Settings, endpoints_of
from shared.control import ControlClient, Identity, Probe
from shared.curve import load_keys
from shared.errors import RunwireError
from shared.httpapi import Health
from shared.protocol import EventsFrame, Hello
from shared.replies import IdentityInfo

from .client import GatewayClient, gateway_url
from .render import json_line

PROBE_DEADLINE = 1.0  # a probe slower than this is called slow; one not there after 3x is a FAIL
# a gateway started a moment ago has not heard a runner heartbeat yet: /healthz is asked again for
# this long before its failure counts (the runner's control socket has answered by then)
HEALTH_SETTLE = 3.0
_health_decoder = msgspec.json.Decoder(Health)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Doctor:
    def __init__(self, settings: Settings, gateway: str | None) -> None:
        self.settings = settings
        self.gateway = gateway_url(settings, gateway)
        self.checks: list[Check] = []
        self.identities: dict[str, IdentityInfo] = {}
        self.keys = load_keys(settings)  # a cluster's control sockets answer CURVE clients only

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def _same_dir(self, who: str, journal_dir: str | None, config_path: str | None) -> None:
        if self.settings.config.cluster is not None:
            return  # cluster mode: each host has its own journal directory and config file
        mine = str(self.settings.journal_dir)
        if journal_dir is None:
            self.add(f"{who} journal directory", False, f"{who} did not report its journal directory")
        elif Path(journal_dir) != Path(mine):
            self.add(
                f"{who} journal directory", False,
                f"{who} uses {journal_dir} but this config says {mine}: events written in one place "
                f"are read from another (start every service with the same config / RUNWIRE_HOME)",
            )
        else:
            self.add(f"{who} journal directory", True, journal_dir)
        if config_path is not None and Path(config_path) != self.settings.path:
            self.add(f"{who} config", False, f"{who} loaded {config_path}, this is {self.settings.path}")

    async def check_config(self) -> None:
        c = self.settings.config
        self.add("config", True, f"{self.settings.path} ({len(c.pipelines)} pipelines, {len(c.schedules)} schedules)")

    async def check_journal_writable(self) -> None:
        d = self.settings.journal_dir
        probe = d / f".doctor-{os.getpid()}.tmp"
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as e:
            self.add("journal writable", False, f"{d}: {e.strerror}")
            return
        self.add("journal writable", True, str(d))

    async def check_service(self, who: str, endpoint: str) -> bool:
        try:
            async with ControlClient(endpoint, timeout=2.0, keys=self.keys) as client:
                info = await client.call(Identity())
        except RunwireError as e:
            self.add(f"{who} reachable", False, f"{who} not answering on {endpoint}: {e}")
            return False
        self.identities[who] = info
        self.add(f"{who} reachable", True, f"{endpoint} (pid {info.pid}, version {info.version})")
        self._same_dir(who, info.journal_dir, info.config_path)
        return True

    async def check_scheduler_sees_runner(self) -> None:
        scheduler = self.identities.get("scheduler")
        runners = scheduler.runners if scheduler is not None else {}
        if not runners:
            self.add("scheduler sees a runner", False, "no runner connected to the scheduler's dispatch socket "
                     f"({self.settings.config.scheduler.dispatch}): runs would wait queued")
            return
        for rid, facts in runners.items():
            if Path(facts.journal_dir) != self.settings.journal_dir:
                self.add("scheduler sees a runner", False,
                         f"runner {rid} writes {facts.journal_dir}, not {self.settings.journal_dir}")
                return
        self.add("scheduler sees a runner", True, ", ".join(sorted(runners)))

    async def check_gateway(self, client: GatewayClient) -> bool:
        deadline = time.monotonic() + HEALTH_SETTLE
        while True:
            try:
                async with client.session.get(self.gateway + "/healthz") as resp:
                    status = resp.status
                    raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                self.add("gateway reachable", False, f"no answer from {self.gateway}/healthz: {e or type(e).__name__}")
                return False
            if status == 200 or time.monotonic() >= deadline:
                break
            await anyio.sleep(0.25)
        self.add("gateway reachable", True, self.gateway)
        try:
            health: Health | None = _health_decoder.decode(raw)
        except msgspec.DecodeError as e:  # not a runwire gateway, or one of another version
            health = None
            self.add("gateway answers /healthz as runwire does", False, f"{self.gateway}/healthz: {e}")
        if health is not None:
            self._same_dir("gateway", health.journal_dir, health.config_path)
        if status == 200:
            self.add("gateway healthy", True, "/healthz 200")
        else:
            self.add("gateway healthy", False, f"/healthz {status}: {_failing(health, raw)}")
        return True

    async def check_probe(self, client: GatewayClient, runner_control: str, name: str = "probe event",
                          path: str = "runner -> journal -> ZeroMQ -> gateway -> WebSocket") -> None:
        """Subscribe to every run on the gateway first, then ask the runner for a probe run, and time
        how long its terminal event takes to come back over the WebSocket."""
        started = anyio.Event()
        send, receive = anyio.create_memory_object_stream[tuple[str, float]](1000)
        refused: list[RunwireError] = []

        async def watch() -> None:
            async with send:
                try:
                    async for frame in client.frames("/ws/events"):
                        if isinstance(frame, Hello):
                            started.set()
                        elif isinstance(frame, EventsFrame):
                            for ev in frame.events:
                                if ev.is_terminal:
                                    await send.send((ev.run_id, time.perf_counter()))
                except RunwireError as e:  # refused (no token?) or gone: that is the finding
                    refused.append(e)
                    started.set()

        run_id = None
        arrived: float | None = None
        failure: str | None = None
        t0 = 0.0
        # failures are recorded inside the task group, not raised through it (it would wrap them)
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(watch)
            with anyio.move_on_after(5):
                await started.wait()
            if refused:
                failure = str(refused[0])
            elif not started.is_set():
                failure = "no hello from the gateway's /ws/events within 5 s"
            else:
                t0 = time.perf_counter()
                try:
                    async with ControlClient(runner_control, timeout=2.0, keys=self.keys) as rc:
                        run_id = (await rc.call(Probe())).run_id
                except RunwireError as e:
                    failure = str(e)
                else:
                    with anyio.move_on_after(PROBE_DEADLINE * 3):
                        async for rid, when in receive:
                            if rid == run_id:
                                arrived = when
                                break
            tg.cancel_scope.cancel()
        if failure is not None:
            self.add(name, False, failure)
            return
        if arrived is None:
            self.add(name, False, f"probe run {run_id} written by the runner never reached the "
                     "WebSocket: check the gateway's `subscribe` endpoints and the runner's `publish`")
            return
        ms = (arrived - t0) * 1000
        # it arrived: the path works. How fast is a figure (slow is worth saying), not a verdict: a loaded
        # machine is not a broken one
        self.add(name, True, f"{path} in {ms:.0f} ms"
                 + ("" if ms <= PROBE_DEADLINE * 1000 else f" (slow: over {PROBE_DEADLINE:g} s)") + f"; run {run_id}")

    async def run(self) -> None:
        await self.check_config()
        await self.check_journal_writable()
        ep = endpoints_of(self.settings)
        scheduler_up = await self.check_service("scheduler", ep["scheduler.control"])
        runner_up = await self.check_service("runner", ep["runner.control"])
        if scheduler_up:
            await self.check_scheduler_sees_runner()
        async with GatewayClient(self.gateway, self.settings.token, timeout=5.0) as client:
            gateway_up = await self.check_gateway(client)
            if runner_up and gateway_up:
                await self.check_probe(client, ep["runner.control"])
            else:
                down = [w for w, up in (("runner", runner_up), ("gateway", gateway_up)) if not up]
                self.add("probe event", False, f"not sent: {' and '.join(down)} down")


def _failing(health: Health | None, raw: bytes) -> str:
    if health is None:
        return raw[:300].decode(errors="replace")
    bad = [f"{name}: {getattr(health.checks, name).detail}" for name in health.failed]
    return "; ".join(bad) or (health.error.message if health.error else "no failed check named")


async def run_doctor(doctor: Doctor, *, as_json: bool = False) -> int:
    await doctor.run()
    colour = sys.stdout.isatty() and not as_json
    for c in doctor.checks:
        if as_json:
            print(json_line({"check": c.name, "ok": c.ok, "detail": c.detail}))
            continue
        mark = "PASS" if c.ok else "FAIL"
        if colour:
            mark = f"\x1b[{'32' if c.ok else '31;1'}m{mark}\x1b[0m"
        print(f"{mark}  {c.name}: {c.detail}")
    failed = [c for c in doctor.checks if not c.ok]
    if not as_json:
        print(f"{len(doctor.checks) - len(failed)} of {len(doctor.checks)} checks passed")
    return 1 if failed else 0
