"""Fan-out: delivered events collected into batches (each event encoded once, each frame built once)
and offered to every connected client that follows them, now or, with many clients, once per tick;
and the watchdog that times every client's live sends and keepalives from one task.

With many clients, delivered events wait for the next tick (up to MAX_FRAME_INTERVAL) and go out as
one batch, so each client gets one frame per tick. Whatever reads the delivery state for a client
(registration, the end of a replay) calls `flush()` first, so a client registered at any moment
receives exactly the deliveries after that moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import anyio

from shared.events import Event
from shared.protocol import CloseReason

from .batch import Batch, Collector, Notice
from .metrics import GatewayStats

FLUSH_EVENTS = 5_000  # a long journal fill is fanned out in batches of this size
FRAME_PACING_FROM = 50  # clients; below this every batch goes out at once
# 500 clients: one tick (one frame per client) per 30 ms. On 2 cores shared with the clients, a shorter
# tick cost more CPU than it saved in waiting (bench e2e --only fanout, 500 clients at 1k/s, runs
# interleaved: 20 ms p99 77-131 ms, 30 ms 54-110 ms in the same 6 pairs, each pair lower; 25 ms about
# as 30 ms for ~7% more CPU; 40 ms p99 62-74 ms against 49-63 ms)
FRAME_INTERVAL_PER_CLIENT = 60e-6
MAX_FRAME_INTERVAL = 0.030
WATCHDOG_INTERVAL = 0.25  # seconds between checks of clients' sends (timeout) and idleness (keepalive)


class Receiver(Protocol):
    """A client as the fan-out sees it. None of these may block or await."""

    @property
    def only_run(self) -> str | None: ...

    def offer(self, batch: Batch) -> None: ...

    def notice(self, notice: Notice) -> None: ...

    def check(self, now: float) -> None:
        """The watchdog's visit: time out a send, or ask for a keepalive."""

    def request_close(self, reason: CloseReason) -> None: ...


class Fanout:
    def __init__(self, stats: GatewayStats, live_cursor: Callable[[], str]) -> None:
        self.stats = stats
        self.live_cursor = live_cursor  # the all-runs cursor after every delivery so far
        self.all_clients: set[Receiver] = set()
        self.run_clients: dict[str, set[Receiver]] = {}
        self.client_count = 0
        self.pacing_from = FRAME_PACING_FROM  # clients; a test may lower it to exercise the ticks
        self._out = Collector()  # delivered, not yet offered to the clients
        self.on_batch: Callable[[Batch], None] | None = None  # sees every batch, clients or not (Learner.feed)
        self._tick = asyncio.Event()  # set when events wait for the next tick
        self._last_flush = 0.0

    # ------------------------------------------------------------------ delivery (the sequencer's side)

    def add(self, ev: Event) -> None:
        self._out.add(ev)
        if len(self._out) >= FLUSH_EVENTS:
            self.flush()  # a long journal fill goes out in pieces

    def notice(self, notice: Notice) -> None:
        self.flush()  # the events before the notice go first
        for client in self.all_clients:
            client.notice(notice)
        for client in self.run_clients.get(notice.run_id, ()):
            client.notice(notice)

    def settle(self) -> None:
        """Offer what was delivered now, or (with many clients) at the next tick."""
        if not len(self._out):
            return
        if self.client_count < self.pacing_from:
            self.flush()
        else:
            self._tick.set()

    def flush(self) -> None:
        """Offer every delivered event to the clients now. Call before reading the delivery state on a
        client's behalf, so that state and the client's share of deliveries meet exactly."""
        batch = self._out.take()
        if batch is None:
            return
        self._last_flush = start = time.monotonic()
        if self.on_batch is not None:
            self.on_batch(batch)
        if not self.client_count:
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

    def frame_interval(self) -> float:
        """The least time between two frames to one client: nothing with few clients; with many, a few
        milliseconds, so each frame carries more events and the per-frame cost (ours and every
        client's) does not grow with clients x batches."""
        if self.client_count < self.pacing_from:
            return 0.0
        return min(MAX_FRAME_INTERVAL, self.client_count * FRAME_INTERVAL_PER_CLIENT)

    # ------------------------------------------------------------------ tasks (in the hub's task group)

    async def ticker(self) -> None:
        """With many clients: offer what waits once per frame interval."""
        while True:
            await self._tick.wait()
            self._tick.clear()
            delay = self._last_flush + self.frame_interval() - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)  # more events join this tick meanwhile
            self.flush()

    async def watchdog(self) -> None:
        """Send timeouts and keepalives for every client, from one task: a timer per send or per wait
        would cost more than the send itself when hundreds of clients each take a frame per tick."""
        while True:
            await anyio.sleep(WATCHDOG_INTERVAL)
            now = time.monotonic()
            for client in self.clients():
                client.check(now)

    # ------------------------------------------------------------------ clients

    def clients(self) -> Iterator[Receiver]:
        yield from self.all_clients
        for group in self.run_clients.values():
            yield from group

    def register(self, client: Receiver) -> None:
        self.flush()  # what was delivered before this moment is not the new client's
        self.client_count += 1
        if client.only_run is None:
            self.all_clients.add(client)
        else:
            self.run_clients.setdefault(client.only_run, set()).add(client)

    def unregister(self, client: Receiver) -> None:
        if client.only_run is None:
            if client in self.all_clients:
                self.client_count -= 1
                self.all_clients.discard(client)
        else:
            group = self.run_clients.get(client.only_run)
            if group is not None and client in group:
                self.client_count -= 1
                group.discard(client)
                if not group:
                    del self.run_clients[client.only_run]
