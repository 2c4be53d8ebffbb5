"""Test-side peers for the gateway tests (no tests here).

`FakePublisher` stands in for the runner and the scheduler, which are built in parallel: it speaks the
wire contract exactly as they must (journal append through `shared.journal`, then the two-frame event
message on a raw pyzmq PUB socket, plus `Heartbeat`s with {run_id: last seq}), and can drop messages
on purpose to test the gateway's recovery. `running_gateway` runs the real gateway app in-process on a
real loopback port; `collect` is a real aiohttp WebSocket client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import anyio
import msgspec
import zmq
from aiohttp import web

from gateway_svc.service import GatewayService
from shared.config import Settings, load_settings
from shared.events import Event
from shared.ids import new_run_id
from shared.journal import JournalReader, JournalWriter, begin_run, journal_path
from shared.wire import Heartbeat, configure_socket, encode_event_frames, encode_heartbeat_frames
from tests.harness import write_config

UTC = ZoneInfo("UTC")


class FakePublisher:
    """Journal first, then PUB: a stand-in for runner_svc/scheduler_svc speaking the wire contract."""

    def __init__(self, journal_dir: Path, endpoint: str, runner_id: str = "test-runner", service: str = "runner",
                 config_path: str = "/test/runwire.toml") -> None:
        self.journal_dir = journal_dir
        self.runner_id = runner_id
        self.service = service
        self.config_path = config_path
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        configure_socket(self.sock, sndhwm=1_000_000)
        self.sock.bind(endpoint)
        self.writers: dict[str, JournalWriter] = {}
        self.drop: Callable[[Event], bool] = lambda ev: False  # True: journal it but do not publish it
        self.dropped: list[Event] = []
        self.journal_dir_claim: str | None = None  # heartbeat's journal_dir (default: the real one)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.sock.close(linger=0)
        self.ctx.term()

    def publish(self, ev: Event) -> None:
        if self.drop(ev):
            self.dropped.append(ev)
            return
        self.sock.send_multipart(encode_event_frames(ev))

    def begin(self, run_id: str | None = None, pipeline: str = "sleepy", trigger: str = "manual",
              params: dict[str, Any] | None = None) -> str:
        run_id = run_id or new_run_id()
        ev = begin_run(self.journal_dir, run_id, UTC, pipeline, params or {}, {"trigger": trigger})
        self.publish(ev)
        self.writers[run_id] = JournalWriter.open(self.journal_dir, run_id, UTC)
        return run_id

    def emit(self, run_id: str, stage: str, event: str, msg: str = "", data: dict[str, Any] | None = None) -> Event:
        w = self.writers[run_id]
        ev = w.append(stage, event, msg, data)
        self.publish(ev)
        if ev.is_terminal:
            w.close()
            del self.writers[run_id]
        return ev

    def heartbeat(self, runs: dict[str, int] | None = None, stopping: bool = False) -> None:
        if runs is None:
            runs = {rid: w.last_seq for rid, w in self.writers.items()}
        hb = Heartbeat(runner_id=self.runner_id, timestamp="2026-01-01T00:00:00+00:00",
                       journal_dir=self.journal_dir_claim or str(self.journal_dir), config_path=self.config_path,
                       runs=runs, interval=0.2, service=self.service, stopping=stopping)
        self.sock.send_multipart(encode_heartbeat_frames(hb))


def journal_of(settings: Settings, run_id: str) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(e) for e in JournalReader(journal_path(settings.journal_dir, run_id)).read()]


@dataclass
class Gateway:
    app: web.Application
    base: str
    settings: Settings

    @property
    def ws(self) -> str:
        return self.base.replace("http://", "ws://")

    @property
    def stats(self) -> Any:
        from gateway_svc.keys import STATS

        return self.app[STATS]


@asynccontextmanager
async def running_gateway(settings: Settings, port: int | None = None) -> AsyncIterator[Gateway]:
    """The real gateway service on a real loopback port, in this process (so tests can read its counters),
    started as `python -m gateway_svc` starts it: `GatewayService.run` in a task group."""
    service = GatewayService(settings, host="127.0.0.1", port=port, shutdown_timeout=5)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        try:
            yield Gateway(service.app, service.url, settings)
        finally:
            tg.cancel_scope.cancel()


def make_settings(tmp: Path, gateway: str = "", **kw: Any) -> tuple[Settings, Any]:
    cfg, ports = write_config(tmp, gateway=gateway, **kw)
    return load_settings(cfg), ports


@dataclass
class Collected:
    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for f in self.frames if f["type"] == "events" for e in f["events"]]

    @property
    def last_cursor(self) -> str | None:
        cursors = [f["cursor"] for f in self.frames if "cursor" in f]
        return cursors[-1] if cursors else None


async def collect(session: aiohttp.ClientSession, url: str, *, until: Callable[[Collected], bool] | None = None,
                  timeout: float = 20.0, max_frames: int | None = None) -> Collected:
    """Read frames until the server closes, `until` holds, or `max_frames` frames came; then disconnect."""
    got = Collected()
    with anyio.fail_after(timeout):
        async with session.ws_connect(url, max_msg_size=64 * 1024 * 1024) as ws:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    got.frames.append(json.loads(msg.data))
                if (until is not None and until(got)) or (max_frames is not None and len(got.frames) >= max_frames):
                    break
            else:
                got.close_code = ws.close_code  # the server closed (not we, by leaving early)
    return got
