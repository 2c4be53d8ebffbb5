"""Test-side peers of a runner under test (used by tests/test_runner_*.py).

`FakeScheduler` is a raw pyzmq ROUTER bound on the config's dispatch port that plays the scheduler's
documented side of shared/dispatch.py (the real scheduler is built in parallel and is not under test
here): it receives RunnerStatus/RunAccepted/RunFinished, and sends DispatchRun/CancelRun/ReleaseRun.
`EventSub` is a plain pyzmq SUB (not our code) that receives the runner's published events.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import zmq

from shared.dispatch import CancelRun, DispatchRun, ReleaseRun, encode, from_runner_decoder
from shared.ids import new_run_id
from shared.journal import begin_run, read_events

_event_decoder = msgspec.msgpack.Decoder()  # a plain map: what a subscriber in any language sees


class FakeScheduler:
    def __init__(self, port: int, runner_id: str = "test-runner", keys: Any = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A restarted runner reconnects with the same routing id while the ROUTER may still hold the dead
        # connection (until its unread messages are drained): without handover the new connection's
        # messages are silently dropped. The real scheduler needs this option too.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if keys is not None:  # the cluster's CurveKeys: a CURVE server, as the real scheduler is then
            self.sock.curve_server = True
            self.sock.curve_secretkey = keys.secret
            self.sock.curve_publickey = keys.public
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.runner_id = runner_id.encode()
        self.received: list[Any] = []

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def _poll(self, timeout: float) -> Any | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        ident, payload = self.sock.recv_multipart()
        assert ident == self.runner_id, ident
        msg = from_runner_decoder.decode(payload)
        self.received.append(msg)
        return msg

    def wait_for(self, kind: type, timeout: float = 30.0, **match: Any) -> Any:
        """The next message of this type (and these field values), skipping others."""
        for msg in self.received:
            if isinstance(msg, kind) and all(getattr(msg, k) == v for k, v in match.items()):
                self.received.remove(msg)
                return msg
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self._poll(end - time.monotonic())
            if msg is not None and isinstance(msg, kind) and all(getattr(msg, k) == v for k, v in match.items()):
                self.received.remove(msg)
                return msg
        raise AssertionError(f"no {kind.__name__} {match} from the runner within {timeout}s; got {self.received[-5:]}")

    def send(self, msg: msgspec.Struct) -> None:
        self.sock.send_multipart([self.runner_id, encode(msg)])

    def dispatch(self, run_id: str, pipeline: str, params: dict[str, Any] | None = None, attempt: int = 1) -> None:
        self.send(DispatchRun(run_id=run_id, attempt=attempt, pipeline=pipeline, params=params or {}))

    def cancel(self, run_id: str, attempt: int = 1, reason: str = "cancelled by the test") -> None:
        self.send(CancelRun(run_id=run_id, attempt=attempt, reason=reason))

    def release(self, run_id: str, attempt: int = 1, reason: str = "released by the test") -> None:
        self.send(ReleaseRun(run_id=run_id, attempt=attempt, reason=reason))


class EventSub:
    def __init__(self, port: int, topic: bytes = b"ev/") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.events: list[dict[str, Any]] = []
        self.topics: list[bytes] = []

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def wait_connected(self, probe_topic: bytes = b"hb/", timeout: float = 10.0) -> None:
        """A PUB drops messages until the subscription arrives: wait for a heartbeat to prove it."""
        self.sock.setsockopt(zmq.SUBSCRIBE, probe_topic)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.sock.poll(100):
                topic, _ = self.sock.recv_multipart()
                if topic.startswith(probe_topic):
                    self.sock.setsockopt(zmq.UNSUBSCRIBE, probe_topic)
                    return
                self._keep(topic, _)
        raise AssertionError("the SUB saw no heartbeat from the runner")

    def _keep(self, topic: bytes, payload: bytes) -> None:
        if topic.startswith(b"ev/"):
            self.topics.append(topic)
            self.events.append(_event_decoder.decode(payload))

    def until_terminal(self, run_id: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        checked = 0  # events already looked at (a burst of thousands must not be rescanned per message)
        while time.monotonic() < end:
            new, checked = self.events[checked:], len(self.events)
            if any(e["run_id"] == run_id and e["stage"] == "pipeline" and e["event"] in ("success", "failure", "cancelled")
                   for e in new):
                return [e for e in self.events if e["run_id"] == run_id]
            if self.sock.poll(100):
                topic, payload = self.sock.recv_multipart()
                self._keep(topic, payload)
        raise AssertionError(f"no terminal event of {run_id} on the SUB within {timeout}s: {[ (e['stage'], e['event']) for e in self.events[-10:]]}")


def queue_run(home: Path, pipeline: str, params: dict[str, Any] | None = None, tz: str = "America/Chicago") -> str:
    run_id = new_run_id("t")
    begin_run(home / "events", run_id, ZoneInfo(tz), pipeline=pipeline, params=params or {}, trigger={"trigger": "manual"})
    return run_id


def journal(home: Path, run_id: str) -> list[Any]:
    return read_events(home / "events", run_id)


def wait_journal_terminal(home: Path, run_id: str, timeout: float = 60.0) -> list[Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        evs = journal(home, run_id)
        if evs and evs[-1].is_terminal:
            return evs
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} has no terminal event in its journal after {timeout}s: {[(e.stage, e.event, e.msg) for e in journal(home, run_id)][-10:]}")


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may stay a zombie under an init that does not reap)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


class RunnerRig:
    """A runner under test as a real subprocess, with a fake scheduler and a plain SUB around it."""

    def __init__(self, tmp: Path, body: str, runner: str = "", services: list | None = None,
                 module: str = "runner_svc") -> None:
        from tests.harness import Service, write_config

        self.tmp = tmp
        self.config, self.ports = write_config(tmp, body, runner=runner)
        self.home = tmp / "home"
        self.sched = FakeScheduler(self.ports.dispatch)
        self.sub = EventSub(self.ports.publish)
        self.svc = Service(module, self.config, tmp, name="runner")
        self._services = services

    def start(self) -> RunnerRig:
        try:
            if self._services is not None:
                self._services.append(self.svc)
            self.svc.start()
            self.sub.wait_connected()
        except BaseException:
            self.close()
            raise
        return self

    def kill9(self) -> None:
        self.svc.kill9()

    def restart(self) -> None:
        from tests.harness import Service

        self.svc = Service("runner_svc", self.config, self.tmp)
        self.svc.start()
        if self._services is not None:
            self._services.append(self.svc)

    def run(self, pipeline: str, params: dict[str, Any] | None = None, timeout: float = 60.0) -> tuple[str, list[Any], list[dict[str, Any]]]:
        """Queue and dispatch a run, wait for its end: (run_id, journal events, SUB events)."""
        run_id = queue_run(self.home, pipeline, params)
        self.sched.dispatch(run_id, pipeline, params)
        self.sched.wait_for(RunAccepted, run_id=run_id)
        published = self.sub.until_terminal(run_id, timeout)
        events = wait_journal_terminal(self.home, run_id, timeout)
        return run_id, events, published

    def close(self) -> None:
        self.sub.close()
        self.sched.close()


from shared.dispatch import RunAccepted  # noqa: E402  (used by RunnerRig.run)
