"""The event stream of cluster mode on NATS JetStream: one stream for every run, a subject per run,
a run's journal lines appended in chunks, each chunk once, each writer fenced, read back after a seq.

- Subject `runwire.ev.<run_id>`, with the run id's dots written `~` (a dot would split the subject
  into tokens, and `a..b`, a valid run id, would be an invalid subject).
- One message per chunk of consecutive journal lines, the payload exactly those lines (the journal
  format, so the reader uses shared.events' decoder). Its message id `<run_id>:<first>-<last>`, with
  `@<writer_id>` when the writer has one, makes a retried publish a duplicate the server drops (within
  DUPLICATE_WINDOW_S; past it the writer checks the run's last chunk). Writers that may append the
  same seqs (a runner, and the scheduler ending that runner's run) must have distinct writer ids: the
  server drops a message whose id it has seen before it checks the fence, so the second writer's
  chunk would pass as a duplicate of the first's instead of being fenced.
- Every append carries the expected-last-subject-sequence header: the stream sequence of the run's
  last chunk as this writer knows it. A writer that is behind (another writer, e.g. the scheduler
  ending the run of a runner it declared lost, appended since) is refused: JournalFenced.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.js.api import DeliverPolicy, DiscardPolicy, Header, StorageType, StreamConfig

from shared.config import ClusterConfig, parse_duration
from shared.errors import JournalError, JournalFenced, ServiceUnavailable
from shared.events import Event, event_to_json_line, json_decoder
from shared.ids import check_run_id

log = logging.getLogger(__name__)
T = TypeVar("T")

STREAM_NAME = "RUNWIRE_EVENTS"
SUBJECT_PREFIX = "runwire.ev."
DUPLICATE_WINDOW_S = 120.0
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-*-sequence check
DUPLICATE_IN_PROCESS = 10158  # JetStream's: a message with this id is being stored right now
_HEADER_ROOM = 512  # bytes kept free of a message's max payload for its headers
_MSG_ID_RE = re.compile(r"^(?P<run>[^:@]+):(?P<first>\d+)-(?P<last>\d+)(?:@(?P<writer>.+))?$")

# a publish or read that may succeed when tried again: no leader yet, a node down, a reconnect
_TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError, nats.errors.OutboundBufferLimitError, nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError, TimeoutError,
)

_TRANSIENT_OR_REFUSED: tuple[type[BaseException], ...] = (*_TRANSIENT, nats.js.errors.APIError)


def _in_process(e: BaseException) -> bool:
    """JetStream still processing an earlier try of this very message (a retry sent while the first is
    in flight, e.g. after a cancel): asked again shortly, it answers as for a duplicate."""
    return isinstance(e, nats.js.errors.APIError) and (
        e.err_code == DUPLICATE_IN_PROCESS or "duplicate message id is in process" in (e.description or ""))


def describe_nats(cluster: ClusterConfig) -> str:
    """The NATS servers as logs and the doctor name them: host:port each, without credentials."""
    return ", ".join(urlsplit(u).netloc.rsplit("@", 1)[-1] for u in cluster.nats)


def run_subject(run_id: str) -> str:
    return SUBJECT_PREFIX + check_run_id(run_id).replace(".", "~")


def chunk_msg_id(run_id: str, first_seq: int, last_seq: int, writer_id: str = "") -> str:
    return f"{run_id}:{first_seq}-{last_seq}" + (f"@{writer_id}" if writer_id else "")


def chunk_range(msg_id: str | None) -> tuple[int, int] | None:
    """(first, last) event seq of a chunk from its message id; None if it is not one of ours."""
    m = _MSG_ID_RE.match(msg_id or "")
    return (int(m["first"]), int(m["last"])) if m else None


def decode_chunk(run_id: str, data: bytes, where: str = "") -> list[Event]:
    """A chunk's journal lines as events, checked: this run's, seqs consecutive."""
    events: list[Event] = []
    for n, line in enumerate(data.splitlines(), 1):
        try:
            ev = json_decoder.decode(line)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            raise JournalError(f"event stream {where}: run {run_id}: line {n} of a chunk is not an event: {e}") from e
        if ev.run_id != run_id or (events and ev.seq != events[-1].seq + 1):
            raise JournalError(f"event stream {where}: run {run_id}: line {n} of a chunk is run {ev.run_id!r} "
                               f"seq {ev.seq}, not the next event of this run")
        events.append(ev)
    return events


class EventStream:
    """A connection to the cluster's event stream (an async context manager; closes the connection)."""

    def __init__(self, nc: Nats, servers: Sequence[str], *, name: str = STREAM_NAME, replicas: int = 3,
                 max_age_s: float = 7 * 86400.0, request_timeout: float = 5.0, retry_for: float = 30.0) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=request_timeout)
        self.servers = list(servers)
        self.name = name
        self.replicas = replicas
        self.max_age_s = max_age_s
        self.request_timeout = request_timeout
        self.retry_for = retry_for  # how long a request is tried again while JetStream has no leader

    @classmethod
    async def connect(cls, cluster: ClusterConfig, *, name: str = STREAM_NAME, request_timeout: float = 5.0,
                      connect_wait: float = 5.0) -> EventStream:
        """Connected to one of the servers, or ServiceUnavailable after `connect_wait` seconds of trying
        (the client itself would try forever). Once connected, it reconnects without end."""
        servers = list(cluster.nats)
        errors_seen = 0
        last_error_log = float("-inf")

        async def on_error(e: Exception) -> None:
            # every failed try calls this (5 a second while a server is away): said once per 10 s
            nonlocal errors_seen, last_error_log
            errors_seen += 1
            now = time.monotonic()
            if now - last_error_log >= 10.0:
                more = f" ({errors_seen - 1} more since the last report)" if errors_seen > 1 else ""
                log.warning("NATS (cluster.nats): %s: %s%s", type(e).__name__, e, more)
                errors_seen, last_error_log = 0, now

        async def on_disconnect() -> None:
            if nc.is_closed:  # our own close(), not a lost server
                return
            log.warning("NATS (cluster.nats): disconnected; reconnecting to one of %s", ", ".join(servers))

        async def on_reconnect() -> None:
            log.info("NATS (cluster.nats): reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

        nc = Nats()
        try:
            with anyio.fail_after(connect_wait):
                await nc.connect(servers=servers, name="runwire", connect_timeout=2, allow_reconnect=True,
                                 max_reconnect_attempts=-1, error_cb=on_error,
                                 reconnect_time_wait=0.2,  # type: ignore[arg-type]  # typed int, used as seconds
                                 disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
        except (OSError, TimeoutError, nats.errors.Error) as e:
            with anyio.CancelScope(shield=True):
                await nc.close()
            why = f"no answer in {connect_wait:g}s" if isinstance(e, TimeoutError) else f"{type(e).__name__} {e}"
            raise ServiceUnavailable(f"NATS servers {', '.join(servers)} (key `cluster.nats`) cannot be reached: "
                                     f"{why}") from e
        return cls(nc, servers, name=name, replicas=cluster.stream_replicas,
                   max_age_s=float(parse_duration(cluster.stream_max_age)), request_timeout=request_timeout)

    @classmethod
    async def open_ready(cls, cluster: ClusterConfig, *, who: str, waiting: str = "",
                         retry_every: float = 2.0) -> EventStream:
        """Connected, with the stream made if it is not there yet (the first service up makes it): tried
        again every `retry_every` seconds while NATS does not answer, each failure logged as an error
        naming `who` (and `waiting`: what cannot happen meanwhile) and how long it has waited."""
        since = time.monotonic()
        while True:
            try:
                stream = await cls.connect(cluster)
            except ServiceUnavailable as e:
                failed: ServiceUnavailable | None = e
            else:
                try:
                    await stream.ensure()
                    return stream
                except ServiceUnavailable as e:
                    failed = e
                    await stream.close()
                except BaseException:
                    await stream.close()
                    raise
            log.error("%s: event stream: %s; trying again in %gs (%swaiting %.0fs so far)", who, failed, retry_every,
                      f"{waiting}; " if waiting else "", time.monotonic() - since)
            await anyio.sleep(retry_every)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.nc.close()

    def _config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name, subjects=[SUBJECT_PREFIX + ">"], storage=StorageType.FILE, num_replicas=self.replicas,
            max_age=self.max_age_s, discard=DiscardPolicy.OLD, allow_direct=True,
            duplicate_window=min(DUPLICATE_WINDOW_S, self.max_age_s),
        )

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, tried again on transient errors (no leader yet, a node down, a slow meta leader)
        for up to retry_for seconds; then ServiceUnavailable."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                return await call()
            except _TRANSIENT as e:
                if time.monotonic() + delay > deadline:
                    raise ServiceUnavailable(f"event stream {self.name}: {what}: JetStream does not answer "
                                             f"(tried for {self.retry_for:g}s; last: {type(e).__name__} {e})") from e
                log.info("event stream %s: %s: %s; trying again", self.name, what, type(e).__name__)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def ensure(self) -> None:
        """Create the stream, or bring its retention and replicas to the config's (idempotent)."""
        try:
            await self._retrying("create or update the stream", self._ensure)
        except nats.js.errors.APIError as e:
            raise JournalError(f"event stream {self.name}: cannot create or update it: {e.description} "
                               f"(check `cluster.stream_replicas` against the servers in `cluster.nats`)") from e

    async def _ensure(self) -> None:
        wanted = self._config()
        try:
            info = await self.js.stream_info(self.name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(wanted)
            log.info("event stream %s created (%d replicas, events kept %ss)", self.name, self.replicas, self.max_age_s)
            return
        have = info.config
        if have.num_replicas != wanted.num_replicas or have.max_age != wanted.max_age:
            await self.js.update_stream(wanted)
            log.info("event stream %s updated: %d replicas, events kept %ss", self.name, self.replicas, self.max_age_s)

    async def _last_msg(self, run_id: str) -> Any:
        """The run's last chunk as the stream's leader has it (not a direct get: a replica may lag)."""
        subject = run_subject(run_id)

        async def get() -> Any:
            try:
                return await self.js.get_last_msg(self.name, subject)
            except nats.js.errors.NotFoundError:
                return None

        return await self._retrying(f"run {run_id}: its last chunk", get)

    async def last_chunk(self, run_id: str) -> tuple[int, int]:
        """(stream sequence, last event seq) of the run's last chunk; (0, 0) when it has none."""
        msg = await self._last_msg(run_id)
        if msg is None:
            return 0, 0
        span = chunk_range((msg.headers or {}).get(Header.MSG_ID.value))
        if span is None:
            events = decode_chunk(run_id, msg.data or b"", self.name)
            span = (events[0].seq, events[-1].seq) if events else (0, 0)
        return int(msg.seq), span[1]

    async def writer(self, run_id: str, *, new: bool = False, retry_for: float = 30.0, writer_id: str = "") -> RunWriter:
        """The appender of one run. `new`: the run has no events yet (no round trip to find its last
        chunk; if someone else wrote one, the first append is fenced). `writer_id` (e.g.
        "runner:<id>"): in the chunks' message ids, so another writer's chunk of the same seqs is not
        taken for a duplicate of this one's (see the module's notes)."""
        fence, last_seq = (0, 0) if new else await self.last_chunk(run_id)
        return RunWriter(self, run_id, fence, last_seq, retry_for=retry_for, writer_id=writer_id)

    async def replay(self, run_id: str, after_seq: int = 0, *, timeout: float = 10.0) -> AsyncGenerator[list[Event], None]:
        """The run's events after `after_seq`, chunk by chunk, up to the last chunk there was when the
        replay began (an ordered consumer: in order, gap-free, re-created by the client if it stalls).
        Use with `contextlib.aclosing` when the loop may stop early."""
        end, last_seq = await self.last_chunk(run_id)
        if end == 0 or last_seq <= after_seq:
            return
        subject = run_subject(run_id)
        # an ephemeral consumer: one left by a retry whose first try did land goes after 60 s idle
        sub = await self._retrying(f"run {run_id}: start a replay", lambda: self.js.subscribe(
            subject, stream=self.name, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60.0))
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except _TRANSIENT as e:
                    raise ServiceUnavailable(f"event stream {self.name}: run {run_id}: replay stalled: {e!r}") from e
                span = chunk_range((msg.headers or {}).get(Header.MSG_ID.value))
                if span is None or span[1] > after_seq:
                    events = decode_chunk(run_id, msg.data, self.name)
                    if events and events[0].seq <= after_seq:
                        events = [ev for ev in events if ev.seq > after_seq]
                    if events:
                        yield events
                if msg.metadata.sequence.stream >= end:
                    return
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def read(self, run_id: str, after_seq: int = 0) -> list[Event]:
        """The whole replay as one list."""
        out: list[Event] = []
        async with aclosing(self.replay(run_id, after_seq)) as chunks:
            async for chunk in chunks:
                out.extend(chunk)
        return out


class RunWriter:
    """Appends one run's events in chunks. `fence` is the stream sequence of the run's last chunk as
    this writer knows it; `last_seq` its last event seq."""

    def __init__(self, stream: EventStream, run_id: str, fence: int, last_seq: int, *, retry_for: float = 30.0,
                 writer_id: str = "") -> None:
        if "@" in writer_id or ":" in writer_id:
            raise ValueError(f"writer id {writer_id!r}: no '@' or ':'")
        self.stream = stream
        self.writer_id = writer_id
        self.run_id = run_id
        self.subject = run_subject(run_id)
        self.fence = fence
        self.last_seq = last_seq
        self.retry_for = retry_for  # how long a publish is retried while JetStream has no leader
        self.retries = 0  # publishes tried again (a leader change, a node down)
        self.duplicates = 0  # chunks JetStream already had (a retry whose first try had landed)

    async def append(self, events: Sequence[Event]) -> None:
        if events:
            await self.append_lines(events[0].seq, [event_to_json_line(ev) for ev in events])

    async def append_lines(self, first_seq: int, lines: Sequence[bytes]) -> None:
        """Append consecutive journal lines (each with its newline), the first with seq `first_seq`.
        Returns once JetStream has them on a quorum; split in messages under the server's max payload."""
        if first_seq != self.last_seq + 1:
            raise JournalError(f"event stream: run {self.run_id}: chunk starts at seq {first_seq}, but the "
                               f"stream has up to seq {self.last_seq}: chunks must be consecutive")
        limit = self.stream.nc.max_payload - _HEADER_ROOM
        start, size = 0, 0
        for i, line in enumerate(lines):
            if i > start and size + len(line) > limit:
                await self._publish(first_seq + start, b"".join(lines[start:i]), i - start)
                start, size = i, 0
            size += len(line)
        if start < len(lines):
            await self._publish(first_seq + start, b"".join(lines[start:]), len(lines) - start)

    async def _publish(self, first: int, payload: bytes, count: int) -> None:
        last = first + count - 1
        msg_id = chunk_msg_id(self.run_id, first, last, self.writer_id)
        headers = {Header.MSG_ID.value: msg_id, Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(self.fence)}
        deadline = time.monotonic() + self.retry_for
        delay = 0.02
        while True:
            try:
                ack: Any = await self.stream.js.publish(self.subject, payload, timeout=self.stream.request_timeout,
                                                        stream=self.stream.name, headers=dict(headers))
                break
            except nats.js.errors.BadRequestError as e:
                if e.err_code != WRONG_LAST_SEQUENCE:
                    raise JournalError(f"event stream: run {self.run_id}: chunk {msg_id} refused: {e.description}") from e
                seq = await self._landed(msg_id)  # our own earlier try, past the duplicate window?
                if seq is None:
                    raise JournalFenced(
                        f"event stream: run {self.run_id}: another writer appended to this run (this writer "
                        f"expected its last chunk at stream seq {self.fence}): it is fenced and must write and "
                        "publish nothing more for the run") from e
                self.fence, self.last_seq = seq, last
                return
            except nats.errors.ConnectionClosedError as e:
                raise ServiceUnavailable(f"event stream: run {self.run_id}: the NATS connection is closed") from e
            except _TRANSIENT_OR_REFUSED as e:
                if not isinstance(e, _TRANSIENT) and not _in_process(e):
                    raise JournalError(f"event stream: run {self.run_id}: chunk {msg_id} refused: "
                                       f"{getattr(e, 'description', e)}") from e
                if time.monotonic() + delay > deadline:
                    raise ServiceUnavailable(f"event stream: run {self.run_id}: chunk {msg_id} not acknowledged in "
                                             f"{self.retry_for:g}s (last: {type(e).__name__} {e})") from e
                self.retries += 1
                if delay == 0.02:  # once per chunk: a leader election takes a few tries
                    log.warning("event stream: run %s: chunk %s: %s; trying again for up to %gs", self.run_id,
                                msg_id, type(e).__name__, self.retry_for)
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.5)
        if ack.duplicate:
            self.duplicates += 1
        self.fence, self.last_seq = ack.seq, last

    async def _landed(self, msg_id: str) -> int | None:
        """The stream seq of this chunk if it is the run's last one (an earlier try of ours landed)."""
        msg = await self.stream._last_msg(self.run_id)
        return int(msg.seq) if msg is not None and (msg.headers or {}).get(Header.MSG_ID.value) == msg_id else None
