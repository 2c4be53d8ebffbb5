"""The live path: one subscriber to every publisher's PUB socket, per-run delivery in seq order with
gaps and lost tails filled from the journal (once per run, for all clients), and fan-out of each
batch of events, encoded once, to the connected clients' queues.

Invariant: for each run the hub delivers a gapless seq sequence starting after the run's frontier at
the moment the hub learnt of it (its last seq on disk for runs found at start; 0 for runs learnt of
later). A client registered at any moment receives exactly the hub's deliveries after that moment.

Each batch's frame is built once for all clients, and the hub writes it straight to every caught-up
WebSocket client whose connection takes it at once (one syscall each, no task woken); the others
queue it for their own pump task. With many clients, delivered events wait for the hub's next tick
(up to MAX_FRAME_INTERVAL) and go out as one batch, so each client gets one frame per tick. Whatever
reads the hub's state for a client (registration, the end of a replay) flushes the waiting events
first, so "after that moment" stays exact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec
import zmq
import zmq.asyncio

from shared.config import Settings
from shared.errors import ProtocolError
from shared.events import Event
from shared.ids import is_valid_run_id
from shared.journal import JournalReader, journal_path, list_run_ids
from shared.wire import (
    EVENT_TOPIC_PREFIX,
    HEARTBEAT_TOPIC_PREFIX,
    Heartbeat,
    configure_socket,
    decode_event_payload,
    decode_heartbeat_payload,
)

from .cursor import MARGIN_S, encode_cursor, journal_dir_tag
from .metrics import GatewayStats
from .runindex import RunEntry, RunIndex, dir_mtime_ns
from .subscription import Subscription

if TYPE_CHECKING:
    from .clients import StreamClient

log = logging.getLogger(__name__)

RCVHWM = 200_000
DRAIN_MAX = 5_000  # messages taken per wake-up of the subscriber (they become one batch)
FLUSH_EVENTS = 5_000  # a long journal fill is fanned out in batches of this size
SWEEP_INTERVAL = 1.0  # seconds between journal-directory sweeps (new runs, tails no publisher claims)
_WARN_EVERY = 10.0
FRAME_PACING_FROM = 50  # clients; below this every batch goes out at once
FRAME_INTERVAL_PER_CLIENT = 40e-6  # 500 clients: one tick (one frame per client) per 20 ms
MAX_FRAME_INTERVAL = 0.025
WATCHDOG_INTERVAL = 0.25  # seconds between checks of clients' sends (timeout) and idleness (keepalive)

_encoder = msgspec.json.Encoder()


def events_frame(parts: list[bytes], cursor: str) -> bytes:
    """The `events` frame of JSON-encoded events (joined once: `a + b + c` would copy them each time)."""
    return b"".join((b'{"type":"events","events":[', b",".join(parts), b'],"cursor":"', cursor.encode(), b'"}'))


def array_frame(array: bytes, cursor: str) -> bytes:
    """The `events` frame of a JSON array of events."""
    return b"".join((b'{"type":"events","events":', array, b',"cursor":"', cursor.encode(), b'"}'))


class Batch:
    """Events delivered together, each encoded once; clients take the whole batch or their run's part.
    A client with nothing else queued sends the batch's frame, built once for all such clients."""

    __slots__ = ("events", "parts", "nbytes", "cursor", "by_run", "terminal_runs", "_joined", "_run_joined",
                 "_frame", "_run_frames")

    def __init__(self, events: list[Event], parts: list[bytes], by_run: dict[str, list[int]]) -> None:
        self.events = events
        self.parts = parts
        self.nbytes = sum(len(p) for p in parts) + len(parts)
        self.by_run = by_run
        self.terminal_runs = {ev.run_id for ev in events if ev.is_terminal}
        self.cursor = ""  # the all-runs cursor after this batch (set when all-runs clients exist)
        self._joined: bytes | None = None
        self._run_joined: dict[str, bytes] = {}
        self._frame: bytes | None = None
        self._run_frames: dict[str, bytes] = {}

    def frame(self) -> bytes:
        """The all-runs `events` frame of this batch alone."""
        if self._frame is None:
            self._frame = events_frame([self.joined()], self.cursor)
        return self._frame

    def run_frame(self, run_id: str) -> bytes:
        """The `events` frame of this batch's part for one run (its cursor: that run's last seq)."""
        data = self._run_frames.get(run_id)
        if data is None:
            data = self._run_frames[run_id] = events_frame([self.run_joined(run_id)], str(self.run_last_seq(run_id)))
        return data

    def joined(self) -> bytes:
        if self._joined is None:
            self._joined = b",".join(self.parts)
        return self._joined

    def run_size(self, run_id: str) -> tuple[int, int]:
        idx = self.by_run.get(run_id)
        if not idx:
            return 0, 0
        return len(idx), sum(len(self.parts[i]) for i in idx) + len(idx)

    def run_joined(self, run_id: str) -> bytes:
        data = self._run_joined.get(run_id)
        if data is None:
            data = self._run_joined[run_id] = b",".join(self.parts[i] for i in self.by_run[run_id])
        return data

    def run_last_seq(self, run_id: str) -> int:
        return self.events[self.by_run[run_id][-1]].seq

    def items(self, run_id: str | None) -> Iterable[tuple[Event, bytes]]:
        if run_id is None:
            return zip(self.events, self.parts)
        return ((self.events[i], self.parts[i]) for i in self.by_run.get(run_id, ()))


