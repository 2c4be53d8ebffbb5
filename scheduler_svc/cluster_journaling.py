"""The leader's journal writes in cluster mode: a run's `queued` goes into the event stream (JetStream,
`writer(run_id, new=True)`: the first chunk of the run, refused if anyone wrote one) and into this
host's journal, then it is published and made dispatchable. An end the scheduler writes in a runner's
place (runner lost, cancel while queued, rejected too often) is appended through the leader's own
RunWriter, fenced on the run's last chunk: the runner that wrote that chunk is fenced from here on
(its next append is refused: JournalFenced), which is how a lost runner is stopped from writing on.

This host's journal holds what the scheduler wrote itself (`queued`, a skipped slot's three events):
the runner writes a run's other events on its own host and into the stream, which is the truth for a
run's events across hosts. Nothing here writes the local journal past `queued` for a dispatched run.

Every run it creates has a row in the database (`runwire_cluster.runs`), made fenced before the
`queued` event, so a leader killed in between leaves the row and the next leader writes the event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio

from runwire_cluster.events import EventStream, RunWriter, decode_chunk
from runwire_cluster.runs import LeaderState, RunRow
from runwire_cluster.state import Lease
from shared.errors import JournalError, JournalFenced
from shared.events import PIPELINE_STAGE, Event, now_timestamp
from shared.journal import JournalReader, begin_run, journal_path
from shared.runstate import fold, open_stages
from shared.wire import RecentlyEnded

from .journaling import Journaling
from .runbook import RunBook
from .runs import RunRecord, record_from_queued

log = logging.getLogger(__name__)

_FENCED_TRIES = 20  # appends of an end refused because the runner appended meanwhile, before giving up


def record_from_events(events: list[Event]) -> RunRecord | None:
    """A run's record from its events in the stream (None when they do not begin with `queued`)."""
    if not events or events[0].event != "queued":
        return None
    rec = record_from_queued(events[0])
    for ev in events[1:]:
        if ev.stage == PIPELINE_STAGE and ev.event == "start":
            data = ev.data or {}
            rec.started_at = ev.timestamp
            rec.runner = data.get("runner") if isinstance(data.get("runner"), str) else None
            attempt = data.get("attempt")
            rec.attempt = attempt if isinstance(attempt, int) else rec.attempt
            rec.set_phase("running")
    rec.last_seq = events[-1].seq
    if events[-1].is_terminal:
        rec.end(events[-1])
    return rec


def record_from_row(row: RunRow) -> RunRecord:
    """What planning and progress need of a run known only by its row: a skipped slot is ended cancelled
    and never started; an outcome ends it; else it is still queued or running (its leader's book has it)."""
    t = row.trigger
    rec = RunRecord(run_id=row.run_id, pipeline=row.pipeline, params=row.params, trigger=str(t.get("trigger", "manual")),
                    schedule=t.get("schedule"), slot=t.get("slot"), backfill=t.get("backfill"), runner=row.runner,
                    attempt=row.attempt)
    if row.skip is not None:
        rec.phase, rec.outcome, rec.msg = "ended", "cancelled", row.skip
    elif row.outcome is not None:
        rec.phase, rec.outcome = "ended", row.outcome
    elif row.attempt:
        rec.phase = "running"
    return rec


