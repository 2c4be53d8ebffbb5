"""Cluster mode end to end, every part real: two scheduler hosts, two runner hosts and two gateway hosts
(six subprocesses, each with its own home and no shared journal directory) on one real PostgreSQL and a
real 3-node JetStream cluster on loopback.

- A run launched through gateway A is watched exactly through gateway B (every event once, in order,
  equal to the event stream and to the local journal of the runner host that ran it), and a client of
  A's all-runs stream that leaves mid-run resumes on B with A's cursor and misses nothing.
- kill -9 of the runner host running a stage: the leading scheduler ends the run `failure` "runner lost"
  through the event stream's fence, and both gateways show exactly one terminal event.
- kill -9 of the JetStream node leading the event stream while a stage prints: publishing pauses,
  nothing is lost or repeated (stream == the runner's journal == what a gateway delivered).
- kill -9 of the leading scheduler during a burst of launches through a gateway: the standby takes
  over and every launch runs exactly once on the real runners.
- PostgreSQL stopped while a stage prints: a launch answers 503, the running run goes on streaming to
  a gateway's client and ends exactly; once the database is back a launch runs again.
- with the cluster's CURVE pair in every host's [cluster.curve], the same launch-and-watch works
  (every ZeroMQ link encrypted: dispatch, PUB, control), and a control client without the pair gets
  no answer from the leader; `runwire doctor` on a gateway host checks the cluster's parts, and names
  the runner host killed with -9.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pyarrow.parquet as pq
import pytest

from runwire_cluster.events import EventStream
from runwire_history.archive import archive_dir_of
from shared.config import ClusterConfig, load_settings
from shared.control import ControlClient, Identity
from shared.curve import PUBLIC_NAME, SECRET_NAME, load_keys, write_keypair
from shared.errors import ServiceUnavailable
from shared.events import Event, event_to_json_line
from shared.journal import JournalReader, journal_path
from tests.cluster_fixtures import NatsCluster, Postgres, nats_cluster, postgres  # noqa: F401  (fixtures)
from tests.cluster_gateway_rig import WsReader, run_socket, wait_until
from tests.cluster_peers import host_config
from tests.harness import SLEEP_PIPELINE, Service

pytestmark = pytest.mark.timeout(240)

T = 60.0  # generous: six services and a JetStream cluster on two shared cores
PIPELINE = SLEEP_PIPELINE.replace('description = "one stage that sleeps"\n',
                                  'description = "one stage that sleeps"\nmax_concurrent = 4\n')
assert PIPELINE != SLEEP_PIPELINE
PIPELINE += """
[pipelines.chatty]
max_concurrent = 4
[[pipelines.chatty.stages]]
name = "talk"
command = ["{python}", "-c", "import time\\nfor i in range(300):\\n    print('line', i, flush=True)\\n    time.sleep(0.01)"]
timeout = 120
log_rate = 100000  # every line an event: lines that come in a burst after the pause are not summarised