class _Out:
    """A batch being collected."""

    __slots__ = ("events", "parts", "by_run")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.parts: list[bytes] = []
        self.by_run: dict[str, list[int]] = {}

    def add(self, ev: Event) -> None:
        i = len(self.events)
        self.events.append(ev)
        self.parts.append(_encoder.encode(ev))
        idx = self.by_run.get(ev.run_id)
        if idx is None:
            self.by_run[ev.run_id] = [i]
        else:
            idx.append(i)

    def take(self) -> Batch | None:
        if not self.events:
            return None
        batch = Batch(self.events, self.parts, self.by_run)
        self.__init__()  # type: ignore[misc]
        return batch


class Notice:
    """A frame for the clients of one run (and all-runs clients), sent in order between batches: the
    `journal_gap` error frame, which does not end the stream."""

    __slots__ = ("run_id", "frame")

    def __init__(self, run_id: str, frame: bytes) -> None:
        self.run_id = run_id
        self.frame = frame


@dataclass
class SeenHeartbeat:
    at: float  # monotonic
    hb: Heartbeat


class Hub:
    def __init__(self, settings: Settings, stats: GatewayStats, index: RunIndex) -> None:
        self.settings = settings
        self.cfg = settings.config.gateway
        self.journal_dir: Path = settings.journal_dir
        self.tag = b""  # set by prepare(), once the directory exists (the tag includes its inode)
        self.stats = stats
        self.index = index
        self.all_clients: set[StreamClient] = set()
        self.run_clients: dict[str, set[StreamClient]] = {}
        self._client_count = 0
        self.publishers: dict[str, SeenHeartbeat] = {}  # publisher id -> its last heartbeat
        # one deliverer at a time (fills await the journal); uncontended, taking it does not yield to the
        # event loop (the subscriber yields on its own, see Subscription.next_batch)
        self._lock = anyio.Lock(fast_acquire=True)
        self._warned: dict[str, float] = {}
        self._dir_mtime = -2
        self._d_cache: tuple[tuple[int, int, int], list[str]] | None = None
        self._ended_count = 0
        self._out = _Out()  # delivered, not yet offered to the clients
        self._tick = asyncio.Event()  # set when events wait for the next tick
        self._last_flush = 0.0
        self.pacing_from = FRAME_PACING_FROM  # clients; a test may lower it to exercise the ticks
        self._subscription: Subscription | None = None
        self.run_end_listeners: list[Callable[[str], None]] = []  # called with each run id that ends (e.g. the archiver)

    # ------------------------------------------------------------------ lifecycle

    def prepare(self) -> int:
        """Make sure the journal directory exists, name it for cursors, index its runs (blocking)."""
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.tag = journal_dir_tag(self.journal_dir)
        count = self.index.load()
        self.stats.journal_gaps += sum(len(e.gaps) for e in self.index.runs.values())
        return count

    async def run(self, ctx: zmq.asyncio.Context, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and sweep until cancelled; `started` once the subscriber is connected."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._subscriber, ctx)
            tg.start_soon(self._sweeper)
            tg.start_soon(self._ticker)
            tg.start_soon(self._watchdog)
            task_status.started()

    async def _subscriber(self, ctx: zmq.asyncio.Context, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        sub = Subscription(ctx)
        sock = sub.sock
        try:
            configure_socket(sock, rcvhwm=RCVHWM)
            for endpoint in self.cfg.subscribe:
                try:
                    sock.connect(endpoint)
                except zmq.ZMQError as e:
                    raise OSError(f"gateway.subscribe: cannot connect SUB to {endpoint!r}: {e}") from e
                log.info("subscribed to events and heartbeats on %s", endpoint)
            sock.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC_PREFIX)
            sock.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC_PREFIX)
            self._subscription = sub
            task_status.started()
            while True:
                msgs = await sub.next_batch(DRAIN_MAX)
                async with self._lock:
                    await self._process(msgs)
        finally:
            self._subscription = None
            sub.close()

    async def _sweeper(self) -> None:
        """Safety net for what no message announced: journals created while their `queued` was lost,
        and tails of runs that no publisher's heartbeat claims (e.g. a terminal event that was dropped
        after its writer let go of the journal)."""
        while True:
            await anyio.sleep(SWEEP_INTERVAL)
            if self._subscription is not None:
                self._subscription.check()
            await self.sweep()

    async def sweep(self) -> None:
        mtime = dir_mtime_ns(self.journal_dir)
        if mtime != self._dir_mtime:
            self._dir_mtime = mtime
            names = await anyio.to_thread.run_sync(list_run_ids, self.journal_dir)
            gone = self.index.forget_removed(set(names))
            if gone:
                log.info("%d ended run(s) whose journals were removed are no longer listed (e.g. %s)", len(gone), gone[0])
            new = [rid for rid in names if rid not in self.index.runs]
            for run_id in new:
                async with self._lock:
                    if run_id not in self.index.runs:
                        entry = self._discover(run_id)
                        await self._fill(entry, None, "found in the journal directory")
                        self._flush()
        claimed = self.claimed_runs()
        for entry in list(self.index.active.values()):
            if entry.run_id in claimed:
                continue
            try:
                size = journal_path(self.journal_dir, entry.run_id).stat().st_size
            except FileNotFoundError:
                continue  # a journal removed by hand: nothing more can come from it
            if size == entry.size_seen:
                continue
            entry.size_seen = size
            async with self._lock:
                await self._fill(entry, None, "journal sweep (no publisher claims the run)")
                self._flush()

    def claimed_runs(self) -> set[str]:
        """Runs that a publisher with a fresh heartbeat lists (owned now, or ended in the last
        ENDED_RUNS_KEPT_S seconds: their tails are covered by the heartbeat's seq). A publisher that
        said it was stopping claims nothing: the sweep takes over its runs' tails at once."""
        now = time.monotonic()
        out: set[str] = set()
        for seen in self.publishers.values():
            if seen.hb.stopping:
                continue
            if now - seen.at <= max(self.cfg.runner_stale_after, 3 * seen.hb.interval):
                out.update(seen.hb.runs)
        return out

    # ------------------------------------------------------------------ delivery

    async def _ticker(self) -> None:
        """With many clients: offer what waits once per frame interval (see frame_interval)."""
        while True:
            await self._tick.wait()
            self._tick.clear()
            delay = self._last_flush + self.frame_interval() - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)  # more events join this tick meanwhile
            self.flush()

    async def _watchdog(self) -> None:
        """Send timeouts and keepalives for every client, from one task: a timer per send or per wait
        would cost more than the send itself when hundreds of clients each take a frame per tick."""
        while True:
            await anyio.sleep(WATCHDOG_INTERVAL)
            now = time.monotonic()
            for client in self.all_clients:
                client.check(now)
            for group in self.run_clients.values():
                for client in group:
                    client.check(now)

    async def _process(self, msgs: list[list[bytes]]) -> None:
        for frames in msgs:
            if len(frames) != 2:
                self._bad(f"a message of {len(frames)} frames")
                continue
            topic, payload = frames
            if topic.startswith(EVENT_TOPIC_PREFIX):
                try:
                    ev = decode_event_payload(payload)
                except ProtocolError as e:
                    self._bad(f"{topic[:80]!r}: {e}")
                    continue
                if not is_valid_run_id(ev.run_id):
                    self._bad(f"event with invalid run id {ev.run_id!r:.80}")
                    continue
                self.stats.events_in += 1
                await self._accept(ev)
            elif topic.startswith(HEARTBEAT_TOPIC_PREFIX):
                try:
                    hb = decode_heartbeat_payload(payload)
                except ProtocolError as e:
                    self._bad(f"{topic[:80]!r}: {e}")
                    continue
                self.stats.heartbeats_in += 1
                await self._heartbeat(hb)
            else:
                self._bad(f"unexpected topic {topic[:80]!r}")
        self._flush()

    async def _accept(self, ev: Event) -> None:
        entry = self.index.get(ev.run_id)
        if entry is None:
            entry = self._discover(ev.run_id)
        if ev.seq <= entry.frontier:
            self.stats.duplicates_dropped += 1
            return
        if ev.seq > entry.frontier + 1:
            await self._fill(entry, ev.seq - 1, f"seq gap before {ev.seq}")
            if ev.seq <= entry.frontier:
                return  # the journal had it too
            if ev.seq > entry.frontier + 1:
                missing = ev.seq - entry.frontier - 1
                self.stats.gap_events_unfilled += missing
                self._warn(
                    ev.run_id,
                    f"run {ev.run_id}: events {entry.frontier + 1}..{ev.seq - 1} are not in the journal "
                    f"{journal_path(self.journal_dir, ev.run_id)} (is the gateway reading the runner's journal "
                    "directory? see /healthz); delivering the live events without them",
                )
                self._hole(entry, entry.frontier + 1, ev.seq - 1)
        self._deliver(entry, ev)

    async def _heartbeat(self, hb: Heartbeat) -> None:
        self.publishers[hb.runner_id] = SeenHeartbeat(time.monotonic(), hb)
        for run_id, last in hb.runs.items():
            if not is_valid_run_id(run_id):
                continue
            entry = self.index.get(run_id)
            if entry is None:
                entry = self._discover(run_id)
            if last > entry.frontier and not entry.ended:
                before = entry.frontier
                await self._fill(entry, last, f"lost tail: heartbeat of {hb.runner_id} says seq {last}")
                if entry.frontier < last:
                    self._warn(
                        run_id,
                        f"run {run_id}: {hb.runner_id} reports seq {last} but the journal "
                        f"{journal_path(self.journal_dir, run_id)} ends at {entry.frontier} (journal directory "
                        f"mismatch? {hb.runner_id} writes to {hb.journal_dir})",
                    )
                elif before < entry.frontier:
                    self.stats.lost_tails_filled += 1

    def _discover(self, run_id: str) -> RunEntry:
        self.stats.runs_discovered += 1
        log.debug("run %s: first seen; delivering it from its first event", run_id)
        return self.index.new_entry(run_id)

    async def _fill(self, entry: RunEntry, upto: int | None, why: str) -> None:
        """Deliver the run's journal events after its frontier, through `upto` (None: to the end)."""
        reader = JournalReader(journal_path(self.journal_dir, entry.run_id), entry.run_id)
        offset = await anyio.to_thread.run_sync(reader.offset_after, entry.frontier)
        filled = 0
        while not entry.ended and (upto is None or entry.frontier < upto):
            events, nxt = await anyio.to_thread.run_sync(reader.read_chunk, offset, entry.frontier)
            if nxt == offset:
                break
            offset = nxt
            for ev in events:
                if ev.seq <= entry.frontier:
                    continue
                if ev.seq != entry.frontier + 1:
                    self.stats.gap_events_unfilled += ev.seq - entry.frontier - 1
                    self._warn(entry.run_id, f"run {entry.run_id}: journal lacks seq {entry.frontier + 1}..{ev.seq - 1} (corrupt lines?)")
                    self._hole(entry, entry.frontier + 1, ev.seq - 1)
                self._deliver(entry, ev)
                filled += 1
        if filled:
            self.stats.gaps_filled += 1
            self.stats.gap_events_filled += filled
            log.info("run %s: %d event(s) filled from the journal (%s)", entry.run_id, filled, why)

    def _hole(self, entry: RunEntry, lo: int, hi: int) -> None:
        """Seqs lo..hi are about to be skipped on the live path (the journal cannot supply them): tell
        the run's live clients in order, between the events before and after the hole. Clients still
        replaying learn it from the journal themselves (their merge stops at the jump and replays)."""
        self.note_gap(entry.run_id, lo, hi)
        self.flush()  # the events before the hole go first
        notice = Notice(entry.run_id, self.gap_frame(entry.run_id, lo, hi))
        for client in self.all_clients:
            client.notice(notice)
        for client in self.run_clients.get(entry.run_id, ()):
            client.notice(notice)

    def note_gap(self, run_id: str, lo: int, hi: int) -> None:
        """Remember a hole in a run's journal (so later hellos can say recovered=false); count it once."""
        entry = self.index.get(run_id)
        if entry is None:
            self.stats.journal_gaps += 1
            return
        if (lo, hi) not in entry.gaps:
            if len(entry.gaps) < 1000:
                entry.gaps.append((lo, hi))
            self.stats.journal_gaps += 1

    def known_gaps(self, run_id: str, after: int) -> list[tuple[int, int]]:
        """Holes already found in the run's journal that lie after seq `after`."""
        entry = self.index.get(run_id)
        return [g for g in entry.gaps if g[1] > after] if entry is not None else []

    def gap_message(self, run_id: str, lo: int, hi: int) -> str:
        path = journal_path(self.journal_dir, run_id)
        why = ("corrupt line skipped; see the gateway log" if path.exists()
               else "the file does not exist: journal directory mismatch? see /healthz")
        return f"events {lo}..{hi} of run {run_id} are missing from the journal {path} ({why})"

    def gap_frame(self, run_id: str, lo: int, hi: int) -> bytes:
        """The `journal_gap` error frame (the one error frame after which the stream goes on)."""
        return _encoder.encode({"type": "error", "code": "journal_gap", "message": self.gap_message(run_id, lo, hi),
                                "run_id": run_id, "missing": [lo, hi]})

    def _deliver(self, entry: RunEntry, ev: Event) -> None:
        self.index.apply(entry, ev)
        if ev.is_terminal:
            self._ended_count += 1
            for listener in self.run_end_listeners:
                listener(ev.run_id)
        self._out.add(ev)
        if len(self._out.events) >= FLUSH_EVENTS:
            self.flush()  # a long journal fill goes out in pieces

    def _flush(self) -> None:
        """Offer what was delivered now, or (with many clients) at the next tick."""
        if not self._out.events:
            return
        if self._client_count < self.pacing_from:
            self.flush()
        else:
            self._tick.set()

    def flush(self) -> None:
        """Offer every delivered event to the clients now. Call before reading the hub's state on a
        client's behalf, so that state and the client's share of deliveries meet exactly."""
        batch = self._out.take()
        if batch is None:
            return
        self._last_flush = start = time.monotonic()
        if not self._client_count:
            return
        if self.all_clients:
            batch.cursor = self.live_cursor()
            for client in self.all_clients:
                client.offer(batch)
        if self.run_clients:
            for run_id in batch.by_run:
                for client in self.run_clients.get(run_id, ()):
                    client.offer(batch)
        self.stats.fanout_seconds.observe(time.monotonic() - start)

    # ------------------------------------------------------------------ for clients

    def live_cursor(self) -> str:
        """The all-runs cursor of a client that has received every delivery so far."""
        t = int(time.time())
        positions = {rid: e.frontier for rid, e in self.index.active.items()}
        return encode_cursor(self.tag, t, positions, self.recent_done(t))

    def recent_done(self, t: int) -> list[str]:
        key = (t, self._ended_count, self.index.discoveries)
        if self._d_cache is None or self._d_cache[0] != key:
            self._d_cache = (key, self.index.recent_ended((t - MARGIN_S) * 1_000_000))
        return self._d_cache[1]

    def frame_interval(self) -> float:
        """The least time between two frames to one client: nothing with few clients; with many, a few
        milliseconds, so each frame carries more events and the per-frame cost (ours and every
        client's) does not grow with clients x batches."""
        if self._client_count < self.pacing_from:
            return 0.0
        return min(MAX_FRAME_INTERVAL, self._client_count * FRAME_INTERVAL_PER_CLIENT)

    @property
    def client_count(self) -> int:
        return self._client_count

    def register(self, client: StreamClient) -> None:
        self.flush()  # what was delivered before this moment is not the new client's
        self._client_count += 1
        if client.only_run is None:
            self.all_clients.add(client)
        else:
            self.run_clients.setdefault(client.only_run, set()).add(client)

    def unregister(self, client: StreamClient) -> None:
        if client.only_run is None:
            if client in self.all_clients:
                self._client_count -= 1
                self.all_clients.discard(client)
        else:
            group = self.run_clients.get(client.only_run)
            if group is not None and client in group:
                self._client_count -= 1
                group.discard(client)
                if not group:
                    del self.run_clients[client.only_run]

    def frontier(self, run_id: str) -> int:
        entry = self.index.get(run_id)
        return entry.frontier if entry is not None else 0

    async def ensure_run(self, run_id: str) -> RunEntry | None:
        """The run's entry; a journal the hub has not seen yet is taken in (and delivered) now."""
        entry = self.index.get(run_id)
        if entry is not None:
            return entry
        if not journal_path(self.journal_dir, run_id).exists():
            return None
        async with self._lock:
            entry = self.index.get(run_id)
            if entry is None:
                entry = self._discover(run_id)
                await self._fill(entry, None, "requested by a client")
                self._flush()
        return entry

    def journal_missing(self, run_id: str) -> str | None:
        """None if the run's journal exists in our directory; else why not, naming the file and the
        publishers that write elsewhere. (The hub learns of runs from PUB events and heartbeats too, so
        it can know a run whose journal is in another directory: seed 000's mismatch.)"""
        path = journal_path(self.journal_dir, run_id)
        if path.exists():
            return None
        claims = [f"{seen.hb.service} {pid} (writes journals to {seen.hb.journal_dir})"
                  for pid, seen in self.publishers.items() if run_id in seen.hb.runs]
        elsewhere = [f"{seen.hb.service} {pid} writes journals to {seen.hb.journal_dir}"
                     for pid, seen in self.publishers.items()
                     if Path(seen.hb.journal_dir).resolve() != self.journal_dir.resolve()]
        source = f"reported by {', '.join(claims)}" if claims else "learnt of from a publisher's messages"
        mismatch = f"JOURNAL DIRECTORY MISMATCH: {'; '.join(elsewhere)}; " if elsewhere else "journal directory mismatch? "
        msg = (f"run {run_id} was {source}, but its journal {path} does not exist in the gateway's journal "
               f"directory {self.journal_dir}: {mismatch}point every service at one config/RUNWIRE_HOME (see /healthz)")
        self._warn(f"journal-missing/{run_id}", msg)
        return msg

    def close_all(self, code: int, reason: str) -> None:
        for client in [*self.all_clients, *(c for group in self.run_clients.values() for c in group)]:
            client.request_close(code, reason)

    # ------------------------------------------------------------------ reporting

    def _bad(self, what: str) -> None:
        self.stats.bad_messages += 1
        self._warn("bad-message", f"dropped a bad message from a publisher: {what}")

    def _warn(self, key: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[key] = now
            if len(self._warned) > 10_000:
                self._warned.clear()
            log.warning("%s", msg)

    def gauges(self) -> dict[str, Any]:
        return {
            "runs_known": len(self.index.runs),
            "runs_active": len(self.index.active),
            "publishers_seen": len(self.publishers),
        }
