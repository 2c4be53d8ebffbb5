"""The runner's event stream: a PUB socket that sends each event only after it is in the journal, and
`RunJournal`, the one path by which a run's events are written (journal first) and then published."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import anyio
import zmq

from shared.curve import CurveKeys, bind_secured
from shared.errors import BindError, JournalError, JournalFenced, ServiceUnavailable
from shared.events import PIPELINE_STAGE, Event, EventDraft, is_terminal, msgpack_encoder
from shared.journal import JournalWriter
from shared.wire import Heartbeat, configure_socket, encode_heartbeat_frames, event_topic_of

log = logging.getLogger(__name__)

_DROP_WARN_EVERY = 5.0  # seconds between warnings about dropped messages
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_TOPICS_KEPT = 4096
# pyzmq's Socket.send is a Python wrapper (routing ids, groups: unused here) around the backend's send;
# called directly, a two-part event costs ~1.9 us instead of ~3.3 us to queue (100 at a time, here)
_raw_send = zmq.backend.Socket.send
_STAGE_ENDS = frozenset({"success", "failure", "skipped", "cancelled"})


class Publisher:
    """Sends on a bound PUB socket without ever blocking; a full queue counts a drop (subscribers
    find the gap by seq and refill from the journal) and warns, rate-limited.

    Note: libzmq's PUB never reports a full queue (it drops per subscriber, silently, at SNDHWM), so
    `dropped` only counts what the socket refuses outright; a slow subscriber's losses show up on its
    side as a seq gap, or as a heartbeat seq above the last event it received."""

    def __init__(self, sock: zmq.Socket[Any], endpoint: str) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.sent = 0
        self.dropped = 0
        self._last_warn = 0.0
        self._dropped_at_warn = 0
        self._topics: dict[tuple[str, str, str], bytes] = {}  # (run_id, stage, event) -> topic frame

    @classmethod
    def bind(cls, ctx: zmq.Context[Any], endpoint: str, send_hwm: int, config: object = None,
             keys: CurveKeys | None = None) -> Publisher:
        """Bound as `runner.publish` says: beyond loopback only with the cluster's CURVE keys (then a
        CURVE server, on loopback too)."""
        # A plain (not asyncio) socket: a PUB send with NOBLOCK never waits, so nothing is gained by
        # awaiting it, and the hot path stays a direct call.
        sock: zmq.Socket[Any] = zmq.Socket(ctx, zmq.PUB)
        configure_socket(sock, sndhwm=send_hwm)
        try:
            bind_secured(sock, endpoint, "runner.publish", keys, config, "PUB socket")
        except BindError:
            sock.close(linger=0)
            raise
        return cls(sock, endpoint)

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)

    def send(self, frames: list[bytes]) -> bool:
        # Two frames sent by hand with int flags: send_multipart's per-call enum arithmetic costs more
        # than the send itself. A multipart message is queued whole or not at all (Again on the first).
        topic, payload = frames
        try:
            _raw_send(self.sock, topic, _NOBLOCK_MORE)
            _raw_send(self.sock, payload, _NOBLOCK)
        except zmq.Again:
            self._count_drop()
            return False
        self.sent += 1
        return True

    def publish_event(self, ev: Event) -> bool:
        return self.publish_events((ev,)) == 1

    def publish_events(self, events: Iterable[Event]) -> int:
        """Send each event (topic and payload frames), in order, in one tight loop: no await in between,
        so libzmq's I/O thread takes the batch in one wake-up instead of one per event. Returns how many
        were queued (the rest were counted as dropped)."""
        sock, send = self.sock, _raw_send
        topic_of = self._topics.get
        encode = msgpack_encoder.encode
        sent = 0
        for ev in events:
            key = (ev.run_id, ev.stage, ev.event)
            topic = topic_of(key) or self._topic(key)
            try:
                send(sock, topic, _NOBLOCK_MORE)
                send(sock, encode(ev), _NOBLOCK)
            except zmq.Again:
                self._count_drop()
                continue
            sent += 1
        self.sent += sent
        return sent

    def _topic(self, key: tuple[str, str, str]) -> bytes:
        if len(self._topics) >= _TOPICS_KEPT:
            self._topics.clear()  # a run has a few stages and kinds; this bounds a long-lived runner
        topic = self._topics[key] = event_topic_of(*key)
        return topic

    def _count_drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_warn >= _DROP_WARN_EVERY:
            log.warning(
                "PUB %s: send queue full (SNDHWM): %d messages dropped so far (%d since last warning); "
                "subscribers recover them from the journal",
                self.endpoint, self.dropped, self.dropped - self._dropped_at_warn,
            )
            self._last_warn = now
            self._dropped_at_warn = self.dropped

    def publish_heartbeat(self, hb: Heartbeat) -> bool:
        return self.send(encode_heartbeat_frames(hb))


class ChunkAppender(Protocol):
    """Where a run's events go after the local journal and before the PUB socket (cluster mode: the
    event stream, runner_svc/streamed.py). `append` returns once they are acknowledged; it raises
    JournalFenced when another writer has taken the run, ServiceUnavailable when it gives up."""

    @property
    def pending_end(self) -> int: ...  # the last seq of a chunk whose append was cut off (0: none)

    def will_end(self, acked_seq: int) -> None: ...  # before the run's end is journaled (runner_svc/unacked_ends.py)

    async def append(self, events: Sequence[Event]) -> None: ...

    async def mirror(self, writer: JournalWriter) -> None: ...  # after a fence: the journal made the stream's copy


class RunJournal:
    """A run's journal writer plus publication: `emit` (one event) or `emit_many` (a batch, one write)
    appends, waits until the events are as durable as configured, then publishes every event up to them
    in seq order. After `release()` nothing more is
    written (the scheduler has ended the run and owns its journal's last word). A write that finds the
    journal fenced (the scheduler ended the run in this runner's place, see shared/fence.py) is not
    published, releases the journal and calls `on_fenced`, which stops the run.

    It also keeps which stages (and fan-out items) have started and not ended, so whoever writes the
    run's end can end them first, whatever way the run ends."""

    def __init__(self, writer: JournalWriter, publisher: Publisher, stream: ChunkAppender | None = None) -> None:
        self.writer = writer
        self.publisher = publisher
        # cluster mode: every batch goes journal -> stream (acknowledged) -> PUB; None on one host
        self.stream = stream
        self._stream_turn = anyio.Lock()  # one append to the stream at a time, in seq order
        self.released = False
        self.fenced = False
        self.on_fenced: Callable[[str], None] = lambda why: None
        self.published_seq = writer.last_seq
        self._pending: deque[Event] = deque()
        self._flush_only = writer.durability == "flush"
        self._open: dict[tuple[str, str | None], None] = {}  # (stage, item) started, not ended; in order

    @property
    def run_id(self) -> str:
        return self.writer.run_id

    @property
    def ended(self) -> bool:
        return self.writer.ended

    async def emit(self, stage: str, event: str, msg: str = "", data: dict[str, Any] | None = None) -> Event | None:
        """Journal one event, then publish it. Returns None (writes nothing) once released."""
        events = await self.emit_many(((stage, event, msg, data),))
        return events[0] if events else None

    async def emit_many(self, drafts: Sequence[EventDraft]) -> list[Event]:
        """Journal a batch of events in one write, then publish them together, in seq order. Returns
        them; [] (nothing written, nothing published) once released or when the write found the journal
        fenced. A batch is all or nothing in both: in the journal whole, then published whole."""
        if self.released or not drafts:
            return []
        if self.stream is not None and any(is_terminal(d[0], d[1]) for d in drafts):
            self.stream.will_end(self.published_seq)  # marked until the stream has the end too
        try:
            events = self.writer.append_many(drafts)
        except JournalFenced as e:
            self._on_fence(e)
            return []
        for ev in events:
            kind = ev.event
            if (kind != "start" and kind not in _STAGE_ENDS) or ev.stage == PIPELINE_STAGE:
                continue
            item = ev.data.get("item") if ev.data else None
            key = (ev.stage, None if item is None else str(item))
            if kind == "start":
                self._open[key] = None
            else:
                self._open.pop(key, None)
        if self.stream is not None:
            return await self._emit_streamed(events)
        last = events[-1].seq
        if self._flush_only and not self._pending:
            # flush mode: the lines are in the OS once append returns; nothing to wait for, nothing queued
            self.publisher.publish_events(events)
            self.published_seq = last
            return events
        self._pending.extend(events)
        await self.writer.wait_durable(last)
        # Events reach here in append order only when nothing awaits in between (flush mode); in fsync
        # mode several emitters wait for one group commit, so publish strictly in seq order from the queue.
        pending = self._pending
        ready: list[Event] = []
        while pending and pending[0].seq <= last:
            ready.append(pending.popleft())
        if ready:
            self.publisher.publish_events(ready)
            self.published_seq = ready[-1].seq
        return events

    async def _emit_streamed(self, events: list[Event]) -> list[Event]:
        """Cluster mode: the batch is in the journal; once durable, it (with whatever is queued before
        it) goes to the event stream, and only once the stream has acknowledged it, to the PUB socket.
        Queued events leave the queue only when acknowledged, so an append cut off (cancelled) is sent
        again by the next one, the same chunk first (the same message ids: no duplicate)."""
        assert self.stream is not None
        last = events[-1].seq
        self._pending.extend(events)
        if not self._flush_only:
            await self.writer.wait_durable(last)
        async with self._stream_turn:
            pending = self._pending
            if self.released or not pending or pending[0].seq > last:
                return [] if self.released else events  # released meanwhile, or sent by an earlier turn
            # flush mode: every queued line is in the OS; fsync mode: up to ours (and a cut-off chunk's)
            upto = self.writer.last_seq if self._flush_only else max(last, self.stream.pending_end)
            ready = [ev for ev in pending if ev.seq <= upto]
            try:
                await self.stream.append(ready)
            except JournalFenced as e:
                self._on_stream_fence(e)
                return []
            except (ServiceUnavailable, JournalError) as e:  # the runner stopping, or a chunk refused
                self.released = True
                pending.clear()
                log.error("run %s: events from seq %d not in the event stream: %s; writing and publishing nothing "
                          "more for the run, stopping its stages", self.run_id, ready[0].seq, e)
                self.on_fenced(f"its events cannot be appended to the event stream: {e}")
                return []
            for _ in ready:
                pending.popleft()
            self.publisher.publish_events(ready)
            self.published_seq = ready[-1].seq
        return events

    def _on_stream_fence(self, e: JournalFenced) -> None:
        log.error("run %s: %s; publishing and writing nothing more for it, stopping its stages", self.run_id, e)
        self.released = self.fenced = True
        self._pending.clear()
        self.on_fenced("fenced: another writer (the scheduler, declaring this runner lost?) appended to the run's "
                       "event stream")

    def _on_fence(self, e: JournalFenced) -> None:
        log.error("%s; publishing and writing nothing more for run %s, stopping its stages", e, self.run_id)
        self.released = self.fenced = True
        self._pending.clear()
        self.on_fenced(f"fenced: the scheduler ended the run in this runner's place ({self.writer.path} replaced)")

    def open_stages(self) -> list[tuple[str, str | None]]:
        """(stage, item) still running, fan-out items before their stage: what a run's end must end."""
        keys = list(self._open)
        return [k for k in keys if k[1] is not None] + [k for k in keys if k[1] is None]

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.writer.close()
