"""The scheduler as a real subprocess with the real runner (`runner_svc`), over real sockets and journals:
launch -> queued -> dispatched -> success, waiting for a runner, runner SIGKILL -> runner lost, scheduler
kill -9 and restart, cancel (queued and running), pause across restarts, bad control input.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio

from shared.config import load_settings
from shared.control import Cancel, ControlClient, GetRun, Identity, Launch, ListRuns, ListSchedules, Pause, Resume
from shared.errors import BadParams, Conflict, InvalidRunId, NotFound, ProtocolError, UnknownPipeline
from shared.journal import read_events
from shared.replies import RunDetail
from shared.runstate import fold, open_stages
from shared.wire import decode_event_payload, decode_heartbeat_payload
from tests.harness import SLEEP_PIPELINE, Service, write_config

SLOW = SLEEP_PIPELINE + """
[pipelines.slow]
max_concurrent = 1
[pipelines.slow.params.seconds]
type = "float"
default = 60.0
[[pipelines.slow.stages]]
name = "wait"
command = ["{python}", "-c", "import time; time.sleep({seconds})"]
timeout = 120
"""


def setup(tmp_path: Path, body: str = SLOW, scheduler: str = "") -> tuple[Path, Any]:
    cfg, _ = write_config(tmp_path, body, scheduler=scheduler)
    return cfg, load_settings(cfg)


async def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if hasattr(got, "__await__"):
            got = await got
        if got:
            return got
        await anyio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def run_status(client: ControlClient, run_id: str, status: str) -> RunDetail | None:
    info = await client.call(GetRun(run_id=run_id))
    return info if info.status == status else None


def kinds(settings: Any, run_id: str) -> list[tuple[str, str]]:
    return [(e.stage, e.event) for e in read_events(settings.journal_dir, run_id)]


def assert_one_life(settings: Any, run_id: str, outcome: str) -> None:
    """queued first, exactly one start and one terminal (the last event), seqs gapless."""
    events = read_events(settings.journal_dir, run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    pipe = [e.event for e in events if e.stage == "pipeline"]
    assert pipe[0] == "queued" and pipe.count("start") <= 1
    assert pipe[-1] == outcome and sum(p in ("success", "failure", "cancelled") for p in pipe) == 1
    assert events[-1].stage == "pipeline"


async def test_launch_runs_to_success_and_publishes_queued(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    services.append(Service("runner_svc", cfg, tmp_path).start())
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(settings.config.scheduler.publish)
    try:
        async with ControlClient(settings.config.scheduler.control) as client:
            # a heartbeat proves the subscription is live before we launch
            await wait_until("scheduler heartbeat", lambda: sub.poll(100), 10)
            topic, payload = await sub.recv_multipart()
            assert topic == b"hb/scheduler"
            hb = decode_heartbeat_payload(payload)
            assert hb.service == "scheduler" and hb.journal_dir == str(settings.journal_dir)

            reply = await client.call(Launch(pipeline="sleepy", params={"seconds": 0.1}))
            assert reply.status == "queued"
            run_id = reply.run_id
            assert read_events(settings.journal_dir, run_id)[0].event == "queued"  # durable before the reply
            await wait_until("success", lambda: run_status(client, run_id, "success"))
            assert_one_life(settings, run_id, "success")
            start = [e for e in read_events(settings.journal_dir, run_id) if e.event == "start" and e.stage == "pipeline"][0]
            assert start.data and start.data["attempt"] == 1 and start.data["runner"] == "test-runner"

            async def queued_published() -> bool:
                while await sub.poll(100):
                    topic, payload = await sub.recv_multipart()
                    if topic.startswith(b"ev/"):
                        ev = decode_event_payload(payload)
                        if ev.run_id == run_id and ev.event == "queued":
                            return True
                return False
            await wait_until("queued event on scheduler.publish", queued_published, 10)

            ident = await client.call(Identity())
            assert ident.service == "scheduler" and ident.journal_dir == str(settings.journal_dir)
            assert ident.runners["test-runner"].journal_dir == str(settings.journal_dir)
            assert ident.runners["test-runner"].config_path == str(cfg)

            with pytest.raises(UnknownPipeline):
                await client.call(Launch(pipeline="nope"))
            with pytest.raises(BadParams):
                await client.call(Launch(pipeline="sleepy", params={"seconds": "x"}))
            runs = (await client.call(ListRuns())).runs
            assert [r.run_id for r in runs] == [run_id]  # refused launches created nothing
    finally:
        sub.close(0)
        ctx.term()


async def test_no_runner_waits_with_reason_then_runs(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    async with ControlClient(settings.config.scheduler.control) as client:
        run_id = (await client.call(Launch(pipeline="sleepy", params={"seconds": 0.1}))).run_id
        await anyio.sleep(0.5)
        info = await client.call(GetRun(run_id=run_id))
        assert info.status == "queued" and info.waiting is not None and info.waiting.startswith("waiting for a runner")
        services.append(Service("runner_svc", cfg, tmp_path).start())
        await wait_until("success", lambda: run_status(client, run_id, "success"))
        assert_one_life(settings, run_id, "success")


async def test_runner_killed_mid_stage_fails_as_lost_and_frees_the_slot(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path, scheduler="max_concurrent_runs = 1")
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    runner = Service("runner_svc", cfg, tmp_path).start()
    services.append(runner)
    async with ControlClient(settings.config.scheduler.control) as client:
        # (the stage's own process outlives the killed runner; keep it short)
        run_id = (await client.call(Launch(pipeline="slow", params={"seconds": 15.0}))).run_id
        await wait_until("running", lambda: run_status(client, run_id, "running"))
        second = (await client.call(Launch(pipeline="sleepy", params={"seconds": 0.1}))).run_id
        info = await client.call(GetRun(run_id=second))
        assert info.status == "queued" and info.waiting is not None and "global limit" in info.waiting
        runner.kill9()
        failed = await wait_until("runner-lost failure", lambda: run_status(client, run_id, "failure"))
        assert failed.msg.startswith("runner lost: no heartbeat from test-runner")
        assert_one_life(settings, run_id, "failure")
        assert open_stages(fold(run_id, read_events(settings.journal_dir, run_id))) == []  # no stage left running
        services.append(Service("runner_svc", cfg, tmp_path).start())
        await wait_until("the next run", lambda: run_status(client, second, "success"))
        assert_one_life(settings, run_id, "failure")  # the restarted runner did not touch the ended run


async def test_scheduler_kill9_with_runs_queued_then_restart_runs_each_once(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path)
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    async with ControlClient(settings.config.scheduler.control) as client:
        ids = [(await client.call(Launch(pipeline="sleepy", params={"seconds": 0.05}))).run_id for _ in range(5)]
    sched.kill9()
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    services.append(Service("runner_svc", cfg, tmp_path).start())
    async with ControlClient(settings.config.scheduler.control) as client:
        for run_id in ids:
            await wait_until(f"{run_id} success", lambda r=run_id: run_status(client, r, "success"))
    for run_id in ids:
        assert_one_life(settings, run_id, "success")


async def test_scheduler_kill9_while_running_readopts_the_run(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path)
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(Service("runner_svc", cfg, tmp_path).start())
    async with ControlClient(settings.config.scheduler.control) as client:
        run_id = (await client.call(Launch(pipeline="slow", params={"seconds": 6.0}))).run_id
        await wait_until("running", lambda: run_status(client, run_id, "running"))
    sched.kill9()
    sched2 = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(sched2)
    async with ControlClient(settings.config.scheduler.control) as client:
        await wait_until("success", lambda: run_status(client, run_id, "success"), 60)
    assert_one_life(settings, run_id, "success")
    assert "re-adopted" in sched2.output() or "adopted" in sched2.output()


async def test_cancel_queued_and_running(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    async with ControlClient(settings.config.scheduler.control) as client:
        queued = (await client.call(Launch(pipeline="slow"))).run_id
        reply = await client.call(Cancel(run_id=queued, reason="not today"))
        assert reply.status == "cancelled"
        assert kinds(settings, queued) == [("pipeline", "queued"), ("pipeline", "cancelled")]
        with pytest.raises(Conflict):
            await client.call(Cancel(run_id=queued))
        with pytest.raises(NotFound):
            await client.call(Cancel(run_id="20000101T000000000000Z-nothing"))
        with pytest.raises(InvalidRunId):
            await client.call(Cancel(run_id="../../etc/passwd"))

        services.append(Service("runner_svc", cfg, tmp_path).start())
        running = (await client.call(Launch(pipeline="slow"))).run_id
        await wait_until("running", lambda: run_status(client, running, "running"))
        assert (await client.call(Cancel(run_id=running))).status == "cancelling"
        await wait_until("cancelled", lambda: run_status(client, running, "cancelled"))
        assert_one_life(settings, running, "cancelled")


PAUSABLE = SLEEP_PIPELINE + """
[schedules.hourly]
pipeline = "sleepy"
cron = "0 * * * *"
"""


async def test_pause_survives_restart(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path, PAUSABLE)
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    async with ControlClient(settings.config.scheduler.control) as client:
        [s] = (await client.call(ListSchedules())).schedules
        assert s.name == "hourly" and not s.paused and s.next_fire
        assert (await client.call(Pause(name="hourly"))).paused is True
        with pytest.raises(NotFound):
            await client.call(Pause(name="nope"))
    sched.kill9()
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    async with ControlClient(settings.config.scheduler.control) as client:
        [s] = (await client.call(ListSchedules())).schedules
        assert s.paused is True and s.next_fire is None
        assert (await client.call(Resume(name="hourly"))).paused is False
    sched.stop()
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(sched)
    async with ControlClient(settings.config.scheduler.control) as client:
        [s] = (await client.call(ListSchedules())).schedules
        assert s.paused is False


# Slots after downtime, overlap, pause and fire_at_start are decided on a fake clock, in-process, in
# test_schedule_driver.py (the dispatcher's overlap hold in test_tracker_fencing.py); the test below
# is their end-to-end counterpart across a kill -9, on the real clock.


async def test_bad_control_input_gets_an_error_and_the_scheduler_keeps_serving(tmp_path: Path, services: list[Service]) -> None:
    cfg, settings = setup(tmp_path)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(settings.config.scheduler.control)
    try:
        for junk in [b"\xff\x00garbage", msgspec.msgpack.encode({"op": "explode", "id": 7}),
                     msgspec.msgpack.encode({"op": "get_run", "id": 8, "run_id": 5})]:
            await sock.send(junk)
            assert await sock.poll(10_000)
            reply = msgspec.msgpack.decode(await sock.recv())
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
        await sock.send_multipart([b"a", b"b", b"c"])  # several frames: still one reply per message, no crash
        assert await sock.poll(10_000)
        await sock.recv()
    finally:
        sock.close(0)
        ctx.term()
    async with ControlClient(settings.config.scheduler.control) as client:
        with pytest.raises(InvalidRunId):
            await client.call(GetRun(run_id="bad/id"))
        with pytest.raises(ProtocolError):
            from shared.control import Probe
            await client.call(Probe())
        assert (await client.call(Identity())).service == "scheduler"


EVERY_SECOND = SLEEP_PIPELINE + """
[schedules.tick]
pipeline = "sleepy"
every = "1s"
overlap = "allow"
misfire = "coalesce"
misfire_grace = 60
"""


async def test_every_slot_is_recorded_exactly_once_across_a_kill9(tmp_path: Path, services: list[Service]) -> None:
    """No runner: slots only queue. Across a kill -9 and restart, each second between the first and the
    last slot has exactly one run (fired, or skipped as coalesced while the scheduler was down)."""
    cfg, settings = setup(tmp_path, EVERY_SECOND)
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    await anyio.sleep(2.5)
    sched.kill9()
    await anyio.sleep(2.0)
    sched = Service("scheduler_svc", cfg, tmp_path).start()
    services.append(sched)
    await anyio.sleep(2.5)
    sched.stop()
    slots = []
    for path in settings.journal_dir.glob("pipeline_*.jsonl"):
        first = read_events(settings.journal_dir, path.name[len("pipeline_"):-len(".jsonl")], limit=1)[0]
        slots.append(datetime.fromisoformat(first.data["slot"].replace("Z", "+00:00")))
    slots.sort()
    assert len(slots) == len(set(slots)) >= 5
    assert [int((s - slots[0]).total_seconds()) for s in slots] == list(range(len(slots)))
    assert "coalesced into" in sched.output()


async def test_heartbeat_lists_a_run_the_scheduler_ended(tmp_path: Path, services: list[Service]) -> None:
    """A run cancelled while queued ends by the scheduler's hand: its heartbeats keep listing the run
    with its terminal seq for a while, so a subscriber that lost that event learns of it."""
    cfg, settings = setup(tmp_path)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"hb/")
    sub.connect(settings.config.scheduler.publish)
    try:
        async with ControlClient(settings.config.scheduler.control) as client:
            run_id = (await client.call(Launch(pipeline="slow"))).run_id
            await client.call(Cancel(run_id=run_id))
        terminal = read_events(settings.journal_dir, run_id)[-1].seq

        async def listed() -> bool:
            while await sub.poll(100):
                hb = decode_heartbeat_payload((await sub.recv_multipart())[1])
                if hb.runs.get(run_id) == terminal:
                    return True
            return False
        await wait_until("heartbeat listing the ended run", listed, 10)
    finally:
        sub.close(0)
        ctx.term()