[pipelines.slowtalk]
[[pipelines.slowtalk.stages]]
name = "talk"
command = ["{python}", "-c", "import time\\nfor i in range(300):\\n    print('line', i, flush=True)\\n    time.sleep(0.03)"]
timeout = 120
log_rate = 100000
"""


@pytest.fixture
async def db_url(postgres: Postgres) -> str:  # noqa: F811
    if not postgres.running():  # an earlier test's finally could not start it again
        postgres.start()
    """A database of its own per test (the cluster's state starts empty)."""
    return await postgres.new_database("e2e")


class Hosts:
    """The six hosts' services, by name; each host's config in its own folder."""

    def __init__(self, root: Path, nats: NatsCluster, db: str, keys_dir: Path | None = None) -> None:
        self.root = root
        self.nats = nats
        self.db = db
        self.keys_dir = keys_dir  # the cluster's CURVE pair, copied into every host's config
        self.services: dict[str, Service] = {}
        self.configs: dict[str, Path] = {}

    def start(self, name: str, module: str) -> Service:
        path = host_config(self.root, name, self.nats.urls, self.db, body=PIPELINE)
        # one runner id per runner host (the harness's config names every runner "test-runner")
        text = path.read_text().replace('id = "test-runner"', f'id = "{name}"')
        if self.keys_dir is not None:
            text += (f'[cluster.curve]\npublic_file = "{self.keys_dir / PUBLIC_NAME}"\n'
                     f'secret_file = "{self.keys_dir / SECRET_NAME}"\n')
        path.write_text(text)
        self.configs[name] = path
        svc = Service(module, path, self.root / name).start(timeout=T)
        self.services[name] = svc
        return svc

    def base(self, name: str) -> str:
        port = int(self.services[name].wait_for(r"listening on http://127\.0\.0\.1:(\d+)")[1])
        return f"http://127.0.0.1:{port}"

    def home(self, name: str) -> Path:
        return self.root / name / "home"

    def stop(self) -> None:
        for svc in self.services.values():
            svc.stop()


def six_hosts(tmp_path: Path, nats_cluster: NatsCluster, db_url: str, keys_dir: Path | None = None) -> Iterator[Hosts]:  # noqa: F811
    nats_cluster.wait_ready()
    h = Hosts(tmp_path, nats_cluster, db_url, keys_dir)
    try:
        for name in ("sched-a", "sched-b"):
            h.start(name, "scheduler_svc")
        for name in ("runner-1", "runner-2"):
            h.start(name, "runner_svc")
        for name in ("gw-a", "gw-b"):
            h.start(name, "gateway_svc")
        yield h
    finally:
        h.stop()


@pytest.fixture
def hosts(tmp_path: Path, nats_cluster: NatsCluster, db_url: str) -> Iterator[Hosts]:  # noqa: F811
    yield from six_hosts(tmp_path, nats_cluster, db_url)


@pytest.fixture
def curve_hosts(tmp_path: Path, nats_cluster: NatsCluster, db_url: str) -> Iterator[Hosts]:  # noqa: F811
    write_keypair(tmp_path / "keys")
    yield from six_hosts(tmp_path, nats_cluster, db_url, tmp_path / "keys")


async def stream_events(nats: NatsCluster, run_id: str) -> list[Event]:
    cfg = ClusterConfig(nats=nats.urls, state="postgresql://unused@127.0.0.1/x", stream_replicas=3)
    async with await EventStream.connect(cfg) as stream:
        return await stream.read(run_id)


async def launch(session: aiohttp.ClientSession, base: str, seconds: float | None = None, pipeline: str = "sleepy",
                 key: str | None = None) -> str:
    body: dict[str, Any] = {"pipeline": pipeline, "params": {} if seconds is None else {"seconds": seconds}}
    headers = {"Idempotency-Key": key} if key else None

    async def post() -> str | None:
        async with session.post(f"{base}/api/runs", json=body, headers=headers) as resp:
            if resp.status == 503:  # no leader elected yet, or its runners not registered
                return None
            answer = await resp.json()
            assert resp.status == 202, (resp.status, answer)
            return str(answer["run_id"])
    return str(await wait_until(f"a launch through {base} is accepted", post, T))


async def healthy(session: aiohttp.ClientSession, base: str) -> None:
    async def ok() -> bool:
        async with session.get(f"{base}/healthz") as resp:
            return resp.status == 200
    await wait_until(f"{base}/healthz 200 (a leader, a runner, the event stream)", ok, T)


def of_run(reader: WsReader, run_id: str) -> list[dict[str, Any]]:
    return [e for e in reader.events() if e["run_id"] == run_id]


def terminal(events: list[dict[str, Any]]) -> bool:
    return bool(events) and events[-1]["stage"] == "pipeline" and events[-1]["event"] in ("success", "failure", "cancelled")


def as_dicts(events: list[Event]) -> list[dict[str, Any]]:
    return [json.loads(event_to_json_line(ev)) for ev in events]


def ran_on(hosts: Hosts, run_id: str) -> str:
    found = [name for name in ("runner-1", "runner-2") if journal_path(hosts.home(name) / "events", run_id).exists()]
    assert len(found) == 1, f"run {run_id}: journals on {found or 'no runner host'}"
    return found[0]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_a_run_launched_through_gateway_a_is_watched_exactly_through_b_and_a_cursor_resumes_on_b(
        hosts: Hosts, session: aiohttp.ClientSession) -> None:
    a, b = hosts.base("gw-a"), hosts.base("gw-b")
    await healthy(session, a)
    await healthy(session, b)
    async with anyio.create_task_group() as tg:
        all_a = await run_socket(session, tg, a.replace("http", "ws") + "/ws/events")
        all_b = await run_socket(session, tg, b.replace("http", "ws") + "/ws/events")
        run_id = await launch(session, a, seconds=2.0)

        # A's all-runs client leaves once the run has started, keeping its cursor
        await wait_until("gateway A shows the run started",
                         lambda: _async(any(e["event"] == "start" for e in of_run(all_a, run_id))), T)
        cursor = all_a.last_cursor()
        seen_on_a = of_run(all_a, run_id)
        await all_a.ws.close()

        # the whole run through B: its own run stream and its all-runs stream
        on_b = await run_socket(session, tg, f"{b.replace('http', 'ws')}/ws/events/{run_id}")
        await wait_until("gateway B's run stream reaches the terminal event", lambda: _async(terminal(of_run(on_b, run_id))), T)
        await wait_until("gateway B's all-runs stream reaches it", lambda: _async(terminal(of_run(all_b, run_id))), T)
        # and A's client, resumed on B with A's cursor
        resumed = await run_socket(session, tg, f"{b.replace('http', 'ws')}/ws/events?cursor={cursor}")
        await wait_until("the client resumed on B reaches the terminal event",
                         lambda: _async(terminal(seen_on_a + of_run(resumed, run_id))), T)
        assert resumed.frames[0]["type"] == "hello" and resumed.frames[0]["recovered"] is True, resumed.frames[0]
        for reader in (all_b, on_b, resumed):
            await reader.ws.close()

    stream = as_dicts(await stream_events(hosts.nats, run_id))
    assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1)) and terminal(stream), stream
    assert stream[-1]["event"] == "success", stream[-1]
    assert of_run(on_b, run_id) == stream, "gateway B's run stream is not the event stream, once each in order"
    assert of_run(all_b, run_id) == stream, "gateway B's all-runs stream is not the event stream"
    assert seen_on_a + of_run(resumed, run_id) == stream, "the client resumed on B with A's cursor lost or repeated events"
    # the runner host's local journal holds the same lines (its copy of the scheduler's `queued` first)
    host = ran_on(hosts, run_id)
    local = as_dicts(JournalReader(journal_path(hosts.home(host) / "events", run_id)).read())
    assert local == stream, f"{host}'s journal differs from the event stream"

    # history: each gateway archives the run from the event stream (a gateway host has no journals),
    # and one started afterwards archives it at its start
    hosts.start("gw-c", "gateway_svc")
    for gw in ("gw-a", "gw-b", "gw-c"):
        await wait_until(f"{gw}'s history has the run", lambda gw=gw: archived_runs(session, hosts.base(gw)), T)
        files = sorted(archive_dir_of(hosts.home(gw)).glob("day=*/pipeline=*/*.parquet"))
        rows = [r for f in files for r in pq.read_table(f, columns=["run_id", "seq", "event"]).to_pylist()]
        assert rows == [{"run_id": run_id, "seq": e["seq"], "event": e["event"]} for e in stream], gw


