"""The end-to-end benchmark's clients: a WebSocket, an SSE and a plain ZeroMQ SUB client, the same for
every system, each tallying one run's events by seq (exactly once: seqs contiguous, none twice) and,
when timed, the emit-to-arrival latency of every tick (the event's data.t against this host's clock).

Frames are runwire's (`{"type": "events", "events": [...], "cursor"}`) or, for the baselines, one
event per frame. A counting client decodes only each frame's first and last event (msgspec Raw), so
that the server, not the clients, is what is measured.

As a worker process (the benchmark runs its clients in processes of their own):

    python -m bench.e2e_clients KIND URL [--clients N] [--timed K] [--timeout S] [--uvloop]

prints `connected` once every client is connected, then one JSON line when every client has seen the
run's terminal event (or at the timeout).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ("ws", "sse", "zmq")
TERMINAL = frozenset({"success", "failure", "cancelled"})
MAX_LATENCIES = 200_000  # per worker: beyond, every k-th (an unbiased sample for percentiles)


class _Data(msgspec.Struct):
    t: int = 0


class _Event(msgspec.Struct):
    seq: int
    stage: str = ""
    event: str = ""
    data: _Data | None = None


class _Frame(msgspec.Struct):
    type: str
    events: list[_Event] = []
    cursor: str = ""


class _RawFrame(msgspec.Struct):
    type: str
    events: list[msgspec.Raw] = []
    cursor: str = ""


_frame = msgspec.json.Decoder(_Frame)
_raw_frame = msgspec.json.Decoder(_RawFrame)
_event = msgspec.json.Decoder(_Event)
_packed_event = msgspec.msgpack.Decoder(_Event)


class Tally:
    """One client's view of one run: counts, seq order, latencies (ms) when timed, the last cursor."""

    def __init__(self, timed: bool) -> None:
        self.timed = timed
        self.latencies: list[float] = []
        self.count = 0
        self.first_seq = 0
        self.last_seq = 0
        self.gaps = 0  # a seq ahead of the next expected one
        self.repeats = 0  # a seq at or below one already seen
        self.ended = False
        self.cursor = ""
        self.first_at = 0.0  # perf_counter of the first and last event
        self.last_at = 0.0
        self.first_t = 0  # timed: emit time (ns) of the first and last tick, and when the last arrived
        self.last_t = 0
        self.last_arrival = 0

    def _span(self, first: _Event, last: _Event, n: int) -> None:
        now = time.perf_counter()
        if not self.first_seq:
            self.first_seq, self.first_at = first.seq, now
        elif first.seq <= self.last_seq:
            self.repeats += 1
        elif first.seq != self.last_seq + 1:
            self.gaps += 1
        self.last_at = now
        self.count += n
        self.last_seq = last.seq
        if last.stage == "pipeline" and last.event in TERMINAL:
            self.ended = True

    def _time(self, events: list[_Event]) -> None:
        now = time.time_ns()
        ts = [e.data.t for e in events if e.data is not None and e.data.t]
        if ts:
            self.latencies.extend((now - t) / 1e6 for t in ts)
            self.first_t = self.first_t or ts[0]
            self.last_t, self.last_arrival = ts[-1], now

    def runwire_frame(self, data: bytes | str) -> None:
        if self.timed:
            f = _frame.decode(data)
            if f.type != "events" or not f.events:
                return
            self._time(f.events)
            first, last = f.events[0], f.events[-1]
            if len(f.events) > 1:  # each event's seq in a frame follows the last one's
                seqs = [e.seq for e in f.events]
                if any(b != a + 1 for a, b in zip(seqs, seqs[1:], strict=False)):
                    self.gaps += 1
        else:
            r = _raw_frame.decode(data)
            if r.type != "events" or not r.events:
                return
            f = r
            first, last = _event.decode(r.events[0]), _event.decode(r.events[-1])
        self.cursor = f.cursor
        self._span(first, last, len(f.events))

    def plain_frame(self, data: bytes | str) -> None:
        e = _event.decode(data)
        if self.timed:
            self._time([e])
        self._span(e, e, 1)

    def packed_event(self, payload: bytes) -> None:
        e = _packed_event.decode(payload)
        if self.timed:
            self._time([e])
        self._span(e, e, 1)

    def exact(self, first_seq: int = 1) -> bool:
        """Every event from `first_seq` to the terminal one, each once, in order."""
        return (self.ended and self.first_seq == first_seq and not self.gaps and not self.repeats
                and self.count == self.last_seq - first_seq + 1)

    def summary(self, first_seq: int = 1) -> dict[str, Any]:
        return {"count": self.count, "first_seq": self.first_seq, "last_seq": self.last_seq, "gaps": self.gaps,
                "repeats": self.repeats, "ended": self.ended, "exact": self.exact(first_seq),
                "span_s": self.last_at - self.first_at, "emit_span_s": (self.last_t - self.first_t) / 1e9,
                "last_latency_s": (self.last_arrival - self.last_t) / 1e9}


