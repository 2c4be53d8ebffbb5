"""A runner under test in cluster mode (tests/test_cluster_runner.py): a real runner subprocess whose
config has a `[cluster]` section naming the real 3-node NATS cluster and a fresh PostgreSQL database
of tests/cluster_fixtures.py, driven the way the scheduler drives it (the real scheduler is built in
parallel and is not under test here): the test appends the run's `queued` to JetStream itself with
`EventStream.writer(run_id, new=True)`, then dispatches over the runner's dispatch socket
(tests/runner_peer.py's FakeScheduler, a plain ROUTER). Events are received with a plain pyzmq SUB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import msgspec

from runwire_cluster.events import EventStream
from runwire_cluster.runs import SCHEDULER_LEASE
from runwire_cluster.state import ClusterState, Endpoints
from shared.config import ClusterConfig
from shared.dispatch import RunnerStatus
from shared.events import Event, now_timestamp
from shared.ids import new_run_id
from shared.journal import read_events
from tests.cluster_fixtures import NatsCluster, Postgres
from tests.runner_peer import RunnerRig

TZ = ZoneInfo("America/Chicago")  # tests/harness.py's write_config default

# `talk` prints `lines` lines, `pause` seconds apart, after writing its pid to a file; `after` is quick
PIPELINES = """
[pipelines.chatty]
[pipelines.chatty.params.lines]
type = "int"
default = 200
[pipelines.chatty.params.pause]
type = "float"
default = 0.002
[[pipelines.chatty.stages]]
name = "talk"
command = ["{python}", "-c", "import os,sys,time\\nopen(sys.argv[3],'w').write(str(os.getpid()))\\nfor i in range(int(sys.argv[1])):\\n    print('line', i, flush=True)\\n    time.sleep(float(sys.argv[2]))", "{lines}", "{pause}", "{home}/talk-{run_id}.pid"]
timeout = 120
log_rate = 100000
[[pipelines.chatty.stages]]
name = "after"
command = ["{python}", "-c", "print('done')"]
"""


async def new_database(postgres: Postgres, create: bool = True) -> str:
    """The URL of a fresh database of the module's server (made now unless `create` is False)."""
    return await postgres.new_database("runner", create)


async def create_database(postgres: Postgres, name: str) -> None:
    await postgres.create_database(name)


def cluster_config(nats: NatsCluster, db_url: str) -> ClusterConfig:
    return ClusterConfig(nats=nats.urls, state=db_url, stream_max_age="1h", stream_replicas=3)


def cluster_toml(nats: NatsCluster, db_url: str) -> str:
    return (f"\n[cluster]\nnats = {json.dumps(nats.urls)}\nstate = {json.dumps(db_url)}\n"
            'stream_max_age = "1h"\nstream_replicas = 3\n')


async def lead_as_test_scheduler(db_url: str, dispatch_port: int) -> None:
    """Record the test's scheduler (tests/runner_peer.FakeScheduler, bound on `dispatch_port`) as the
    cluster's leader, as a leading scheduler does: in cluster mode the runner's DEALER connects to the
    dispatch endpoint recorded with lease "scheduler", not to the configured one."""
    cfg = ClusterConfig(nats=["nats://unused:4222"], state=db_url)
    async with await ClusterState.connect(cfg) as state:
        await state.migrate()
        lease = await state.acquire_lease(SCHEDULER_LEASE, "test-scheduler", 3600.0,
                                          Endpoints(dispatch=f"tcp://127.0.0.1:{dispatch_port}"))
        assert lease is not None, "another holder has lease 'scheduler' in this database"


async def start_runner(tmp: Path, nats: NatsCluster, db_url: str, services: list, runner: str = "",
                       lead: bool = True) -> RunnerRig:
    """A runner in cluster mode and the test's scheduler, recorded as the leader (unless `lead` is False:
    the database is not there yet; call lead_as_test_scheduler once it is)."""
    rig = RunnerRig(tmp, PIPELINES + cluster_toml(nats, db_url), runner=runner, services=services)
    try:
        if lead:
            await lead_as_test_scheduler(db_url, rig.ports.dispatch)
    except BaseException:
        rig.close()
        raise
    await anyio.to_thread.run_sync(rig.start)
    if lead:  # the runner's DEALER found the leader (a dispatch sent before would be dropped by the ROUTER)
        try:
            await anyio.to_thread.run_sync(lambda: rig.sched.wait_for(RunnerStatus))
        except BaseException:
            rig.close()
            raise
    return rig


async def queue_in_stream(stream: EventStream, pipeline: str, params: dict[str, Any] | None = None) -> str:
    """What the scheduler does in cluster mode before a dispatch: the run's `queued`, seq 1, in JetStream."""
    run_id = new_run_id("c")
    queued = Event(run_id=run_id, seq=1, timestamp=now_timestamp(TZ), stage="pipeline", event="queued",
                   msg=f"{pipeline} queued (manual)", data={"pipeline": pipeline, "params": params or {}, "trigger": "manual"})
    w = await stream.writer(run_id, new=True)
    await w.append([queued])
    return run_id


def journal(rig: RunnerRig, run_id: str) -> list[Event]:
    return read_events(rig.home / "events", run_id)


def as_published(ev: Event) -> dict[str, Any]:
    """An event as a plain subscriber decodes it from the PUB socket (a msgpack map, defaults omitted)."""
    out: dict[str, Any] = msgspec.to_builtins(ev)
    return out


def recv_ready(rig: RunnerRig) -> list[dict[str, Any]]:
    """The events waiting on the SUB now (never blocks)."""
    got = []
    while rig.sub.sock.poll(0):
        topic, payload = rig.sub.sock.recv_multipart()
        if topic.startswith(b"ev/"):
            got.append(msgspec.msgpack.decode(payload))
    return got
