"""The scheduler's own journal writes (queued, skipped slots, ends it writes for a runner) and what it
publishes on its PUB socket: each event after it is journalled (fsync), and its heartbeats.

Ends the scheduler writes in a runner's place arrive as `EndRequest`s on one memory stream, read by
one task (`write_ends`) that writes each in a task group of its own: the parts that decide an end
(runner lost, rejected too often) only send, and hold no task group.

An end written in a runner's place (runner lost) does not wait for a runner that still holds the
journal's lock (stopped or partitioned): the scheduler fences it off (shared/fence.py), and ends what
the run's processes left running on this host. All file work runs in worker threads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import anyio.abc
import zmq
import zmq.asyncio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shared.errors import JournalBusy, JournalError
from shared.events import PIPELINE_STAGE, Event, now_timestamp
from shared.fence import fenced_writer
from shared.journal import JournalReader, JournalWriter, begin_run, journal_path, read_events, stats_fields as journal_stats_fields
from shared.procs import kill_run_processes
from shared.runstate import fold, open_stages
from shared.wire import Heartbeat, RecentlyEnded, encode_event_frames, encode_heartbeat_frames

from .runbook import RunBook
from .runs import RunRecord, record_from_queued

log = logging.getLogger(__name__)

_WARN_EVERY = 10.0


@dataclass(frozen=True)
class EndRequest:
    """Write this end of a run in the `ending` phase (the sender has moved it there)."""
    rec: RunRecord
    kind: str
    msg: str
    data: dict[str, Any] | None = None


class EndSender:
    """What a part holds to end runs: moves the run to `ending` at once (its slot is free from here)
    and hands the writing to the ends task."""

    def __init__(self, book: RunBook, stream: MemoryObjectSendStream[EndRequest]) -> None:
        self.book = book
        self._stream = stream

    def end(self, rec: RunRecord, kind: str, msg: str, data: dict[str, Any] | None = None) -> None:
        self.book.begin_end(rec)
        self._stream.send_nowait(EndRequest(rec, kind, msg, data))  # unbounded: one per run at most


class Journaling:
    def __init__(self, book: RunBook, journal_dir: Path, tz: ZoneInfo, home: Path,
                 recently_ended: RecentlyEnded) -> None:
        self.book = book
        self.journal_dir = journal_dir
        self.tz = tz
        self.home = home
        self.recently_ended = recently_ended
        self.pub: zmq.asyncio.Socket | None = None  # bound, and closed, by Scheduler.run
        self.pub_dropped = 0
        self._last_drop_warn = 0.0

    # ------------------------------------------------------------------------------------ publishing

    async def publish(self, ev: Event) -> None:
        await self._send_pub(encode_event_frames(ev))

    async def _send_pub(self, frames: list[bytes]) -> None:
        assert self.pub is not None
        try:
            await self.pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.pub_dropped += 1
            if time.monotonic() - self._last_drop_warn > _WARN_EVERY:
                self._last_drop_warn = time.monotonic()
                log.warning("scheduler.publish: send queue full, %d messages dropped so far "
                            "(subscribers refill from the journal by seq)", self.pub_dropped)

    async def heartbeats(self, interval: float, config_path: Path) -> None:
        while True:
            owned = self.recently_ended.seqs()
            owned.update(self.book.owned_seqs())
            hb = Heartbeat(runner_id="scheduler", timestamp=now_timestamp(self.tz), journal_dir=str(self.journal_dir),
                           config_path=str(config_path), runs=owned, interval=interval, service="scheduler",
                           **journal_stats_fields())
            await self._send_pub(encode_heartbeat_frames(hb))
            await anyio.sleep(interval)

    # ------------------------------------------------------------------------------------ journal writes

    async def queue_run(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                        msg: str = "") -> RunRecord:
        """begin_run (fsync, in a worker thread), then publish `queued` and make it dispatchable."""
        ev = await anyio.to_thread.run_sync(begin_run, self.journal_dir, run_id, self.tz, pipeline, params, trigger, msg)
        rec = record_from_queued(ev)
        self.book.record(rec)
        self.book.enqueue(rec)
        await self.publish(ev)
        return rec

    async def record_skipped(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                             reason: str) -> RunRecord:
        """A slot that does not run still becomes a run: queued -> pipeline skipped -> cancelled."""
        events = await anyio.to_thread.run_sync(self._skipped_sync, pipeline, params, trigger, run_id, reason)
        rec = record_from_queued(events[0])
        rec.end(events[-1])
        self.book.record(rec, just_ended=True)
        for ev in events:
            await self.publish(ev)
        self.recently_ended.add(rec.run_id, events[-1].seq)
        return rec

    def _skipped_sync(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                      reason: str) -> list[Event]:
        queued = begin_run(self.journal_dir, run_id, self.tz, pipeline, params, trigger, f"slot skipped: {reason}")
        with JournalWriter.open(self.journal_dir, run_id, self.tz) as w:
            skipped = w.append(PIPELINE_STAGE, "skipped", reason, {"reason": reason})
            cancelled = w.append(PIPELINE_STAGE, "cancelled", reason)
            w.sync()
        return [queued, skipped, cancelled]

    def _write_end_sync(self, run_id: str, kind: str, msg: str, data: dict[str, Any] | None,
                        fence: bool = False) -> tuple[list[Event], bool]:
        """Take the journal (flock; or, with `fence`, fence off whoever holds it), write the terminal
        event unless one is there; (events written, the terminal last; or [the terminal found], True)."""
        if fence:
            last = JournalReader(journal_path(self.journal_dir, run_id), run_id).last_event()
            if last is not None and last.is_terminal:
                return [last], True  # ended by its holder meanwhile: nothing to fence
        opened = (fenced_writer(self.journal_dir, run_id, self.tz) if fence
                  else JournalWriter.open(self.journal_dir, run_id, self.tz))
        with opened as w:
            if w.ended:
                last = JournalReader(w.path, run_id).last_event()
                assert last is not None
                return [last], True
            # stages the lost runner left running end too (items first), so none stays "running"
            written = [
                w.append(stage, kind, f"{kind}: {msg}", {"item": item} if item is not None else None)
                for stage, item in open_stages(fold(run_id, read_events(self.journal_dir, run_id)))
            ]
            written.append(w.append(PIPELINE_STAGE, kind, msg, data))
            w.sync()
            return written, False

    async def end_run(self, rec: RunRecord, kind: str, msg: str, data: dict[str, Any] | None = None) -> None:
        """End a run from the scheduler's side now (cancel while queued, an expired launch); the caller
        waits for the end to be written."""
        self.book.begin_end(rec)
        await self._write_end(rec, kind, msg, data)

    async def write_ends(self, ends: MemoryObjectReceiveStream[EndRequest], *,
                         task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The one task that writes the ends sent on `ends`, each in its own task (one waiting for its
        journal's writer does not hold up the others)."""
        async with anyio.create_task_group() as tg, ends:
            task_status.started()
            async for req in ends:
                tg.start_soon(self._write_end, req.rec, req.kind, req.msg, req.data)

    async def _write_end(self, rec: RunRecord, kind: str, msg: str, data: dict[str, Any] | None) -> None:
        """Write the end of a run in the `ending` phase, retrying (loudly) while another writer holds its journal."""
        tries = 0
        fence = False
        while True:
            try:
                written, was_there = await anyio.to_thread.run_sync(self._write_end_sync, rec.run_id, kind, msg, data, fence)
                break
            except JournalBusy as e:
                # The scheduler has taken the run back: the holder (its runner, stopped, hung or cut off,
                # or a runner that took a stale dispatch) writes nothing more that counts. Waiting for it
                # would leave the run "running" for as long as it hangs.
                log.warning("run %s: %s; fencing that writer off to write the %s (%s)", rec.run_id, e, kind, msg)
                fence = True
                continue
            except JournalError as e:
                tries += 1
                path = journal_path(self.journal_dir, rec.run_id)
                if not await anyio.to_thread.run_sync(path.exists):
                    log.error("run %s: journal vanished, cannot write its %s (%s); forgetting the run", rec.run_id, kind, e)
                    self.book.forget(rec)
                    return
                log.error("run %s: cannot write its %s yet (%s); retrying in 1 s (try %d) - another process "
                          "still holds %s", rec.run_id, kind, e, tries, path)
                await anyio.sleep(1.0)
        ev = written[-1]
        self.book.end(rec, ev)
        if was_there:
            log.warning("run %s had already ended (%s: %s) in its journal; nothing written", rec.run_id, ev.event, ev.msg)
        else:
            log.info("run %s: wrote terminal %s: %s", rec.run_id, kind, msg)
            for each in written:
                await self.publish(each)
            self.recently_ended.add(rec.run_id, ev.seq)
        if rec.runner is not None:
            await self._end_processes(rec, kind)

    async def _end_processes(self, rec: RunRecord, kind: str) -> None:
        """A run that had a runner, ended here: its processes on this host (a lost runner's stages, and
        what they spawned outside their group) have nothing left to do."""
        why = f"run ended {kind} by the scheduler"
        killed = await anyio.to_thread.run_sync(kill_run_processes, self.home, rec.run_id, why)
        if killed:
            log.warning("run %s: killed %d process(es) of runner %s's stages still running after its end: %s",
                        rec.run_id, len(killed), rec.runner, killed)
