"""A pause of the judge is not a silence of the judged: a scheduler stopped (SIGSTOP) for longer than
`runner_lost_after` and resumed must not declare its healthy, heartbeating runner lost.

The decision (`scheduler_svc.silence`) is tested in-process with a fake clock; the whole behaviour with
the real scheduler and the real runner as subprocesses.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import anyio
import anyio.abc

from scheduler_svc.silence import JudgeClock, verdict
from shared.config import load_settings
from shared.control import ControlClient, GetRun, Launch
from shared.journal import read_events
from tests.harness import SLEEP_PIPELINE, Service, free_port, write_config


class FakeTime:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------- the clock, in-process


def test_before_the_first_tick_the_judge_clock_is_real_time() -> None:
    real = FakeTime()
    clock = JudgeClock(max_step=0.5, real=real)
    assert clock.now() == 1000.0
    real.t += 7.0  # recovery at start records times in real time: they must compare with judge time
    assert clock.now() == 1007.0
    assert clock.tick() == 0.0 and clock.now() == 1007.0


def test_ticks_on_time_follow_real_time() -> None:
    real = FakeTime()
    clock = JudgeClock(max_step=0.5, real=real)
    clock.tick()
    for _ in range(40):
        real.t += 0.25
        assert clock.tick() == 0.0
    assert clock.now() == 1010.0


def test_a_stall_counts_as_one_bounded_step() -> None:
    real = FakeTime()
    clock = JudgeClock(max_step=0.5, real=real)
    clock.tick()
    heard = clock.now()  # a heartbeat processed just before the stop
    real.t += 6.5  # SIGSTOP for 6.5 s, then SIGCONT
    assert clock.tick() == 6.0  # the time not counted
    assert clock.now() - heard == 0.5
    real.t += 0.25
    clock.tick()
    assert clock.now() - heard == 0.75


def test_real_time_going_backwards_never_moves_the_judge_back() -> None:
    real = FakeTime()
    clock = JudgeClock(max_step=0.5, real=real)
    clock.tick()
    real.t -= 3.0
    clock.tick()
    assert clock.now() == 1000.0
    real.t += 0.25
    clock.tick()
    assert clock.now() == 1000.25


def test_a_dead_runner_is_still_found_lost_while_the_judge_runs() -> None:
    real = FakeTime()
    clock = JudgeClock(max_step=0.5, real=real)
    clock.tick()
    heard = clock.now()
    ticks = 0
    while not verdict(clock.now() - heard, lost_after=3.0, unread_input=False).lost:
        real.t += 0.25
        clock.tick()
        ticks += 1
    assert ticks == 13  # 3.25 s of judge time: just past runner_lost_after


def test_verdict() -> None:
    assert not verdict(2.9, lost_after=3.0, unread_input=False).lost
    assert not verdict(3.0, lost_after=3.0, unread_input=False).lost
    v = verdict(3.1, lost_after=3.0, unread_input=False)
    assert v.lost and not v.deferred
    # input not yet read may be the heartbeat: wait for it to be read ...
    v = verdict(3.1, lost_after=3.0, unread_input=True)
    assert not v.lost and v.deferred
    # ... but a socket kept busy (a flood) never keeps a silent runner alive
    assert not verdict(6.0, lost_after=3.0, unread_input=True).lost
    assert verdict(6.1, lost_after=3.0, unread_input=True).lost


# ---------------------------------------------------------------------------- the real scheduler and runner


STALL_PIPELINE = SLEEP_PIPELINE + """
[pipelines.slow]
[pipelines.slow.params.seconds]
type = "float"
default = 12.0
[[pipelines.slow.stages]]
name = "wait"
command = ["{python}", "-c", "import time; time.sleep({seconds})"]
timeout = 120
"""


class Relay:
    """A plain TCP relay between the runner and the scheduler's dispatch port that the test can hold:
    while held, bytes wait in it. A scheduler that wakes up on a busy host finds its peers' messages a
    moment later, not at once; holding the relay a little past SIGCONT makes that moment certain."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._open = anyio.Event()
        self._open.set()

    def hold(self) -> None:
        self._open = anyio.Event()

    def release(self) -> None:
        self._open.set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port) as listener:
            task_status.started()
            await listener.serve(self._connection)

    async def _connection(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as upstream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, upstream, tg.cancel_scope)
                tg.start_soon(self._pump, upstream, client, tg.cancel_scope)

    async def _pump(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive()
                await self._open.wait()
                await dst.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            scope.cancel()  # one side closed: so does the relayed connection


async def _status(client: ControlClient, run_id: str) -> str:
    return (await client.call(GetRun(run_id=run_id))).status


async def test_a_stopped_and_resumed_scheduler_keeps_its_healthy_runner(tmp_path: Path,
                                                                      services: list[Service]) -> None:
    cfg, ports = write_config(tmp_path, STALL_PIPELINE)  # runner_lost_after 3 s, heartbeats every 0.5 s
    settings = load_settings(cfg)
    relay = Relay(ports.dispatch)
    (tmp_path / "runner-side").mkdir()
    runner_cfg, _ = write_config(tmp_path / "runner-side", STALL_PIPELINE, home=tmp_path / "home",
                                 ports=dataclasses.replace(ports, dispatch=relay.port))
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(sched)
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        services.append(Service("runner_svc", runner_cfg, tmp_path).start())
        async with ControlClient(settings.config.scheduler.control) as client:
            run_id = (await client.call(Launch(pipeline="slow", params={"seconds": 10.0}))).run_id
            with anyio.fail_after(30):
                while await _status(client, run_id) != "running":
                    await anyio.sleep(0.1)
            os.kill(sched.pid, signal.SIGSTOP)
            relay.hold()
            try:
                await anyio.sleep(6.5)  # more than twice runner_lost_after, as in the issue
            finally:
                os.kill(sched.pid, signal.SIGCONT)
            await anyio.sleep(0.5)  # the scheduler runs; the heartbeats sent meanwhile are still on their way
            relay.release()
            with anyio.fail_after(60):
                while (status := await _status(client, run_id)) in ("queued", "running"):
                    await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    events = read_events(settings.journal_dir, run_id)
    assert status == "success", [(e.stage, e.event, e.msg) for e in events]
    assert not [e for e in events if "runner lost" in e.msg]
    out = sched.output()
    assert "runner lost" not in out and "runner test-runner lost" not in out, out[-4000:]
    assert "not counted as runner silence" in out  # the stall was seen, and said so