async def test_kill_9_of_the_runner_host_ends_its_run_runner_lost_once_on_both_gateways(
        hosts: Hosts, session: aiohttp.ClientSession) -> None:
    a, b = hosts.base("gw-a"), hosts.base("gw-b")
    await healthy(session, a)
    await healthy(session, b)
    async with anyio.create_task_group() as tg:
        on_a = await run_socket(session, tg, a.replace("http", "ws") + "/ws/events")
        on_b = await run_socket(session, tg, b.replace("http", "ws") + "/ws/events")
        run_id = await launch(session, b, seconds=60.0)
        await wait_until("the stage is running", lambda: _async(any(e["event"] == "start" and e["stage"] == "nap"
                                                                    for e in of_run(on_a, run_id))), T)
        host = ran_on(hosts, run_id)
        proc = hosts.services[host].proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)  # the runner host dies, its stage process with it
        proc.wait(10)
        for reader in (on_a, on_b):
            await wait_until("the run ends on both gateways", lambda r=reader: _async(terminal(of_run(r, run_id))), T)
        for reader in (on_a, on_b):
            await reader.ws.close()

    stream = as_dicts(await stream_events(hosts.nats, run_id))
    ends = [e for e in stream if e["stage"] == "pipeline" and e["event"] in ("success", "failure", "cancelled")]
    assert len(ends) == 1 and ends[0] == stream[-1], ends
    assert ends[0]["event"] == "failure" and "lost" in ends[0]["msg"], ends[0]
    assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1)), stream
    for reader in (on_a, on_b):
        assert of_run(reader, run_id) == stream, "a gateway did not deliver the event stream once each, in order"


