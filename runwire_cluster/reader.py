"""Read-only views of the event stream for gateways (no writes, no change to the stream): which runs
it holds and how far each has come, a run's first and last chunk, and what names the stream.

- `run_counts`: {run_id: chunk count} from one STREAM.INFO request with a subjects filter (the server
  answers up to 100,000 subjects in one reply; beyond that the list is cut, and said so in the log).
- `first_and_last`: a run's first and last chunk by direct gets (any replica answers: a replica a
  moment behind gives an older last chunk, which the caller's live path and gap fills make good).
- `identity`: the stream's name and creation time: a stream deleted and made again is another one.
- `chunks_after`: a run's events after a seq, fast wherever the seq lies: the chunk holding it is
  found by bisecting the run's stream sequences (a get of "the run's next chunk at or after stream
  seq N" per step, on the leader), then a few chunks are read by gets, and a longer read goes on
  through an ordered consumer started at that chunk (EventStream.replay starts at the run's first).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy, Header

from shared.errors import ServiceUnavailable
from shared.events import Event
from shared.ids import is_valid_run_id

from .events import _TRANSIENT, SUBJECT_PREFIX, EventStream, chunk_range, decode_chunk, run_subject

log = logging.getLogger(__name__)

MAX_SUBJECTS = 100_000  # the server's limit of subjects in one STREAM.INFO reply
WALK_BY_GETS = 8  # chunks read one get at a time before a read goes on through a consumer


def subject_run_id(subject: str) -> str | None:
    """The run id of a run's subject (the inverse of events.run_subject); None for anything else."""
    if not subject.startswith(SUBJECT_PREFIX):
        return None
    run_id = subject[len(SUBJECT_PREFIX):].replace("~", ".")
    return run_id if is_valid_run_id(run_id) else None


async def last_stream_seq(stream: EventStream) -> int:
    """The stream's last message sequence (grows with every chunk of every run)."""
    info: Any = await stream._retrying("stream info", lambda: stream.js.stream_info(stream.name))
    return int(info.state.last_seq or 0)


async def identity(stream: EventStream) -> tuple[str, str]:
    """(stream name, creation time as JetStream records it)."""
    info: Any = await stream._retrying("stream info", lambda: stream.js.stream_info(stream.name))
    created = info.created.isoformat() if info.created is not None else ""
    return stream.name, created


async def run_counts(stream: EventStream) -> dict[str, int]:
    """{run_id: number of chunks in the stream} of every run it holds."""
    info: Any = await stream._retrying(
        "list the runs", lambda: stream.js.stream_info(stream.name, subjects_filter=SUBJECT_PREFIX + ">"))
    subjects: dict[str, int] = info.state.subjects or {}
    if len(subjects) >= MAX_SUBJECTS:
        log.warning("event stream %s: %d run subjects listed, the most one reply holds; older runs may be "
                    "missing from the list (shorten `cluster.stream_max_age`?)", stream.name, len(subjects))
    out: dict[str, int] = {}
    for subject, count in subjects.items():
        run_id = subject_run_id(subject)
        if run_id is None:
            log.warning("event stream %s: subject %r is not a run's; ignored", stream.name, subject[:200])
            continue
        out[run_id] = int(count)
    return out


