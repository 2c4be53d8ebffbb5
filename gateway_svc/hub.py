"""The live path, assembled: one subscriber to every publisher's PUB socket, whose messages the
sequencer (sequencer.py) turns into per-run delivery in seq order, which the fan-out (fanout.py)
offers to the connected clients. The hub owns their tasks, the journal directory's tag and the
all-runs cursor; clients see it through the narrow `HubView` (hubview.py), nothing more.

A client registered at any moment receives exactly the hub's deliveries after that moment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import zmq
import zmq.asyncio

from shared.config import Settings
from shared.curve import CurveKeys, secure_client
from shared.errors import ProtocolError
from shared.ids import is_valid_run_id
from shared.wire import (
    EVENT_TOPIC_PREFIX,
    HEARTBEAT_TOPIC_PREFIX,
    configure_socket,
    decode_event_payload,
    decode_heartbeat_payload,
)

from .cleanblocks import Learner
from .cursor import MARGIN_S, encode_cursor, journal_dir_tag
from .fanout import Fanout, Receiver
from .metrics import GatewayStats
from .runindex import RunEntry, RunIndex
from .runsource import REPLAY_CHUNK, JournalSource, RunSource
from .sequencer import SeenHeartbeat, Sequencer
from .subscription import Subscription

log = logging.getLogger(__name__)

RCVHWM = 200_000
DRAIN_MAX = 5_000  # messages taken per wake-up of the subscriber (they become one batch)
BLOCKS_DIR = "gateway/blocks"  # under the state directory: the clean journal blocks replays send as they are
SWEEP_INTERVAL = 1.0  # seconds between journal-directory sweeps (new runs, tails no publisher claims)


class Hub:
    def __init__(self, settings: Settings, stats: GatewayStats, index: RunIndex, source: RunSource | None = None) -> None:
        self.cfg = settings.config.gateway
        self.journal_dir: Path = settings.journal_dir
        self.source: RunSource = source if source is not None else JournalSource(self.journal_dir, settings.state_dir / BLOCKS_DIR)
        # set by prepare(), once the directory exists (the tag includes its inode); in cluster mode by
        # the service, from the event stream (cursor.cluster_tag)
        self.tag = b""
        self.stats = stats
        self.index = index
        self.fanout = Fanout(stats, self.live_cursor)
        if isinstance(self.source, JournalSource):  # replays send the lines it delivered as they are
            self.fanout.on_batch = Learner(self.source.clean, REPLAY_CHUNK).feed
        self.sequencer = Sequencer(self.journal_dir, self.cfg, stats, index, self.fanout, self.source)
        self._d_cache: tuple[tuple[int, int, int], list[str]] | None = None
        self._subscription: Subscription | None = None
        self.keys: CurveKeys | None = None  # CURVE client keys for the SUB socket (cluster mode)
        self.follow: Callable[[Subscription], Coroutine[Any, Any, None]] | None = None  # cluster mode: the registry follower
        self.connected: set[str] = set()  # endpoints the SUB socket is connected to
        self.sweep_interval = SWEEP_INTERVAL

    # ------------------------------------------------------------------ lifecycle

    def prepare(self) -> int:
        """Make sure the journal directory exists, name it for cursors, index its runs (blocking)."""
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.tag = journal_dir_tag(self.journal_dir)
        count = self.index.load()
        if isinstance(self.source, JournalSource):
            self.source.prune(set(self.index.runs))  # the directory was just listed: not again
        self.stats.journal_gaps += sum(len(e.gaps) for e in self.index.runs.values())
        return count

    async def run(self, ctx: zmq.asyncio.Context, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and sweep until cancelled; `started` once the subscriber is connected."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._subscriber, ctx)
            if self.follow is not None:
                assert self._subscription is not None
                tg.start_soon(self.follow, self._subscription)
            tg.start_soon(self._sweeper)
            tg.start_soon(self.fanout.ticker)
            tg.start_soon(self.fanout.watchdog)
            task_status.started()

    async def _subscriber(self, ctx: zmq.asyncio.Context, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        sub = Subscription(ctx)
        sock = sub.sock
        lock = self.sequencer.lock
        try:
            configure_socket(sock, rcvhwm=RCVHWM)
            secure_client(sock, self.keys)  # before any connect: CURVE applies to connections made after
            for endpoint in self.cfg.subscribe:
                if endpoint in self.connected:
                    continue
                try:
                    sock.connect(endpoint)
                except zmq.ZMQError as e:
                    raise OSError(f"gateway.subscribe: cannot connect SUB to {endpoint!r}: {e}") from e
                self.connected.add(endpoint)
                log.info("subscribed to events and heartbeats on %s", endpoint)
            sock.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC_PREFIX)
            sock.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC_PREFIX)
            self._subscription = sub
            task_status.started()
            while True:
                msgs = await sub.next_batch(DRAIN_MAX)
                async with lock:
                    await self._process(msgs)
        finally:
            self._subscription = None
            self.connected.clear()
            sub.close()

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(self.sweep_interval)
            if self._subscription is not None:
                self._subscription.check()
            await self.sequencer.sweep()

    async def _process(self, msgs: list[list[bytes]]) -> None:
        seq = self.sequencer
        runs = self.index.runs
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
                if ev.run_id not in runs and not is_valid_run_id(ev.run_id):  # a known run's id was checked
                    self._bad(f"event with invalid run id {ev.run_id!r:.80}")
                    continue
                self.stats.events_in += 1
                await seq.accept(ev)
            elif topic.startswith(HEARTBEAT_TOPIC_PREFIX):
                try:
                    hb = decode_heartbeat_payload(payload)
                except ProtocolError as e:
                    self._bad(f"{topic[:80]!r}: {e}")
                    continue
                self.stats.heartbeats_in += 1
                await seq.heartbeat(hb)
            else:
                self._bad(f"unexpected topic {topic[:80]!r}")
        self.fanout.settle()

    def _bad(self, what: str) -> None:
        self.stats.bad_messages += 1
        self.sequencer.warn("bad-message", f"dropped a bad message from a publisher: {what}")

    # ------------------------------------------------------------------ HubView (what clients see)

    def frontier(self, run_id: str) -> int:
        entry = self.index.get(run_id)
        return entry.frontier if entry is not None else 0

    def positions(self) -> dict[str, int]:
        """{run_id: frontier} of every run not ended."""
        return {rid: e.frontier for rid, e in self.index.active.items()}

    @property
    def discoveries(self) -> int:
        return self.index.discoveries

    def discovered_after(self, number: int) -> list[str]:
        return self.index.discovered_after(number)

    def created_us(self, run_id: str) -> int | None:
        entry = self.index.get(run_id)
        return entry.created_us if entry is not None else None

    def live_cursor(self) -> str:
        """The all-runs cursor of a client that has received every delivery so far."""
        t = int(time.time())
        return encode_cursor(self.tag, t, self.positions(), self.recent_done(t))

    def recent_done(self, t: int) -> list[str]:
        key = (t, self.sequencer.ended_count, self.index.discoveries)
        if self._d_cache is None or self._d_cache[0] != key:
            self._d_cache = (key, self.index.recent_ended((t - MARGIN_S) * 1_000_000))
        return self._d_cache[1]

    def flush(self) -> None:
        self.fanout.flush()

    def register(self, client: Receiver) -> None:
        self.fanout.register(client)

    def unregister(self, client: Receiver) -> None:
        self.fanout.unregister(client)

    def note_gap(self, run_id: str, lo: int, hi: int) -> None:
        self.sequencer.note_gap(run_id, lo, hi)

    def gap_frame(self, run_id: str, lo: int, hi: int) -> bytes:
        return self.sequencer.gap_frame(run_id, lo, hi)

    # ------------------------------------------------------------------ for the routes, health and tests

    @property
    def client_count(self) -> int:
        return self.fanout.client_count

    @property
    def pacing_from(self) -> int:
        return self.fanout.pacing_from

    @pacing_from.setter
    def pacing_from(self, clients: int) -> None:
        self.fanout.pacing_from = clients

    @property
    def publishers(self) -> dict[str, SeenHeartbeat]:
        return self.sequencer.publishers

    @property
    def run_end_listeners(self) -> list[Callable[[str], None]]:
        return self.sequencer.run_end_listeners

    def claimed_runs(self) -> set[str]:
        return self.sequencer.claimed_runs()

    async def sweep(self) -> None:
        await self.sequencer.sweep()

    async def ensure_run(self, run_id: str) -> RunEntry | None:
        return await self.sequencer.ensure_run(run_id)

    def journal_missing(self, run_id: str) -> str | None:
        return self.sequencer.journal_missing(run_id)

    def known_gaps(self, run_id: str, after: int) -> list[tuple[int, int]]:
        return self.sequencer.known_gaps(run_id, after)

    def gauges(self) -> dict[str, Any]:
        gauges = {
            "runs_known": len(self.index.runs),
            "runs_active": len(self.index.active),
            "publishers_seen": len(self.publishers),
        }
        if isinstance(self.source, JournalSource):
            gauges["replay_clean_blocks"] = len(self.source.clean)
        return gauges

    def counters(self) -> dict[str, tuple[str, float]]:
        if not isinstance(self.source, JournalSource):
            return {}
        clean = self.source.clean
        return {
            "replay_blocks_sent_as_they_are": ("Journal blocks found clean before, sent by replays without decoding", clean.hits),
            "replay_blocks_changed": ("Remembered clean journal blocks whose bytes were not the same: decoded again", clean.changed),
            "replay_blocks_loaded": ("Clean journal blocks loaded from the gateway's state directory (kept across restarts)", clean.loaded),
            "replay_block_store_errors": ("Failures to read or write the kept clean blocks (replays decode instead)",
                                          clean.store.errors if clean.store is not None else 0),
        }
