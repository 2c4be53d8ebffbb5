"""Peers for cluster mode's scheduler tests: a test runner on the real dispatch protocol, whose DEALER
follows the leading scheduler with the runner's own link (runner_svc.dispatch_link.follow_leader), and
which writes its runs' events into the real event stream as a runner does (start, then success, fenced
on the run's last chunk); the hosts' configs (a separate home and ports per host, one [cluster]); a
fresh database per test, and who leads."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from pathlib import Path

import anyio
import anyio.abc
import asyncpg
import pytest
import zmq
import zmq.asyncio

from runner_svc.dispatch_link import follow_leader
from runwire_cluster.events import EventStream
from shared.config import ClusterConfig, Settings, load_settings
from shared.dispatch import DispatchRun, RunAccepted, RunFinished, RunnerStatus, RunRejected, encode, from_scheduler_decoder
from shared.errors import JournalFenced
from shared.events import PIPELINE_STAGE, Event, now_timestamp
from tests.cluster_fixtures import NatsCluster, Postgres
from tests.harness import SLEEP_PIPELINE, Service, write_config


def host_config(root: Path, name: str, nats: list[str], state_url: str, body: str = SLEEP_PIPELINE) -> Path:
    """One host's runwire.toml: its own home and ports, the cluster's [cluster]."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    path, _ = write_config(folder, body, home=folder / "home")
    servers = ", ".join(f'"{u}"' for u in nats)
    path.write_text(path.read_text() + f'\n[cluster]\nnats = [{servers}]\nstate = "{state_url}"\nstream_replicas = 3\n')
    return path


def start_host(root: Path, name: str, module: str, nats: NatsCluster, db_url: str, services: list[Service],
               body: str = SLEEP_PIPELINE) -> Service:
    """One host's service (its own config and home), stopped with the test's services."""
    svc = Service(module, host_config(root, name, nats.urls, db_url, body), root).start()
    services.append(svc)
    return svc


async def two_schedulers(root: Path, nats: NatsCluster, db_url: str, services: list[Service],
                         body: str = SLEEP_PIPELINE) -> tuple[Service, Service]:
    """Scheduler a, once it leads, then b (standing by)."""
    a = start_host(root, "a", "scheduler_svc", nats, db_url, services, body)
    await leader_of([a])
    return a, start_host(root, "b", "scheduler_svc", nats, db_url, services, body)