async def _direct(stream: EventStream, run_id: str, *, first: bool) -> Any:
    subject = run_subject(run_id)

    async def get() -> Any:
        try:
            if first:
                return await stream.js.get_msg(stream.name, seq=1, subject=subject, direct=True, next=True)
            return await stream.js.get_msg(stream.name, subject=subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None

    return await stream._retrying(f"run {run_id}: its {'first' if first else 'last'} chunk", get)


def _events(stream: EventStream, run_id: str, msg: Any) -> list[Event]:
    if msg is None:
        return []
    return decode_chunk(run_id, msg.data or b"", stream.name)


async def first_and_last(stream: EventStream, run_id: str) -> tuple[list[Event], list[Event]]:
    """The events of the run's first chunk and of its last chunk (the same chunk when it has one);
    ([], []) when the stream has none."""
    first = await _direct(stream, run_id, first=True)
    if first is None:
        return [], []
    last = await _direct(stream, run_id, first=False)
    if last is None or last.seq == first.seq:
        events = _events(stream, run_id, first)
        return events, events
    return _events(stream, run_id, first), _events(stream, run_id, last)


def _span(stream: EventStream, run_id: str, msg: Any) -> tuple[int, int]:
    """(first, last) event seq of a chunk message: from its message id, else from its lines."""
    span = chunk_range((msg.headers or {}).get(Header.MSG_ID.value))
    if span is not None:
        return span
    events = decode_chunk(run_id, msg.data or b"", stream.name)
    return (events[0].seq, events[-1].seq) if events else (0, 0)


async def _next_at(stream: EventStream, run_id: str, seq: int) -> Any:
    """The run's first chunk at or after stream sequence `seq`, from the leader (None: there is none)."""
    subject = run_subject(run_id)

    async def get() -> Any:
        try:
            return await stream.js.get_msg(stream.name, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None

    return await stream._retrying(f"run {run_id}: its chunk at or after stream seq {seq}", get)


async def _holding(stream: EventStream, run_id: str, after: int, last: Any) -> Any:
    """The run's first chunk whose last event seq is above `after` (`last`, the run's last chunk, is one)."""
    first = await _next_at(stream, run_id, 1)
    if first is None or _span(stream, run_id, first)[1] > after:
        return first if first is not None else last
    # every chunk of the run below stream seq `lo` ends at or before `after`; `best` is the earliest
    # chunk found that ends above it; none lies in [hi, best.seq)
    lo, hi, best = int(first.seq) + 1, int(last.seq), last
    while lo < hi:
        mid = (lo + hi) // 2
        msg = await _next_at(stream, run_id, mid)
        if msg is None:  # cannot be: `best` lies at or after mid
            break
        if _span(stream, run_id, msg)[1] > after:
            best, hi = msg, mid
        else:
            lo = int(msg.seq) + 1
    return best


def _after(stream: EventStream, run_id: str, msg: Any, after: int) -> list[Event]:
    events = decode_chunk(run_id, msg.data or b"", stream.name)
    if events and events[0].seq <= after:
        events = [ev for ev in events if ev.seq > after]
    return events


async def chunks_after(stream: EventStream, run_id: str, after: int = 0, *,
                       timeout: float = 10.0) -> AsyncGenerator[list[Event], None]:
    """The run's events after `after`, chunk by chunk, up to its last chunk when the read began (like
    EventStream.replay; a jump in seqs is what the stream lacks, e.g. past its retention). Use with
    `contextlib.aclosing` when the loop may stop early."""
    last = await stream._last_msg(run_id)
    if last is None:
        return
    first_seq, last_seq = _span(stream, run_id, last)
    if last_seq <= after:
        return
    msg = last if first_seq <= after + 1 else await _holding(stream, run_id, after, last)
    end = int(last.seq)
    for _ in range(WALK_BY_GETS):
        events = _after(stream, run_id, msg, after)
        if events:
            after = events[-1].seq
            yield events
        if int(msg.seq) >= end:
            return
        msg = await _next_at(stream, run_id, int(msg.seq) + 1)
        if msg is None or int(msg.seq) > end:
            return
    async for events in _consume(stream, run_id, int(msg.seq), end, after, timeout):
        yield events


async def _consume(stream: EventStream, run_id: str, start: int, end: int, after: int,
                   timeout: float) -> AsyncGenerator[list[Event], None]:
    """Chunks from stream seq `start` to `end` through an ordered consumer (ephemeral: one left by a
    retry whose first try did land goes after 60 s idle)."""
    subject = run_subject(run_id)
    sub = await stream._retrying(f"run {run_id}: start a read at stream seq {start}", lambda: stream.js.subscribe(
        subject, stream=stream.name, ordered_consumer=True, inactive_threshold=60.0,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)))
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except _TRANSIENT as e:
                raise ServiceUnavailable(f"event stream {stream.name}: run {run_id}: read stalled: {e!r}") from e
            events = _after(stream, run_id, msg, after)
            if events:
                after = events[-1].seq
                yield events
            if msg.metadata.sequence.stream >= end:
                return
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