class ClusterJournaling(Journaling):
    def __init__(self, book: RunBook, journal_dir: Path, tz: ZoneInfo, home: Path, recently_ended: RecentlyEnded,
                 stream: EventStream, leader: LeaderState, lease: Lease) -> None:
        super().__init__(book, journal_dir, tz, home, recently_ended)
        self.stream = stream
        self.leader = leader
        self.lease = lease
        self.judge_now: Callable[[], float] = time.monotonic  # the runner monitor's clock (set by the term)
        self.check_leading: Callable[[], None] = lambda: None  # raises when the lease may be lost (the term's)

    # ------------------------------------------------------------------------------------ the stream

    async def last_event(self, run_id: str) -> Event | None:
        """The run's last event in the stream (the runner's end, when it has written it)."""
        msg = await self.stream._last_msg(run_id)
        if msg is None:
            return None
        events = decode_chunk(run_id, msg.data or b"", self.stream.name)
        return events[-1] if events else None

    async def _append_new(self, run_id: str, events: list[Event]) -> bool:
        """The run's first events into the stream; False when it already has some (written by an
        earlier leader, or by this one before a step-down)."""
        writer = await self.stream.writer(run_id, new=True)
        self.check_leading()
        try:
            await writer.append(events)
        except JournalFenced:
            log.warning("run %s: the event stream already has its first events (an earlier leader wrote them); "
                        "taking the run as the stream has it", run_id)
            return False
        return True

    # ------------------------------------------------------------------------------------ new runs

    async def queue_run(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                        msg: str = "") -> RunRecord:
        """A run row (fenced; already there for a slot or a launch), then `queued` (see write_queued)."""
        row = RunRow(run_id, pipeline, dict(params), dict(trigger), msg)
        await self.leader.add_run(self.lease, row)
        return await self.write_queued(row)

    def _local_queued(self, row: RunRow) -> Event:
        """begin_run on this host (fsync); if this host has the journal already (it led before), its queued."""
        try:
            return begin_run(self.journal_dir, row.run_id, self.tz, row.pipeline, row.params, row.trigger, row.msg)
        except JournalError:
            path = journal_path(self.journal_dir, row.run_id)
            head = JournalReader(path, row.run_id).head(1) if path.exists() else []
            if head and head[0].event == "queued":
                return head[0]
            raise

    async def write_queued(self, row: RunRow) -> RunRecord:
        """`queued` into the local journal and the stream, then recorded, published and dispatchable."""
        ev = await anyio.to_thread.run_sync(self._local_queued, row)
        if not await self._append_new(row.run_id, [ev]):
            return await self.adopt(row)
        rec = record_from_queued(ev)
        self.book.record(rec)
        self.book.enqueue(rec)
        await self.publish(ev)
        return rec

    async def record_skipped(self, pipeline: str, params: dict[str, Any], trigger: dict[str, Any], run_id: str,
                             reason: str) -> RunRecord:
        row = RunRow(run_id, pipeline, dict(params), dict(trigger), skip=reason)
        await self.leader.add_run(self.lease, row)
        return await self.write_skipped(row)

    async def write_skipped(self, row: RunRow) -> RunRecord:
        reason = row.skip or "skipped"
        path = journal_path(self.journal_dir, row.run_id)
        if await anyio.to_thread.run_sync(path.exists):
            events = await anyio.to_thread.run_sync(lambda: JournalReader(path, row.run_id).read(0))
        else:
            events = await anyio.to_thread.run_sync(self._skipped_sync, row.pipeline, row.params, row.trigger,
                                                    row.run_id, reason)
        if not await self._append_new(row.run_id, events):
            return await self.adopt(row)
        rec = record_from_queued(events[0])
        rec.end(events[-1])
        self.book.record(rec, just_ended=True)
        for ev in events:
            await self.publish(ev)
        self.recently_ended.add(rec.run_id, events[-1].seq)
        return rec

    async def adopt(self, row: RunRow) -> RunRecord:
        """A run row whose events are in the stream: into the book as the stream has it (ended, queued,
        or awaiting its runner's word)."""
        events = await self.stream.read(row.run_id)
        if not events:
            return await (self.write_skipped(row) if row.skip is not None else self.write_queued(row))
        rec = record_from_events(events)
        if rec is None:
            raise JournalError(f"run {row.run_id}: its events in the stream do not begin with `queued`")
        if rec.ended:
            self.book.record(rec, just_ended=True)  # its end reaches the database through on_end
        elif rec.phase == "queued" and row.attempt == 0:
            self.book.record(rec)
            self.book.enqueue(rec)
        else:
            rec.attempt = max(rec.attempt, row.attempt)
            runner = row.runner or rec.runner or "(unknown runner)"
            now = self.judge_now()
            self.book.restore_active(rec, self.book.runner(runner, last_seen=now), now)
        return rec

    # ------------------------------------------------------------------------------------ ends

    async def _write_end(self, rec: RunRecord, kind: str, msg: str, data: dict[str, Any] | None) -> None:
        """The end through this leader's own writer, fenced on the run's last chunk (the runner that
        wrote it cannot append after this); tried again while the runner still appends."""
        for tries in range(1, _FENCED_TRIES + 1):
            # a writer id of its own: the runner's next chunk covers the same seqs, and under the same
            # message id JetStream would take it for a retry of ours and acknowledge it as a duplicate
            # (before checking the fence): the old runner would never learn it is fenced
            writer = await self.stream.writer(rec.run_id, writer_id=f"scheduler.{self.lease.attempt}")
            events = await self.stream.read(rec.run_id)
            if events and events[-1].is_terminal:
                self.book.end(rec, events[-1])
                log.warning("run %s had already ended (%s: %s) in the event stream; nothing written", rec.run_id,
                            events[-1].event, events[-1].msg)
                return
            if (events[-1].seq if events else 0) != writer.last_seq:
                continue  # the runner appended between the two reads
            written = self._end_events(rec.run_id, writer, events, kind, msg, data)
            self.check_leading()
            try:
                await writer.append(written)
            except JournalFenced:
                log.warning("run %s: the runner appended while its %s was being written (try %d); again",
                            rec.run_id, kind, tries)
                await anyio.sleep(0.05 * tries)
                continue
            self.book.end(rec, written[-1])
            log.info("run %s: wrote terminal %s into the event stream (the old writer is fenced): %s", rec.run_id, kind, msg)
            for ev in written:
                await self.publish(ev)
            self.recently_ended.add(rec.run_id, written[-1].seq)
            return
        raise JournalError(f"run {rec.run_id}: its {kind} could not be appended: its runner kept appending "
                           f"({_FENCED_TRIES} tries)")

    def _end_events(self, run_id: str, writer: RunWriter, events: list[Event], kind: str, msg: str,
                    data: dict[str, Any] | None) -> list[Event]:
        """Stages the runner left open end too (items first), then the run."""
        drafts: list[tuple[str, str, dict[str, Any] | None]] = [
            (stage, f"{kind}: {msg}", {"item": item} if item is not None else None)
            for stage, item in open_stages(fold(run_id, events))
        ]
        drafts.append((PIPELINE_STAGE, msg, data))
        stamp = now_timestamp(self.tz)
        return [Event(run_id=run_id, seq=writer.last_seq + i, timestamp=stamp, stage=stage, event=kind,  # type: ignore[arg-type]
                      msg=text, data=extra)
                for i, (stage, text, extra) in enumerate(drafts, 1)]
