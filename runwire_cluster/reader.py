"""Read-only views of the event stream for gateways (no writes, no change to the stream): which runs
it holds and how far each has come, a run's first and last chunk, and what names the stream.

- `run_counts`: {run_id: chunk count} from one STREAM.INFO request with a subjects filter (the server
  answers up to 100,000 subjects in one reply; beyond that the list is cut, and said so in the log).
- `first_and_last`: a run's first and last chunk by direct gets (any replica answers: a replica a
  moment behind gives an older last chunk, which the caller's live path and gap fills make good).
- `identity`: the stream's name and creation time: a stream deleted and made again is another one.
"""

from __future__ import annotations

import logging
from typing import Any

import nats.js.errors
from nats.js.api import Header

from shared.events import Event
from shared.ids import is_valid_run_id

from .events import SUBJECT_PREFIX, EventStream, chunk_range, decode_chunk, run_subject

log = logging.getLogger(__name__)

MAX_SUBJECTS = 100_000  # the server's limit of subjects in one STREAM.INFO reply


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


def chunk_last_seq(msg: Any) -> int | None:
    """The last event seq of a chunk message, from its message id."""
    span = chunk_range((msg.headers or {}).get(Header.MSG_ID.value))
    return span[1] if span is not None else None