def gateway_port(svc: Service) -> int:
    """The HTTP port of a gateway started with start_host."""
    return int(re.search(r"port = (\d+)", svc.config.read_text())[1])  # type: ignore[index]


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` on the event loop (the test runner shares it) until true; fail naming `what`."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout}s: {what}")
        await anyio.sleep(0.1)


@pytest.fixture
async def db_url(postgres: Postgres) -> str:  # noqa: F811
    """A fresh database of the module's server for each test."""
    return await postgres.new_database("sched")


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


def leading(svc: Service) -> int:
    """How many terms this scheduler has led."""
    return len(re.findall(r"leading: lease 'scheduler' attempt \d+ taken", svc.output()))


async def until_match(svc: Service, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    found: list[re.Match[str]] = []

    def check() -> bool:
        m = re.search(pattern, svc.output())
        if m:
            found.append(m)
        return m is not None

    await until(check, timeout, f"{svc.module}: {pattern!r}")
    return found[0]


async def leader_of(services: list[Service], timeout: float = 30.0) -> Service:
    """The one scheduler leading now (the other a standby)."""
    await until(lambda: sum(leading(s) for s in services) >= 1, timeout, "a scheduler leads")
    [leader] = [s for s in services if leading(s)]
    return leader


async def stream_events(nats: NatsCluster, run_ids: list[str]) -> dict[str, list[str]]:
    """run id -> its events' kinds in the event stream."""
    async with await EventStream.connect(ClusterConfig(nats=nats.urls, state="postgresql://x")) as stream:
        return {r: [ev.event for ev in await stream.read(r)] for r in run_ids}


class PeerRunner:
    """Takes dispatches from whichever scheduler leads; each run: start, `work` seconds, success."""

    def __init__(self, config: Path, runner_id: str = "test-runner", capacity: int = 4, work: float = 0.3) -> None:
        self.settings: Settings = load_settings(str(config))
        self.runner_id = runner_id
        self.capacity = capacity
        self.work = work
        self.executed: Counter[str] = Counter()  # run id -> times it was executed here
        self.redispatched: list[tuple[str, int]] = []  # dispatches of a run that had already run here
        self.fenced: list[str] = []
        self.attempts: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.sent_dropped = 0
        self.gate: anyio.Event | None = None  # when set by a test: runs end only once it is set
        self.gated: set[str] = set()  # runs that waited at the gate
        self.silent = False  # True: no heartbeats (the scheduler will declare this runner lost)
        self._sock: zmq.asyncio.Socket | None = None

    async def _send(self, msg: RunnerStatus | RunAccepted | RunFinished | RunRejected) -> None:
        assert self._sock is not None
        try:
            await self._sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.sent_dropped += 1  # no leader connected: as the runner, the next status says it all

    def _status(self) -> RunnerStatus:
        return RunnerStatus(runner_id=self.runner_id, capacity=self.capacity, pid=os.getpid(), version="test",
                            config_path=str(self.settings.path), journal_dir=str(self.settings.journal_dir),
                            publish="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1", runs=dict(self.running))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self.settings.config.cluster is not None
        ctx = zmq.asyncio.Context()
        sock = self._sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.runner_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        try:
            async with await EventStream.connect(self.settings.config.cluster) as stream, \
                    anyio.create_task_group() as tg:
                await tg.start(follow_leader, sock, self.settings)
                tg.start_soon(self._heartbeats)
                task_status.started()
                while True:
                    msg = from_scheduler_decoder.decode((await sock.recv_multipart())[-1])
                    if isinstance(msg, DispatchRun):
                        await self._take(tg, stream, msg)
        finally:
            sock.close(linger=0)
            ctx.term()

    async def _heartbeats(self) -> None:
        while True:
            if not self.silent:
                await self._send(self._status())
            await anyio.sleep(0.3)

    async def _take(self, tg: anyio.abc.TaskGroup, stream: EventStream, msg: DispatchRun) -> None:
        if msg.run_id in self.running:
            await self._send(RunAccepted(runner_id=self.runner_id, run_id=msg.run_id, attempt=self.running[msg.run_id]))
            return
        if self.executed[msg.run_id]:
            self.redispatched.append((msg.run_id, msg.attempt))
            await self._send(RunRejected(runner_id=self.runner_id, run_id=msg.run_id, attempt=msg.attempt,
                                   reason="it ran here already"))
            return
        self.executed[msg.run_id] += 1
        self.running[msg.run_id] = msg.attempt
        await self._send(RunAccepted(runner_id=self.runner_id, run_id=msg.run_id, attempt=msg.attempt))
        tg.start_soon(self._execute, stream, msg)

    async def _execute(self, stream: EventStream, msg: DispatchRun) -> None:
        writer = await stream.writer(msg.run_id)

        def ev(kind: str, text: str) -> Event:
            return Event(run_id=msg.run_id, seq=writer.last_seq + 1, timestamp=now_timestamp(UTC), stage=PIPELINE_STAGE,
                         event=kind, msg=text, data={"runner": self.runner_id, "attempt": msg.attempt})  # type: ignore[arg-type]

        try:
            await writer.append([ev("start", f"started on {self.runner_id}")])
            await anyio.sleep(self.work)
            if self.gate is not None and not self.gate.is_set():
                self.gated.add(msg.run_id)
                await self.gate.wait()
            await writer.append([ev("success", "done")])
        except JournalFenced:
            self.fenced.append(msg.run_id)
            return
        finally:
            self.running.pop(msg.run_id, None)
        await self._send(RunFinished(runner_id=self.runner_id, run_id=msg.run_id, attempt=msg.attempt, outcome="success"))
