"""The runner in cluster mode, a real subprocess on the real 3-node NATS cluster and a real PostgreSQL:
each batch goes local journal -> JetStream (acknowledged) -> PUB; the JetStream subject holds exactly
the run's events, equal to the local journal; nothing reaches the PUB socket before JetStream has it;
a second writer fences the runner; no quorum pauses publishing, a killed stream leader loses and
duplicates nothing; the runner registers and heartbeats, and a registry away never stops it.

The scheduler's side is played by the test (tests/cluster_runner_rig.py): `queued` into JetStream,
then a DispatchRun over the runner's dispatch socket."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from runwire_cluster.events import EventStream
from runwire_cluster.state import ClusterState
from shared.dispatch import RunAccepted, RunFinished, RunnerStatus, RunRejected
from shared.errors import JournalFenced
from shared.events import Event, now_timestamp
from shared.journal import JournalWriter, read_events
from tests.cluster_fixtures import NatsCluster, Postgres, nats_cluster, postgres  # noqa: F401  (fixtures)
from tests.cluster_runner_rig import (
    TZ,
    as_published,
    cluster_config,
    create_database,
    journal,
    lead_as_test_scheduler,
    new_database,
    queue_in_stream,
    recv_ready,
    start_runner,
)
from tests.runner_peer import RunnerRig, pid_alive, wait_gone

pytestmark = pytest.mark.timeout(180)


@asynccontextmanager
async def event_stream(nats: NatsCluster, db_url: str = "postgresql://unused/db") -> AsyncIterator[EventStream]:
    await nats.ready()  # every node back (an earlier test kills some)
    async with await EventStream.connect(cluster_config(nats, db_url)) as stream:
        await stream.ensure()
        yield stream


async def wait_until(what: str, check: Any, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = await check()
        if got:
            return got
        await anyio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


async def dispatch(rig: RunnerRig, run_id: str, params: dict[str, Any] | None = None) -> None:
    rig.sched.dispatch(run_id, "chatty", params)
    await anyio.to_thread.run_sync(lambda: rig.sched.wait_for(RunAccepted, run_id=run_id))


def terminal_in(events: list[dict[str, Any]], run_id: str) -> bool:
    return any(e["run_id"] == run_id and e["stage"] == "pipeline" and e["event"] in ("success", "failure", "cancelled")
               for e in events)


async def collect_checking_stream(rig: RunnerRig, stream: EventStream, run_id: str) -> list[dict[str, Any]]:
    """The run's PUB events up to its terminal one; as each arrives, JetStream must hold it already
    (the stream only grows: a last seq read once covers every event up to it)."""
    published: list[dict[str, Any]] = []
    in_stream = 0
    checks = 0
    end = time.monotonic() + 120
    while not terminal_in(published, run_id):
        assert time.monotonic() < end, f"no terminal event of {run_id} on the SUB: {published[-3:]}"
        got = [e for e in recv_ready(rig) if e["run_id"] == run_id]
        if not got:
            await anyio.sleep(0.001)
            continue
        if got[-1]["seq"] > in_stream:
            in_stream = (await stream.last_chunk(run_id))[1]
            checks += 1
        assert got[-1]["seq"] <= in_stream, f"seq {got[-1]['seq']} published while JetStream has up to {in_stream}"
        published.extend(got)
    assert checks >= 2
    return published


@pytest.mark.parametrize("durability", ["flush", "fsync"])
async def test_a_run_goes_journal_then_jetstream_then_pub(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres, durability: str) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services, runner=f'durability = "{durability}"')
    try:
        async with event_stream(nats_cluster, db) as stream:
            run_id = await queue_in_stream(stream, "chatty", {"lines": 300})
            await dispatch(rig, run_id, {"lines": 300})
            published = await collect_checking_stream(rig, stream, run_id)
            finished = await anyio.to_thread.run_sync(lambda: rig.sched.wait_for(RunFinished, run_id=run_id))
            assert finished.outcome == "success"
            local = journal(rig, run_id)
            in_stream = await stream.read(run_id)
        # the subject holds exactly the run's events, in order, each once: the local journal, line for line
        assert in_stream == local
        assert [e.seq for e in local] == list(range(1, len(local) + 1))
        assert (local[0].stage, local[0].event) == ("pipeline", "queued")  # copied from the stream, as it was
        assert local[-1].is_terminal and local[-1].event == "success"
        assert sum(1 for e in local if e.stage == "talk" and e.event == "log") == 300
        # the PUB socket: every event after the scheduler's queued, once, in order
        assert published == [as_published(e) for e in local[1:]]
        # the run's end was marked until the stream acknowledged it (runner_svc/unacked_ends.py), then unmarked
        marks = rig.home / "state" / "unacked-ends"
        assert marks.is_dir() and list(marks.iterdir()) == []
    finally:
        rig.close()


async def test_the_runner_registers_heartbeats_and_leaves_at_a_clean_stop(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    try:
        async with await ClusterState.connect(cluster_config(nats_cluster, db)) as state:
            async def entry() -> Any:
                found = [r for r in await state.runners() if r.runner_id == "test-runner"]
                return found[0] if found else None

            first = await wait_until("the runner in the registry", entry)
            assert first.publish == f"tcp://127.0.0.1:{rig.ports.publish}"
            assert first.control == f"tcp://127.0.0.1:{rig.ports.runner_control}"
            assert first.capacity == 4
            # heartbeat_interval = 0.5 in the test config: the entry's heartbeat moves on
            later = await wait_until("a later heartbeat", lambda: _newer(entry, first.heartbeat_at), timeout=20)
            assert later.heartbeat_age < 5.0
            # removed as lost by a scheduler: the runner registers again
            assert await state.remove_runner("test-runner")
            await wait_until("registered again", entry, timeout=20)
            assert rig.svc.stop() == 0
            assert await entry() is None  # a clean stop leaves the registry
        assert "registering again" in rig.svc.output()
    finally:
        rig.close()


async def _newer(entry: Any, than: Any) -> Any:
    now = await entry()
    return now if now is not None and now.heartbeat_at > than else None


async def test_a_registry_away_is_logged_and_retried_and_never_stops_the_runner(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres, create=False)  # no such database yet: the registry is unreachable
    rig = await start_runner(tmp_path, nats_cluster, db, services, lead=False)
    try:
        rig.svc.wait_for(r"ERROR.*runner registry .* runner test-runner cannot register or heartbeat", timeout=20)
        rig.svc.wait_for(r"dispatch: cannot read the scheduler leader from cluster.state", timeout=20)
        assert rig.svc.proc is not None and rig.svc.proc.poll() is None, "the runner stopped for want of its database"
        await create_database(postgres, db.rsplit("/", 1)[1])  # the database is back
        rig.svc.wait_for(r"runner registry .*: reachable again after \d+s; runner test-runner registered", timeout=30)
        async with await ClusterState.connect(cluster_config(nats_cluster, db)) as state:
            assert [r.runner_id for r in await state.runners()] == ["test-runner"]
        await lead_as_test_scheduler(db, rig.ports.dispatch)  # a scheduler leads: the runner's DEALER follows it
        await anyio.to_thread.run_sync(lambda: rig.sched.wait_for(RunnerStatus))  # its DEALER is connected
        async with event_stream(nats_cluster, db) as stream:
            run_id = await queue_in_stream(stream, "chatty", {"lines": 5})
            await dispatch(rig, run_id, {"lines": 5})
            finished = await anyio.to_thread.run_sync(lambda: rig.sched.wait_for(RunFinished, run_id=run_id))
            assert finished.outcome == "success"
            assert await stream.read(run_id) == journal(rig, run_id)
    finally:
        rig.close()


async def test_a_second_writer_fences_the_runner(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    try:
        async with event_stream(nats_cluster, db) as stream:
            params = {"lines": 100_000, "pause": 0.05}
            run_id = await queue_in_stream(stream, "chatty", params)
            await dispatch(rig, run_id, params)
            pid_file = rig.home / f"talk-{run_id}.pid"
            await wait_until("the stage running, its lines in the stream",
                             lambda: _last_seq_at_least(stream, run_id, 10) if pid_file.exists() else _no())
            pid = int(pid_file.read_text())
            # the scheduler declaring the runner lost: its own writer, fenced from the current last chunk
            ours = await _append_lost(stream, run_id)
            assert await anyio.to_thread.run_sync(wait_gone, pid), "the fenced run's stage still runs"
            rig.svc.wait_for(rf"ERROR.*run {run_id}: event stream: run {run_id}: another writer appended to this run")
            await anyio.sleep(1.5)  # time for anything more the runner would (wrongly) append
            in_stream = await stream.read(run_id)
            assert in_stream[-1] == ours, in_stream[-3:]
            # the journal here: cut back to what the stream took from the runner, then the stream's end
            await wait_until("the journal made the stream's copy", lambda: _journal_is(rig, run_id, in_stream), 20)
            assert "not acknowledged by the event stream" in rig.svc.output()
            published = recv_ready(rig) + rig.sub.events
            assert published and all(e["seq"] < ours.seq for e in published if e["run_id"] == run_id)
            # the runner sends no RunFinished for a run that is not its own any more
            with pytest.raises(AssertionError):
                rig.sched.wait_for(RunFinished, timeout=1.0, run_id=run_id)
            # and a dispatch of the run again is refused: it has ended in the stream
            rig.sched.dispatch(run_id, "chatty", params, attempt=2)
            rej = await anyio.to_thread.run_sync(lambda: rig.sched.wait_for(RunRejected, run_id=run_id))
            assert "already ended" in rej.reason
            assert not pid_alive(pid)
    finally:
        rig.close()


async def _no() -> bool:
    return False


async def _last_seq_at_least(stream: EventStream, run_id: str, n: int) -> bool:
    return (await stream.last_chunk(run_id))[1] >= n


async def _append_lost(stream: EventStream, run_id: str) -> Event:
    """The terminal failure "runner lost", appended the scheduler's way; tried again while the runner's
    own appends keep moving the fence."""
    for _ in range(50):
        w = await stream.writer(run_id)
        ev = Event(run_id=run_id, seq=w.last_seq + 1, timestamp=now_timestamp(TZ), stage="pipeline", event="failure",
                   msg="runner lost (the test)", data={"runner": "test-runner"})
        try:
            await w.append([ev])
        except JournalFenced:
            continue
        return ev
    raise AssertionError("the test's writer never got its append in")


async def _stream_leader(stream: EventStream) -> str:
    info = await stream.js.stream_info(stream.name)
    assert info.cluster is not None and info.cluster.leader, info.cluster
    return str(info.cluster.leader)


async def _until_terminal(rig: RunnerRig, run_id: str, published: list[dict[str, Any]]) -> list[dict[str, Any]]:
    end = time.monotonic() + 120
    while not terminal_in(published, run_id):
        assert time.monotonic() < end, f"no terminal event of {run_id} on the SUB: {published[-3:]}"
        published.extend(e for e in recv_ready(rig) if e["run_id"] == run_id)
        await anyio.sleep(0.01)
    return published


def _check_exactly_once(local: list[Event], in_stream: list[Event], published: list[dict[str, Any]]) -> None:
    assert in_stream == local
    assert [e.seq for e in local] == list(range(1, len(local) + 1))
    assert local[-1].is_terminal and local[-1].event == "success", local[-1]
    seqs = [e["seq"] for e in published]
    assert len(seqs) == len(set(seqs)), "an event published twice"
    assert published == [as_published(e) for e in local[1:]]


async def test_no_quorum_pauses_publishing_and_nothing_is_lost_or_duplicated(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    params = {"lines": 400, "pause": 0.01}
    killed = []
    try:
        async with event_stream(nats_cluster, db) as stream:
            run_id = await queue_in_stream(stream, "chatty", params)
            await dispatch(rig, run_id, params)
            published: list[dict[str, Any]] = []
            await wait_until("30 events in the stream", lambda: _last_seq_at_least(stream, run_id, 30))
            killed = [n for n in nats_cluster.nodes if n.name != await _stream_leader(stream)][:1]
            killed.append(nats_cluster.node(await _stream_leader(stream)))
            for node in killed:  # two of three: no quorum, nothing can be acknowledged
                node.kill9()
            await anyio.sleep(1.0)  # what was acknowledged before reaches the SUB
            published.extend(e for e in recv_ready(rig) if e["run_id"] == run_id)
            paused_at = published[-1]["seq"]
            await anyio.sleep(3.0)
            # publishing paused: nothing more on the PUB socket, while the journal has gone on
            assert [e for e in recv_ready(rig) if e["run_id"] == run_id] == []
            assert journal(rig, run_id)[-1].seq > paused_at
            for node in killed:
                node.start()
            killed = []
            await nats_cluster.ready()
            await _until_terminal(rig, run_id, published)
            local = journal(rig, run_id)
            in_stream = await stream.read(run_id)
        _check_exactly_once(local, in_stream, published)
        assert sum(1 for e in local if e.stage == "talk" and e.event == "log") == 400
        assert "publishing paused" in rig.svc.output() or "trying again" in rig.svc.output()
    finally:
        for node in killed:
            node.start()
        rig.close()


async def test_kill_9_of_the_stream_leader_mid_run_loses_and_duplicates_nothing(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    params = {"lines": 400, "pause": 0.005}
    leader = None
    try:
        async with event_stream(nats_cluster, db) as stream:
            run_id = await queue_in_stream(stream, "chatty", params)
            await dispatch(rig, run_id, params)
            published: list[dict[str, Any]] = []
            await wait_until("30 events in the stream", lambda: _last_seq_at_least(stream, run_id, 30))
            leader = nats_cluster.node(await _stream_leader(stream))
            leader.kill9()
            killed_at = journal(rig, run_id)[-1].seq
            await _until_terminal(rig, run_id, published)
            local = journal(rig, run_id)
            assert local[-1].seq > killed_at + 10  # the kill was mid-run
            in_stream = await stream.read(run_id)
        _check_exactly_once(local, in_stream, published)
        assert sum(1 for e in local if e.stage == "talk" and e.event == "log") == 400
    finally:
        if leader is not None:
            leader.start()
        rig.close()


async def test_a_run_interrupted_by_kill_9_of_its_runner_ends_in_the_stream_at_restart(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    params = {"lines": 100_000, "pause": 0.05}
    try:
        async with event_stream(nats_cluster, db) as stream:
            run_id = await queue_in_stream(stream, "chatty", params)
            await dispatch(rig, run_id, params)
            await wait_until("10 events in the stream", lambda: _last_seq_at_least(stream, run_id, 10))
            rig.kill9()
            rig.restart()
            rig.svc.wait_for(rf"run {run_id}: runner test-runner restarted: run interrupted")
            # (RunFinished is not waited for: the fake scheduler's ROUTER may see the restarted runner under
            # a made-up routing id while the killed one's connection lingers)
            local = await wait_until("the run's end in its journal", lambda: _ended_journal(rig, run_id))
            in_stream = await stream.read(run_id)
        assert local[-1].is_terminal and local[-1].event == "failure" and "interrupted" in local[-1].msg
        assert in_stream == local  # the end written at the restart went to the stream too
        assert [e.seq for e in local] == list(range(1, len(local) + 1))
    finally:
        rig.close()


async def _ended_journal(rig: RunnerRig, run_id: str) -> list[Event] | None:
    events = journal(rig, run_id)
    return events if events and events[-1].is_terminal else None


async def test_with_curve_keys_only_holders_of_the_pair_receive_the_events(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    import zmq

    from shared.config import load_settings
    from shared.curve import load_keys, secure_client, write_keypair
    from tests.cluster_runner_rig import PIPELINES, cluster_toml
    from tests.harness import Service, write_config
    from tests.runner_peer import FakeScheduler

    db = await new_database(postgres)
    write_keypair(tmp_path / "keys")
    curve = '\n[cluster.curve]\npublic_file = "keys/runwire.key"\nsecret_file = "keys/runwire.key_secret"\n'
    config, ports = write_config(tmp_path, PIPELINES + cluster_toml(nats_cluster, db) + curve)
    keys = load_keys(load_settings(str(config)))
    assert keys is not None
    ctx = zmq.Context()
    subs = {}
    for name, k in (("secured", keys), ("plain", None)):
        sub = subs[name] = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        secure_client(sub, k)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{ports.publish}")
    sched = FakeScheduler(ports.dispatch, keys=keys)  # the runner's DEALER is a CURVE client of the leader
    await lead_as_test_scheduler(db, ports.dispatch)
    try:
        svc = Service("runner_svc", config, tmp_path)
        services.append(svc)
        svc.start()
        assert "CURVE" in svc.wait_for(r"bound PUB .*").group(0)
        async with event_stream(nats_cluster, db) as stream:
            run_id = await queue_in_stream(stream, "chatty", {"lines": 20})
            await anyio.to_thread.run_sync(lambda: sched.wait_for(RunnerStatus))  # its DEALER is connected
            sched.dispatch(run_id, "chatty", {"lines": 20})
            got: dict[str, list[bytes]] = {"secured": [], "plain": []}
            end = time.monotonic() + 60
            while not any(t == f"ev/{run_id}/pipeline/success".encode() for t in got["secured"]):
                assert time.monotonic() < end, got["secured"][-3:]
                for name, sub in subs.items():
                    while sub.poll(0):
                        got[name].append(sub.recv_multipart()[0])
                await anyio.sleep(0.01)
            assert sum(1 for t in got["secured"] if t.startswith(f"ev/{run_id}/".encode())) == len(await stream.read(run_id)) - 1
        assert got["plain"] == []  # no handshake without the pair: not even a heartbeat
    finally:
        sched.close()
        for sub in subs.values():
            sub.close(linger=0)
        ctx.term()


async def _journal_is(rig: RunnerRig, run_id: str, events: list[Event]) -> bool:
    return journal(rig, run_id) == events


async def test_nats_away_at_start_is_logged_and_retried_until_it_answers(
        tmp_path: Path, services: list, postgres: Postgres) -> None:  # noqa: F811
    import json
    import subprocess

    from shared.config import ClusterConfig
    from tests.cluster_fixtures import find_nats_server, free_port
    from tests.cluster_runner_rig import PIPELINES
    from tests.harness import Service, write_config
    from tests.runner_peer import FakeScheduler

    binary = find_nats_server()
    if binary is None:
        pytest.skip("nats-server not found")
    db = await new_database(postgres)
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    cluster = f'\n[cluster]\nnats = ["{url}"]\nstate = {json.dumps(db)}\nstream_max_age = "1h"\nstream_replicas = 1\n'
    config, ports = write_config(tmp_path, PIPELINES + cluster)
    sched = FakeScheduler(ports.dispatch)
    await lead_as_test_scheduler(db, ports.dispatch)
    server = None
    try:
        svc = Service("runner_svc", config, tmp_path)
        services.append(svc)
        svc.start(wait_ready=False)
        svc.wait_for(rf"ERROR.*event stream: NATS servers {url} .* cannot be reached.*trying again")
        svc.wait_for(r"(?s)waiting \d+s so far.*cannot be reached.*waiting \d+s so far")  # tried again
        assert "runner ready" not in svc.output()
        server = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        svc.wait_for(r"runner ready", timeout=60)
        cfg = ClusterConfig(nats=[url], state=db, stream_max_age="1h", stream_replicas=1)
        async with await EventStream.connect(cfg) as stream:
            run_id = await queue_in_stream(stream, "chatty", {"lines": 5})
            await anyio.to_thread.run_sync(lambda: sched.wait_for(RunnerStatus))  # its DEALER is connected
            sched.dispatch(run_id, "chatty", {"lines": 5})
            finished = await anyio.to_thread.run_sync(lambda: sched.wait_for(RunFinished, run_id=run_id))
            assert finished.outcome == "success"
            assert await stream.read(run_id) == read_events(tmp_path / "home" / "events", run_id)
    finally:
        sched.close()
        if server is not None:
            server.kill()
            server.wait(10)


async def test_a_stop_while_jetstream_has_no_quorum_is_not_held_up_by_it_and_the_restart_catches_up(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    params = {"lines": 100_000, "pause": 0.01}
    killed = []
    try:
        async with event_stream(nats_cluster, db) as stream:
            run_id = await queue_in_stream(stream, "chatty", params)
            await dispatch(rig, run_id, params)
            await wait_until("10 events in the stream", lambda: _last_seq_at_least(stream, run_id, 10))
            killed = [n for n in nats_cluster.nodes if n.name != await _stream_leader(stream)][:1]
            killed.append(nats_cluster.node(await _stream_leader(stream)))
            for node in killed:
                node.kill9()
            await anyio.sleep(1.0)
            # the run's end cannot reach the stream: the runner waits kill_grace + 10 s for it, then stops
            assert await anyio.to_thread.run_sync(lambda: rig.svc.stop(timeout=60)) == 0
            out = rig.svc.output()
            assert f"runner stopping with 1 run(s) still waiting for the event stream: {run_id}" in out
            assert "the runner is stopping" in out
            ahead = journal(rig, run_id)  # what it journaled stays in the journal, some of it not in the stream
            for node in killed:
                node.start()
            killed = []
            await nats_cluster.ready()
            assert (await stream.last_chunk(run_id))[1] < ahead[-1].seq
            # restarted with the stream back: what the journal has beyond the stream is appended, then the end
            rig.restart()
            rig.svc.wait_for(rf"run {run_id}: \d+ event\(s\) journaled here but not in the event stream")
            local = await wait_until("the run's end in its journal", lambda: _ended_journal(rig, run_id))
            assert local[: len(ahead)] == ahead and local[-1].event == "failure"
            assert await stream.read(run_id) == local
    finally:
        for node in killed:
            node.start()
        rig.close()


async def _plant_unacked_end(rig: RunnerRig, stream: EventStream) -> tuple[str, list[Event]]:
    """What a kill -9 between journaling a run's end and the stream's ack leaves on the runner host: the
    local journal up to `success` (seq 5), the stream up to seq 4 (written as this runner, which had them
    acknowledged), and the mark made before the end was journaled, holding 4."""
    run_id = await queue_in_stream(stream, "chatty")
    queued = await stream.read(run_id)
    writer = JournalWriter.create(rig.home / "events", run_id, TZ)
    try:
        writer.append_copied(queued)
        events = writer.append_many([("pipeline", "start", "chatty started", {"runner": "test-runner", "attempt": 1}),
                                     ("talk", "start", "", None), ("talk", "success", "", None),
                                     ("pipeline", "success", "chatty succeeded", None)])
    finally:
        writer.close()
    rw = await stream.writer(run_id, writer_id="runner.test-runner")
    await rw.append(events[:3])
    marks = rig.home / "state" / "unacked-ends"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / run_id).write_text("4\n")
    (marks / "not a run id").write_text("4\n")  # hostile content: set aside, said so
    return run_id, queued + events


async def test_an_end_journaled_but_not_acknowledged_before_kill_9_reaches_the_stream_at_restart(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    try:
        async with event_stream(nats_cluster, db) as stream:
            rig.kill9()
            run_id, local = await _plant_unacked_end(rig, stream)
            assert (await stream.last_chunk(run_id))[1] == 4
            rig.restart()
            rig.svc.wait_for(rf"run {run_id}: 1 event\(s\) up to its end \(success at seq 5\) were journaled here but "
                             "not in the event stream: appended now, then published")
            assert await stream.read(run_id) == local  # the end the runner wrote, not a "runner restarted" failure
            assert journal(rig, run_id) == local
            marks = rig.home / "state" / "unacked-ends"
            assert sorted(p.name for p in marks.iterdir()) == ["not a run id.bad"]
            assert "unacknowledged end mark" in rig.svc.output() and "set aside" in rig.svc.output()
    finally:
        rig.close()


async def test_a_mark_left_while_the_runner_runs_is_settled_without_a_restart(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    """A mark the start could not settle (the stream away just then), or an end whose ack never came
    while the runner ran on: the runner tries again on its own (runner_svc/unacked_ends.py)."""
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    try:
        async with event_stream(nats_cluster, db) as stream:
            run_id, local = await _plant_unacked_end(rig, stream)  # the runner running all along
            rig.svc.wait_for(rf"run {run_id}: 1 event\(s\) up to its end \(success at seq 5\) were journaled here but "
                             "not in the event stream: appended now, then published", timeout=60)
            assert await stream.read(run_id) == local
            marks = rig.home / "state" / "unacked-ends"
            assert sorted(p.name for p in marks.iterdir()) == ["not a run id.bad"]
    finally:
        rig.close()


async def test_an_unacknowledged_end_the_scheduler_overtook_gives_way_to_the_stream_s_end(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    try:
        async with event_stream(nats_cluster, db) as stream:
            rig.kill9()
            run_id, local = await _plant_unacked_end(rig, stream)
            # meanwhile a scheduler declared the runner lost and ended the run in the stream, after seq 4
            lost = Event(run_id=run_id, seq=5, timestamp=now_timestamp(TZ), stage="pipeline", event="failure",
                         msg="runner test-runner lost", data={"runner": "test-runner"})
            await (await stream.writer(run_id, writer_id="scheduler.test")).append([lost])
            rig.restart()
            rig.svc.wait_for(rf"run {run_id}: its end here \(success at seq 5\) never reached the event stream")
            in_stream = await stream.read(run_id)
            assert in_stream == local[:4] + [lost]
            assert journal(rig, run_id) == in_stream  # the local journal is the stream's copy again
    finally:
        rig.close()


def _plant_journal(events_dir: Path, run_id: str, end: bool, age_days: float) -> Path:
    writer = JournalWriter.create(events_dir, run_id, TZ)
    try:
        writer.append_many([("pipeline", "queued", "", None), ("pipeline", "start", "", {"runner": "another-runner"})]
                           + ([("pipeline", "success", "", None)] if end else []))
    finally:
        writer.close()
    old = time.time() - age_days * 86400
    os.utime(writer.path, (old, old))
    return writer.path


async def test_each_runner_host_keeps_its_journals_keep_days(
        tmp_path: Path, services: list, nats_cluster: NatsCluster, postgres: Postgres) -> None:  # noqa: F811
    """Cluster mode: no scheduler sees a runner host's journals, so the runner applies
    `scheduler.keep_days` to them: old ended runs go (journal and report), runs not ended stay."""
    db = await new_database(postgres)
    rig = await start_runner(tmp_path, nats_cluster, db, services)
    try:
        rig.kill9()
        events = rig.home / "events"
        old_ended = _plant_journal(events, "old-ended", end=True, age_days=3)
        report = rig.home / "reports" / "old-ended.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("{}")
        old_open = _plant_journal(events, "old-open", end=False, age_days=3)
        recent = _plant_journal(events, "recent-ended", end=True, age_days=0.5)
        text = rig.config.read_text()
        rig.config.write_text(text.replace("runner_lost_after = 3.0\n", "runner_lost_after = 3.0\nkeep_days = 1\n", 1))
        rig.restart()
        rig.svc.wait_for(r"retention: removed 1 ended run\(s\) last written more than 1 days ago")
        assert not old_ended.exists() and not report.exists()
        assert old_open.exists() and recent.exists()  # not ended (another runner's), or not old enough
    finally:
        rig.close()