async def test_kill_9_of_the_stream_leader_mid_stage_loses_and_repeats_nothing(
        hosts: Hosts, session: aiohttp.ClientSession) -> None:
    b = hosts.base("gw-b")
    await healthy(session, b)
    cfg = ClusterConfig(nats=hosts.nats.urls, state="postgresql://unused@127.0.0.1/x", stream_replicas=3)
    killed = None
    try:
        async with anyio.create_task_group() as tg:
            on_b = await run_socket(session, tg, b.replace("http", "ws") + "/ws/events")
            run_id = await launch(session, b, pipeline="chatty")
            await wait_until("the stage prints", lambda: _async(sum(e["event"] == "log" for e in of_run(on_b, run_id)) >= 20), T)
            async with await EventStream.connect(cfg) as stream:
                info = await stream.js.stream_info(stream.name)
            assert info.cluster is not None and info.cluster.leader, info.cluster
            killed = hosts.nats.node(str(info.cluster.leader))
            killed.kill9()  # the stream's leader, while the stage goes on printing
            await wait_until("the run ends on gateway B", lambda: _async(terminal(of_run(on_b, run_id))), T)
            await on_b.ws.close()
    finally:
        if killed is not None:
            killed.start()
    stream = as_dicts(await stream_events(hosts.nats, run_id))
    assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1)) and stream[-1]["event"] == "success", stream[-3:]
    printed = [e["msg"] for e in stream if e["event"] == "log" and e["stage"] == "talk"]
    assert printed == [f"line {i}" for i in range(300)], [e for e in stream if e["event"] != "log" or e["stage"] != "talk"]
    host = ran_on(hosts, run_id)
    assert as_dicts(JournalReader(journal_path(hosts.home(host) / "events", run_id)).read()) == stream
    assert of_run(on_b, run_id) == stream, "gateway B did not deliver the event stream once each, in order"


def _leader(hosts: Hosts) -> str:
    lead = [name for name in ("sched-a", "sched-b") if "leading: lease" in hosts.services[name].output()]
    assert len(lead) == 1, f"leaders: {lead}"
    return lead[0]


async def test_kill_9_of_the_leading_scheduler_during_a_burst_of_launches_runs_each_once(
        hosts: Hosts, session: aiohttp.ClientSession) -> None:
    a = hosts.base("gw-a")
    await healthy(session, a)
    leader = _leader(hosts)
    standby = "sched-b" if leader == "sched-a" else "sched-a"
    launched = [await launch(session, a, seconds=0.3, key=f"burst-{i}") for i in range(10)]
    hosts.services[leader].kill9()
    # while nobody leads, launches are still accepted: they wait in the database for the next leader
    launched += [await launch(session, a, seconds=0.3, key=f"burst-{i}") for i in range(10, 20)]
    await wait_until(f"{standby} takes over", lambda: _async("leading: lease" in hosts.services[standby].output()), T)

    async def all_ended() -> bool:
        for run_id in launched:
            if not terminal(as_dicts(await stream_events(hosts.nats, run_id))):
                return False
        return True
    await wait_until("every launch ran to its end", all_ended, 2 * T)
    assert len(set(launched)) == 20
    for run_id in launched:
        stream = as_dicts(await stream_events(hosts.nats, run_id))
        kinds = [(e["stage"], e["event"]) for e in stream if e["event"] != "log"]
        assert kinds.count(("pipeline", "start")) == 1 and kinds[-1] == ("pipeline", "success"), (run_id, kinds)
        assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1)), run_id


