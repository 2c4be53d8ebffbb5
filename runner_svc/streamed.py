"""Cluster mode's side of a run (loaded only with `[cluster]`): taking a run over from the event
stream (the local journal gets what the stream has and it lacks, e.g. the `queued` the scheduler
wrote on another host) and `StreamAppender`, through which RunJournal appends each batch to the
stream, awaiting JetStream's quorum ack, before it publishes it.

While JetStream has no quorum (a leader killed, a partition) an append pauses and is tried again
until it lands, the run's stages held up behind it; msg ids make the retries idempotent, and a
chunk cut off (cancelled) is sent again exactly as it was first tried, so nothing is duplicated.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio

from runwire_cluster.events import EventStream, RunWriter
from shared.errors import InvalidRunId, JournalError, ServiceUnavailable
from shared.events import Event, event_to_json_line
from shared.ids import check_run_id
from shared.journal import Durability, JournalReader, JournalWriter, journal_path

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 1.0  # between two appends that found no quorum (each already tried for RunWriter.retry_for)


class StopSwitch:
    """Thrown once the runner has waited for its runs as long as it will: appends waiting for the
    event stream stop at once (their events stay in the local journals) instead of holding the stop."""

    def __init__(self) -> None:
        self.thrown = False
        self._scopes: set[anyio.CancelScope] = set()

    def throw(self) -> None:
        self.thrown = True
        for scope in list(self._scopes):
            scope.cancel()

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run the block unless thrown; thrown meanwhile: the block is cancelled, ServiceUnavailable."""
        if self.thrown:
            raise ServiceUnavailable(f"{what}: the runner is stopping")
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise ServiceUnavailable(f"{what}: the runner is stopping")


class EndMarks:
    """The marks' folder: one small file per run whose end awaits the stream's ack (why, and how
    they are settled at start: runner_svc/unacked_ends.py)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def mark(self, run_id: str, acked_seq: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{run_id}.tmp"
        tmp.write_text(f"{acked_seq}\n")
        os.replace(tmp, self.folder / run_id)  # whole or absent, never a torn number

    def clear(self, run_id: str) -> None:
        (self.folder / run_id).unlink(missing_ok=True)

    def set_aside(self, run_id: str) -> Path:
        path = self.folder / run_id
        bad = path.with_name(run_id + ".bad")
        path.replace(bad)
        return bad

    def has(self, run_id: str) -> bool:
        return (self.folder / run_id).exists()

    def marked(self) -> dict[str, int]:
        """run id -> the seq the stream had acknowledged when the end was journaled. A mark that is
        not a run id or a number is reported and set aside (renamed `.bad`), never taken as one."""
        out: dict[str, int] = {}
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(".") or path.name.endswith(".bad"):
                continue
            try:
                check_run_id(path.name)
                out[path.name] = int(path.read_text().strip())
            except (ValueError, InvalidRunId, OSError) as e:
                log.error("unacknowledged end mark %s unreadable (%s): set aside as %s.bad", path, e, path.name)
                path.replace(path.with_name(path.name + ".bad"))
        return out


class StreamAppender:
    """One run's appends to the event stream, in seq order (RunJournal serialises the calls). The
    switch thrown (the runner stopping): an append stops retrying, raises ServiceUnavailable."""

    def __init__(self, writer: RunWriter, switch: StopSwitch | None = None, marks: EndMarks | None = None) -> None:
        self.writer = writer
        self.switch = switch or StopSwitch()
        self.marks = marks
        self._cut_off_end = 0  # the last seq of a chunk whose append was cancelled before its ack
        self.paused = 0  # appends that found no quorum and were tried again

    @property
    def pending_end(self) -> int:
        return self._cut_off_end if self._cut_off_end > self.writer.last_seq else 0

    def will_end(self, acked_seq: int) -> None:
        """The run's end is about to be journaled: marked until the stream acknowledges it."""
        if self.marks is not None:
            self.marks.mark(self.writer.run_id, acked_seq)

    async def append(self, events: Sequence[Event]) -> None:
        """Append consecutive events; those the stream already acknowledged (a cut-off append's first
        messages) are skipped. A chunk cut off before is sent again first, as it was."""
        w = self.writer
        if not events:
            return
        skip = w.last_seq + 1 - events[0].seq
        if skip < 0:
            raise JournalError(f"event stream: run {w.run_id}: events from seq {events[0].seq} given, but the "
                               f"stream has up to seq {w.last_seq}: a gap")
        todo = list(events[skip:])
        while todo:
            end = self.pending_end or todo[-1].seq
            chunk = todo[: end - todo[0].seq + 1]
            self._cut_off_end = chunk[-1].seq  # cleared once acknowledged; a cancel leaves it set
            await self._send(chunk)
            self._cut_off_end = 0
            todo = todo[len(chunk):]
        if self.marks is not None and events[-1].is_terminal:
            self.marks.clear(w.run_id)

    async def mirror(self, writer: JournalWriter) -> None:
        """After a fence: the local journal cut back to what the stream acknowledged from this runner,
        then the other writer's events copied in, so the journal here says what the stream says (no
        event of this runner's that the stream refused stays in it)."""
        w = self.writer
        acked = w.last_seq
        events = await w.stream.read(w.run_id, after_seq=acked)
        await anyio.to_thread.run_sync(cut_and_copy, writer, acked, events)
        log.warning("run %s: local journal %s made the event stream's copy after the fence: cut back to seq %d, "
                    "%d event(s) of the other writer copied in", w.run_id, writer.path, acked, len(events))

    async def _send(self, chunk: list[Event]) -> None:
        w = self.writer
        lines = [event_to_json_line(ev) for ev in chunk]
        since: float | None = None
        while True:
            done = w.last_seq + 1 - chunk[0].seq  # messages of the chunk acknowledged in an earlier try
            try:
                with self.switch.guard(f"event stream: run {w.run_id}: seq {chunk[done].seq} not appended"):
                    await w.append_lines(chunk[done].seq, lines[done:])
            except ServiceUnavailable as e:
                if self.switch.thrown:
                    raise
                self.paused += 1
                since = since or time.monotonic()
                log.error("run %s: event stream unavailable for %.0fs: publishing paused at seq %d, trying again "
                          "(nothing is lost: the events are in the local journal): %s",
                          w.run_id, time.monotonic() - since, chunk[done].seq, e)
                await anyio.sleep(RETRY_PAUSE_S)
                continue
            if since is not None:
                log.warning("run %s: event stream back after %.1fs: publishing resumed at seq %d", w.run_id,
                            time.monotonic() - since, chunk[done].seq)
            return


