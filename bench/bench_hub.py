"""The gateway's hub in this process, without sockets: CPU per event of taking publisher messages
(topic and msgpack payload, as the runner sends them), sequencing them, learning their clean blocks
and offering each batch to one all-runs client that builds its frame, at batch sizes of 1 (1k/s: one
event per wake-up), 30 (~10k/s here) and 300. It isolates the gateway's own Python per event from
wake-ups, libzmq and the kernel, which the end-to-end bench (bench_e2e) measures with it. Prints
medians (min-max) of several runs; asserts nothing.

    python -m bench hub [--events N] [--repeat N] [--batches 1 30 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway_svc.batch import Batch, Notice  # noqa: E402
from gateway_svc.hub import Hub  # noqa: E402
from gateway_svc.metrics import GatewayStats  # noqa: E402
from gateway_svc.runindex import RunIndex  # noqa: E402
from shared.config import (
    Settings,  # noqa: E402
    load_settings,  # noqa: E402
)
from shared.journal import JournalWriter, begin_run, read_events  # noqa: E402
from shared.protocol import CloseReason  # noqa: E402
from shared.wire import encode_event_frames  # noqa: E402
from tests.harness import write_config  # noqa: E402


class FrameBuilder:
    """An all-runs client that takes every batch's frame (built once per batch, as a caught-up
    WebSocket client's is) and sends it nowhere."""

    only_run = None

    def __init__(self) -> None:
        self.bytes = 0

    def offer(self, batch: Batch) -> None:
        self.bytes += len(batch.frame())

    def notice(self, notice: Notice) -> None:
        return None

    def check(self, now: float) -> None:
        return None

    def request_close(self, reason: CloseReason) -> None:
        return None


def _journal(settings: Settings, n: int) -> list[list[bytes]]:
    """A run of n metric ticks journaled (the hub reads a journal when it fills a gap), as messages."""
    tz = ZoneInfo("UTC")
    run_id = f"hubbench{time.strftime('%Y%m%dT%H%M%S')}000000Z-{n:06x}"[:60]
    begin_run(settings.journal_dir, run_id, tz, "load", {}, {"trigger": "manual"})
    with JournalWriter.open(settings.journal_dir, run_id, tz) as w:
        for i in range(n):
            w.append("load", "metric", "tick", {"i": i, "t": time.time_ns()})
    return [encode_event_frames(ev) for ev in read_events(settings.journal_dir, run_id)]


async def _one(settings: Settings, msgs: list[list[bytes]], batch: int) -> float:
    hub = Hub(settings, GatewayStats(), RunIndex(settings.journal_dir))
    client = FrameBuilder()
    hub.fanout.register(client)
    lock = hub.sequencer.lock
    c0 = time.thread_time()
    for i in range(0, len(msgs), batch):
        async with lock:
            await hub._process(msgs[i:i + batch])
    cpu = time.thread_time() - c0
    if hub.stats.events_in != len(msgs) or not client.bytes:
        raise RuntimeError(f"the hub took {hub.stats.events_in} of {len(msgs)} events")
    return cpu / len(msgs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 30, 300])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = write_config(Path(tmp))
        settings = load_settings(cfg)
        settings.journal_dir.mkdir(parents=True, exist_ok=True)
        msgs = _journal(settings, args.events)
        figures: dict[int, list[float]] = {b: [] for b in args.batches}
        for _ in range(args.repeat):  # interleaved, so each size sees the same moments of a noisy host
            for b in args.batches:
                figures[b].append(anyio.run(_one, settings, msgs, b))
    print(f"hub CPU per event ({args.events:,} events, {args.repeat} runs, median (min-max)):")
    for b, runs in figures.items():
        print(f"  batches of {b:>4}: {statistics.median(runs):6.2f} us ({min(runs):.2f}-{max(runs):.2f})")


if __name__ == "__main__":
    main()
