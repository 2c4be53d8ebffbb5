"""Cluster mode: a run's end journaled here but never acknowledged by the event stream (the runner
killed, or stopped while JetStream had no quorum, between the two). The local journal then says the
run ended, so the start-up recovery, which looks for runs not ended, would pass it by, and the stream
(the cluster's truth) would hold the run open until a scheduler declared this runner lost.

So a run's end leaves a mark before it is journaled: a file `<state>/unacked-ends/<run_id>` holding
the last seq the stream had acknowledged then, removed once the stream acknowledges the end. At start
each mark is settled against the stream: the stream lacking the journal's tail gets it (and the PUB
socket after it, the rule "in the stream before published"); a stream that went another way (the
scheduler's "runner lost") makes the local journal its copy. A mark left unsettled (the stream away
just then, or an end whose ack never came while the runner ran on) is tried again every SETTLE_EVERY_S,
the runs still active here left to their own appends. The mark is written without fsync: it
covers a process dying, as the journal's `flush` durability does; after a power loss the journal's
own last lines may be gone with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio

from runwire_cluster.events import EventStream
from shared.errors import JournalError, JournalFenced, ServiceUnavailable
from shared.events import Event
from shared.journal import Durability, JournalReader, JournalWriter, journal_path

from .publish import Publisher
from .streamed import EndMarks, StopSwitch, StreamAppender, cut_and_copy

log = logging.getLogger(__name__)

SETTLE_EVERY_S = 10.0  # between two looks for marks left unsettled, while the runner runs


def _local_after(journal_dir: Path, run_id: str, after_seq: int) -> list[Event]:
    return JournalReader(journal_path(journal_dir, run_id), run_id).read(after_seq)


async def settle_unacked_ends(marks: EndMarks, stream: EventStream, journal_dir: Path, tz: ZoneInfo,
                              durability: Durability, publisher: Publisher, writer_id: str,
                              switch: StopSwitch, busy: Callable[[str], bool] = lambda run_id: False) -> int:
    """Settle every mark but those of runs `busy` here (see the module's notes); returns how many runs'
    ends were appended to the stream now. A mark the stream cannot settle now (NATS away) stays, said so."""
    appended = 0
    for run_id, acked in (await anyio.to_thread.run_sync(marks.marked)).items():
        if busy(run_id):
            continue
        try:
            appended += await _settle(stream, journal_dir, run_id, acked, tz, durability, publisher, writer_id, switch)
        except ServiceUnavailable as e:
            log.error("run %s: its end is journaled here but maybe not in the event stream, and the stream cannot "
                      "be asked now (%s): tried again in %gs", run_id, e, SETTLE_EVERY_S)
            continue
        except (JournalError, OSError) as e:  # its journal here cannot be read or repaired: the stream's copy stands
            bad = await anyio.to_thread.run_sync(marks.set_aside, run_id)
            log.error("run %s: its end mark cannot be settled, the journal %s is unusable (%s): mark set aside as %s; "
                      "the event stream's copy of the run stands", run_id, journal_path(journal_dir, run_id), e, bad)
            continue
        await anyio.to_thread.run_sync(marks.clear, run_id)
    return appended


async def _settle(stream: EventStream, journal_dir: Path, run_id: str, acked: int, tz: ZoneInfo,
                  durability: Durability, publisher: Publisher, writer_id: str, switch: StopSwitch) -> int:
    if not journal_path(journal_dir, run_id).exists():
        log.warning("run %s: an unacknowledged end mark, but no journal in %s: nothing to settle", run_id, journal_dir)
        return 0
    for _ in range(3):  # another writer appending meanwhile: read again and settle against that
        ours = await anyio.to_thread.run_sync(_local_after, journal_dir, run_id, acked)
        if not ours or not ours[-1].is_terminal:
            return 0  # the end never reached the journal: the start-up recovery ends the run
        rw = await stream.writer(run_id, writer_id=writer_id)
        if rw.last_seq < acked:
            log.warning("run %s: an unacknowledged end mark, but the event stream holds the run only up to seq %d "
                        "(aged out?), not %d: nothing to settle", run_id, rw.last_seq, acked)
            return 0
        theirs = await stream.read(run_id, after_seq=acked)
        same = 0
        while same < min(len(ours), len(theirs)) and ours[same] == theirs[same]:
            same += 1
        if same == len(ours):
            return 0  # acknowledged after all: the kill came between the ack and the mark's removal
        if same == len(theirs):
            if rw.last_seq != acked + same:
                continue  # appended to between the two reads: read again
            tail = ours[same:]
            try:
                await StreamAppender(rw, switch).append(tail)
            except JournalFenced:
                continue
            publisher.publish_events(tail)
            log.warning("run %s: %d event(s) up to its end (%s at seq %d) were journaled here but not in the event "
                        "stream: appended now, then published", run_id, len(tail), tail[-1].event, tail[-1].seq)
            return 1
        # the stream went another way after seq acked + same (the scheduler ended the run in this
        # runner's place): the local journal becomes the stream's copy
        writer = await anyio.to_thread.run_sync(JournalWriter.open, journal_dir, run_id, tz, durability)
        try:
            await anyio.to_thread.run_sync(cut_and_copy, writer, acked + same, theirs[same:])
        finally:
            writer.close()
        log.warning("run %s: its end here (%s at seq %d) never reached the event stream, which ended the run "
                    "otherwise (%s: %s): local journal %s cut back to seq %d and the stream's events copied in",
                    run_id, ours[-1].event, ours[-1].seq, theirs[-1].event if theirs else "-",
                    theirs[-1].msg if theirs else "-", journal_path(journal_dir, run_id), acked + same)
        return 0
    raise ServiceUnavailable(f"event stream {stream.name}: run {run_id}: another writer kept appending while "
                             "its end was being settled")