def open_local_journal(journal_dir: Path, run_id: str, tz: ZoneInfo, durability: Durability,
                       group_commit_ms: float) -> JournalWriter:
    """The run's local journal, made empty if this host has none yet (file work: call off the loop)."""
    if journal_path(journal_dir, run_id).exists():
        return JournalWriter.open(journal_dir, run_id, tz, durability, group_commit_ms)
    return JournalWriter.create(journal_dir, run_id, tz, durability, group_commit_ms)


def _copy_in(writer: JournalWriter, events: list[Event]) -> None:
    writer.append_copied(events)
    writer.sync()  # the copy is what the run continues from: as durable as begin_run's queued


def cut_and_copy(writer: JournalWriter, acked: int, events: list[Event]) -> None:
    writer.discard_after(acked)
    if events:
        writer.append_copied(events)
    writer.sync()


def _local_after(writer: JournalWriter, after_seq: int) -> list[Event]:
    return JournalReader(writer.path, writer.run_id).read(after_seq)


async def take_over_run(stream: EventStream, writer: JournalWriter, writer_id: str) -> RunWriter:
    """Bring the run's local journal and its event stream to the same last seq, and return the
    stream's writer for the run (fenced from the stream's last chunk).

    The stream ahead (the scheduler's `queued` written on another host): its events are copied into
    the journal, seqs unchanged. The journal ahead (this runner journaled events whose append it never
    saw acknowledged, then stopped): those were never published; they are appended now, if the journal
    agrees with the stream's last event. JournalError: nothing in the stream (the run was not queued
    in the cluster), the run ended there, or the journal differs from it (another writer's)."""
    run_id = writer.run_id
    rw = await stream.writer(run_id, writer_id=writer_id)  # ServiceUnavailable: the caller rejects the run
    if rw.last_seq == 0:
        raise JournalError(f"run {run_id} has no events in the event stream {stream.name}: in cluster mode the "
                           "scheduler appends its `queued` event there before dispatching the run")
    after = min(writer.last_seq, rw.last_seq - 1)  # the stream's last event, and what the journal lacks
    tail = await stream.read(run_id, after_seq=after)
    if not tail or tail[-1].seq < rw.last_seq:
        raise ServiceUnavailable(f"event stream {stream.name}: run {run_id}: read back up to seq "
                                 f"{tail[-1].seq if tail else after}, not {rw.last_seq}")
    last = tail[-1]
    if last.is_terminal:
        if rw.last_seq > writer.last_seq and tail[0].seq == writer.last_seq + 1:
            # ended elsewhere (the scheduler: "runner lost") while the journal here stood before it: the
            # journal ends as the stream does
            await anyio.to_thread.run_sync(_copy_in, writer, tail)
            log.info("run %s: its end in the event stream (seq %d..%d) copied into the local journal %s", run_id,
                     tail[0].seq, last.seq, writer.path)
        raise JournalError(f"run {run_id} has already ended in the event stream ({last.event} at seq {last.seq}: "
                           f"{last.msg})")
    if rw.last_seq > writer.last_seq:
        await anyio.to_thread.run_sync(_copy_in, writer, tail)
        log.info("run %s: %d event(s) of the event stream (seq %d..%d) copied into the local journal %s", run_id,
                 len(tail), tail[0].seq, last.seq, writer.path)
    elif writer.last_seq > rw.last_seq:
        local = await anyio.to_thread.run_sync(_local_after, writer, rw.last_seq - 1)
        if not local or local[0] != last:
            raise JournalError(f"run {run_id}: the local journal {writer.path} differs from the event stream at seq "
                               f"{last.seq} (another writer appended there): the run is not this runner's any more")
        await StreamAppender(rw).append(local[1:])
        log.warning("run %s: %d event(s) journaled here but not in the event stream (seq %d..%d) appended to it",
                    run_id, len(local) - 1, rw.last_seq - len(local) + 2, rw.last_seq)
    return rw