async def test_with_curve_on_every_host_a_launch_runs_and_is_watched_and_control_needs_the_pair(
        curve_hosts: Hosts, session: aiohttp.ClientSession) -> None:
    hosts = curve_hosts
    a, b = hosts.base("gw-a"), hosts.base("gw-b")
    await healthy(session, a)  # the gateway reached the leader's control socket over CURVE
    await healthy(session, b)
    async with anyio.create_task_group() as tg:
        on_b = await run_socket(session, tg, b.replace("http", "ws") + "/ws/events")
        run_id = await launch(session, a, seconds=0.5)  # gateway -> leader control -> dispatch -> runner
        await wait_until("gateway B shows the run's end", lambda: _async(terminal(of_run(on_b, run_id))), T)
        await on_b.ws.close()
    stream = as_dicts(await stream_events(hosts.nats, run_id))
    assert stream[-1]["event"] == "success", stream[-1]
    assert of_run(on_b, run_id) == stream, "gateway B did not deliver the event stream once each, in order"

    leader = load_settings(str(hosts.configs[_leader(hosts)]))
    keys = load_keys(leader)
    assert keys is not None
    async with ControlClient(leader.config.scheduler.control, timeout=5.0, keys=keys) as client:
        assert (await client.call(Identity())).service == "scheduler"
    async with ControlClient(leader.config.scheduler.control, timeout=2.0) as plain:
        with pytest.raises(ServiceUnavailable):  # the handshake is refused: the request is never read
            await plain.call(Identity())

    code, checks, said = await doctor(hosts, "gw-a")
    assert code == 0 and all(checks.values()), checks
    assert {"event stream", "cluster state", "scheduler leads", "scheduler reachable", "runners registered",
            "runner runner-1 reachable", "runner runner-2 reachable", "gateway healthy",
            "probe event via runner runner-1", "probe event via runner runner-2"} <= set(checks), checks
    for runner in ("runner-1", "runner-2"):  # each probe went through the event stream before the WebSocket
        detail = said[f"probe event via runner {runner}"]
        assert "runner -> journal -> JetStream -> ZeroMQ -> gateway -> WebSocket" in detail, detail
        probe = detail.rsplit("; run ", 1)[1]
        assert [e.event for e in await stream_events(hosts.nats, probe)] == ["queued", "success"], detail
    hosts.services["runner-1"].kill9()
    code, checks, _ = await doctor(hosts, "gw-a")
    assert code == 1 and checks["runner runner-1 reachable"] is False and checks["runner runner-2 reachable"], checks
    assert "probe event via runner runner-1" not in checks and checks["probe event via runner runner-2"], checks


async def doctor(hosts: Hosts, name: str) -> tuple[int, dict[str, bool], dict[str, str]]:
    """`runwire doctor --json` with one host's config: its exit status, each check's verdict and detail."""
    runwire = str(Path(sys.executable).parent / "runwire")
    r = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [runwire, "doctor", "--json", "--config", str(hosts.configs[name])], capture_output=True, text=True, timeout=120))
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, (r.returncode, r.stdout, r.stderr)
    return r.returncode, {c["check"]: c["ok"] for c in lines}, {c["check"]: c["detail"] for c in lines}


async def test_the_database_stopped_mid_run_refuses_launches_and_the_run_streams_on_to_its_end(
        hosts: Hosts, postgres: Postgres, session: aiohttp.ClientSession) -> None:  # noqa: F811
    b = hosts.base("gw-b")
    await healthy(session, b)
    async with anyio.create_task_group() as tg:
        on_b = await run_socket(session, tg, b.replace("http", "ws") + "/ws/events")
        run_id = await launch(session, b, pipeline="slowtalk")  # about 9 s of printing
        await wait_until("the stage prints", lambda: _async(sum(e["event"] == "log" for e in of_run(on_b, run_id)) >= 20), T)
        await anyio.to_thread.run_sync(postgres.stop)
        try:
            seen = len(of_run(on_b, run_id))
            async with session.post(f"{b}/api/runs", json={"pipeline": "sleepy", "params": {}}) as resp:
                body = await resp.json()
                assert resp.status == 503 and body["error"]["code"] == "unavailable", (resp.status, body)
            await wait_until("the run streams on without the database",
                             lambda: _async(len(of_run(on_b, run_id)) >= seen + 50), T)
            await wait_until("the run ends without the database", lambda: _async(terminal(of_run(on_b, run_id))), T)
        finally:
            await anyio.to_thread.run_sync(postgres.start)
        after = await launch(session, b, seconds=0.2)  # 503 until the leader is back, then accepted
        await wait_until("a run launched after the outage ends",
                         lambda: _async(terminal(of_run(on_b, after))), 2 * T)
        await on_b.ws.close()
    stream = as_dicts(await stream_events(hosts.nats, run_id))
    assert stream[-1]["event"] == "success" and of_run(on_b, run_id) == stream
    printed = [e["msg"] for e in stream if e["event"] == "log" and e["stage"] == "talk"]
    assert printed == [f"line {i}" for i in range(300)]
    assert of_run(on_b, after)[-1]["event"] == "success"


async def archived_runs(session: aiohttp.ClientSession, base: str) -> int:
    """How many runs of pipeline sleepy the gateway's history counts."""
    async with session.get(f"{base}/api/history", params={"pipeline": "sleepy", "since": "1d"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["summary"]["runs"]  # type: ignore[no-any-return]


async def _async(value: bool) -> bool:
    return value
