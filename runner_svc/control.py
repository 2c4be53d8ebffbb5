"""The runner's control socket: identity (what doctor and /healthz compare) and the doctor's probe (a
run written and published end to end; in cluster mode through the event stream too, as every run's
events go: journal, stream, PUB). Its request and reply types are in shared.control/replies."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus

from shared import __version__
from shared.config import Settings, endpoints_of
from shared.control import Identity, Probe, serve_requests
from shared.curve import CurveKeys, bind_secured
from shared.errors import JournalFenced, ProtocolError
from shared.events import PIPELINE_STAGE
from shared.ids import PROBE_PREFIX, check_run_id, new_run_id
from shared.journal import JournalWriter, begin_run, remove_older_journals
from shared.replies import IdentityInfo, ProbeResult
from shared.wire import RecentlyEnded, configure_socket

from .publish import ChunkAppender, Publisher, RunJournal

log = logging.getLogger(__name__)

PROBES_KEPT = 5  # probe journals kept; older ones are removed after each probe


class RunnerControl:
    def __init__(self, settings: Settings, runner_id: str, publisher: Publisher, recently_ended: RecentlyEnded,
                 keys: CurveKeys | None = None,
                 new_stream_run: Callable[[str], Awaitable[ChunkAppender]] | None = None) -> None:
        self.settings = settings
        self.new_stream_run = new_stream_run  # cluster mode: a new run's appender to the event stream
        self.keys = keys  # cluster mode with [cluster.curve]: the ROUTER is a CURVE server
        self.runner_id = runner_id
        self.publisher = publisher
        self.recently_ended = recently_ended

    async def run(self, ctx: zmq.asyncio.Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        endpoint = self.settings.config.runner.control
        sock = ctx.socket(zmq.ROUTER)
        try:
            configure_socket(sock, sndhwm=1000, rcvhwm=1000)
            bind_secured(sock, endpoint, "runner.control", self.keys, self.settings.path, "ROUTER")
            log.info("bound control ROUTER %s", endpoint)
            task_status.started()
            await serve_requests(sock, self.handle, f"runner control {endpoint}")
        finally:
            sock.close(linger=0)

    async def handle(self, req: Any) -> Any:  # each request's reply type (checked by serve_requests)
        match req:
            case Identity():
                return self.identity()
            case Probe():
                return await self.probe(req)
            case _:
                raise ProtocolError(f"the runner does not serve {type(req).__name__} requests (only identity and probe); "
                                    "send it to the scheduler's control socket")

    def identity(self) -> IdentityInfo:
        s = self.settings
        return IdentityInfo(
            service="runner", version=__version__, pid=os.getpid(), config_path=str(s.path),
            journal_dir=str(s.journal_dir),
            endpoints={**endpoints_of(s), "runner.id": self.runner_id},
        )

    async def probe(self, req: Probe) -> ProbeResult:
        """The doctor's probe: a run written and published end to end (queued, then success)."""
        s = self.settings
        run_id = check_run_id(req.run_id) if req.run_id else new_run_id(PROBE_PREFIX)

        def begin() -> tuple[Any, JournalWriter]:
            queued = begin_run(s.journal_dir, run_id, s.tz, pipeline="doctor-probe", params={}, trigger={"trigger": "probe"})
            return queued, JournalWriter.open(s.journal_dir, run_id, s.tz, s.config.runner.durability, s.config.runner.group_commit_ms)

        queued, writer = await anyio.to_thread.run_sync(begin)
        try:
            stream = None
            if self.new_stream_run is not None:  # in the stream before published, as every event
                stream = await self.new_stream_run(run_id)
                await stream.append([queued])
        except BaseException:
            writer.close()
            raise
        self.publisher.publish_event(queued)
        journal = RunJournal(writer, self.publisher, stream)
        try:
            ev = await journal.emit(PIPELINE_STAGE, "success", "probe", {"runner": self.runner_id})
        finally:
            journal.close()
        if ev is None:  # another writer had the run's id in the event stream
            raise JournalFenced(f"probe run {run_id}: another writer holds it in the event stream; not written")
        self.recently_ended.add(run_id, ev.seq)
        log.info("probe run %s written and published (last seq %d)", run_id, ev.seq)
        # each doctor run leaves a probe journal: keep the last few (to look at), not one per check ever run
        removed = await anyio.to_thread.run_sync(remove_older_journals, s.journal_dir, PROBE_PREFIX, PROBES_KEPT)
        if removed:
            log.info("removed %d older probe journal(s) (the newest %d are kept)", len(removed), PROBES_KEPT)
        return ProbeResult(run_id=run_id, last_seq=ev.seq)