async def ws_client(http: aiohttp.ClientSession, url: str, tally: Tally, connected: anyio.Event | None = None,
                    *, runwire: bool = True, timeout: float = 60.0) -> None:
    """Reads `url` until the terminal event; `connected` is set after the hello (runwire) or handshake."""
    on_frame = tally.runwire_frame if runwire else tally.plain_frame
    with anyio.move_on_after(timeout):
        # a short close timeout: the polling baseline never reads, so never answers a client's close
        async with http.ws_connect(url, max_msg_size=256 * 1024 * 1024, compress=0,
                                   timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0)) as ws:
            if runwire:
                hello = await ws.receive_json()
                if hello.get("type") != "hello" or not hello.get("recovered", True):
                    raise RuntimeError(f"{url}: unexpected first frame {hello!r}")
                tally.cursor = hello.get("cursor", "")
            if connected:
                connected.set()
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    on_frame(msg.data)
                    if tally.ended:
                        return


async def sse_client(http: aiohttp.ClientSession, url: str, tally: Tally, connected: anyio.Event | None = None,
                     *, timeout: float = 60.0) -> None:
    with anyio.move_on_after(timeout):
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if connected and not connected.is_set():
                    connected.set()  # the first data line is the hello
                tally.runwire_frame(line[6:])
                if tally.ended:
                    return


async def zmq_client(endpoint: str, tally: Tally, connected: anyio.Event | None = None, *, timeout: float = 60.0) -> None:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"ev/")
        sock.connect(endpoint)
        await anyio.sleep(0.5)  # the subscription has to reach the publisher (slow joiner)
        if connected:
            connected.set()
        with anyio.move_on_after(timeout):
            while not tally.ended:
                # one await per wake-up, then what is already queued without awaiting (an await per
                # message made this client, not the runner, the bottleneck at 10k/s)
                msgs = [await sock.recv_multipart()]
                while True:
                    try:
                        msgs.append(sock.recv_multipart(zmq.NOBLOCK).result())
                    except zmq.Again:
                        break
                for _topic, payload in msgs:
                    tally.packed_event(payload)
    finally:
        sock.close(linger=0)
        ctx.term()


# ------------------------------------------------------------------------------------------- worker


async def _worker(kind: str, url: str, clients: int, timed: int, timeout: float, plain: bool, first_seq: int) -> None:
    tallies = [Tally(timed=i < timed) for i in range(clients)]
    events = [anyio.Event() for _ in tallies]

    async def announce() -> None:
        for e in events:
            await e.wait()
        print("connected", flush=True)

    t0 = time.process_time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async with anyio.create_task_group() as tg:
            tg.start_soon(announce)
            for tally, ev in zip(tallies, events, strict=True):
                if kind == "ws":
                    tg.start_soon(lambda t=tally, e=ev: ws_client(http, url, t, e, runwire=not plain, timeout=timeout))
                elif kind == "sse":
                    tg.start_soon(lambda t=tally, e=ev: sse_client(http, url, t, e, timeout=timeout))
                else:
                    tg.start_soon(lambda t=tally, e=ev: zmq_client(url, t, e, timeout=timeout))
    latencies = [x for t in tallies for x in t.latencies]
    if len(latencies) > MAX_LATENCIES:
        latencies = latencies[:: len(latencies) // MAX_LATENCIES + 1]
    result = {"clients": [t.summary(first_seq) for t in tallies], "latencies": latencies, "cpu": time.process_time() - t0}
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="benchmark clients of one kind, in this process")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--timed", type=int, default=1, help="how many of the clients time every event")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--plain", action="store_true", help="one event per frame (the baselines)")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--first-seq", type=int, default=1,
                        help="the first seq this stream carries (2 on the runner's PUB: the scheduler publishes `queued`)")
    a = parser.parse_args(argv)
    anyio.run(_worker, a.kind, a.url, a.clients, a.timed, a.timeout, a.plain, a.first_seq,
              backend_options={"use_uvloop": a.uvloop})


if __name__ == "__main__":
    main()
