"""Journal figures: append+flush, append+flush+publish (PUB -> SUB on loopback), fsync group commit,
and reading a 1,000,000-event journal from seq 0. Prints medians of several runs; asserts nothing.
Goals: >= 300k events/s appended durably (flush mode), >= 1M events/s read."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import zmq

from runner_svc.publish import Publisher, RunJournal
from shared.ids import new_run_id
from shared.journal import JournalReader, JournalWriter, journal_path

TZ = ZoneInfo("America/Chicago")
DATA = {"stream": "stdout"}


def median_rate(label: str, runs: int, once: Callable[[], tuple[int, float]], extra: Callable[[], str] = lambda: "") -> float:
    rates = []
    for _ in range(runs):
        n, secs = once()
        rates.append(n / secs)
    med = statistics.median(rates)
    print(f"{label:<44} {med:>12,.0f} events/s  (median of {runs}; min {min(rates):,.0f}, max {max(rates):,.0f}){extra()}", flush=True)
    return med


def bench_append(tmp: Path, n: int) -> tuple[int, float]:
    w = JournalWriter.create(tmp, new_run_id("b"), TZ)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            w.append("translator", "log", "a line of output from the stage", DATA)
        return n, time.perf_counter() - t0
    finally:
        w.close()


_SUB_SCRIPT = """
import sys, zmq
ctx = zmq.Context(); sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.RCVHWM, 0); sub.setsockopt(zmq.SUBSCRIBE, b""); sub.connect(sys.argv[1])
n = 0; warm = False
while True:
    topic, _ = sub.recv_multipart()
    if topic == b"warmup":
        if not warm:
            print("ready", flush=True); warm = True
    elif topic == b"end":
        print(n, flush=True); break
    else:
        n += 1
sub.close(linger=0); ctx.term()
"""


def bench_publish(tmp: Path, n: int, stats: dict[str, int]) -> tuple[int, float]:
    """Journal, then publish, as the runner does; a plain SUB in another process counts what arrives."""
    ctx = zmq.Context()
    pub = Publisher.bind(ctx, "tcp://127.0.0.1:*", send_hwm=100_000)
    endpoint = pub.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    sub = subprocess.Popen([sys.executable, "-c", _SUB_SCRIPT, endpoint], stdout=subprocess.PIPE, text=True)
    w = JournalWriter.create(tmp, new_run_id("b"), TZ)
    journal = RunJournal(w, pub)
    try:
        assert sub.stdout is not None
        # a PUB drops everything until the subscription arrives: send warm-up frames until the SUB has one
        ready = threading.Event()
        reader = threading.Thread(target=lambda: (sub.stdout.readline(), ready.set()))  # type: ignore[union-attr]
        reader.start()
        while not ready.wait(0.01):
            pub.send([b"warmup", b""])
        reader.join()
        sent_before, dropped_before = pub.sent, pub.dropped

        async def emit_all() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                await journal.emit("translator", "log", "a line of output from the stage", DATA)
            return time.perf_counter() - t0

        secs = anyio.run(emit_all)
        stats.update(sent=pub.sent - sent_before, dropped=pub.dropped - dropped_before)
        counted: list[str] = []
        reader = threading.Thread(target=lambda: counted.append(sub.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        while reader.is_alive():
            pub.send([b"end", b""])  # the SUB ends at the first "end" (after every event, in order)
            reader.join(0.05)
        stats["received"] = int(counted[0])
        sub.wait(10)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
        journal.close()
        pub.close()
        ctx.term()
    return n, secs


def bench_fsync(tmp: Path, writers: int, per_writer: int) -> tuple[int, float]:
    w = JournalWriter.create(tmp, new_run_id("b"), TZ, durability="fsync", group_commit_ms=5.0)

    class NullPub:
        def publish_event(self, ev: object) -> bool:
            return True

    journal = RunJournal(w, NullPub())  # type: ignore[arg-type]

    async def writer() -> None:
        for _ in range(per_writer):
            await journal.emit("analyzer", "log", "a line of output from the stage", DATA)

    async def main() -> float:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(writers):
                tg.start_soon(writer)
        return time.perf_counter() - t0

    try:
        return writers * per_writer, anyio.run(main)
    finally:
        journal.close()


def write_big_journal(tmp: Path, n: int) -> Path:
    run_id = new_run_id("big")
    w = JournalWriter.create(tmp, run_id, TZ)
    try:
        for i in range(n):
            w.append("translator", "log" if i % 10 else "metric", f"line {i}", {"files_written": i} if i % 10 == 0 else DATA)
    finally:
        w.close()
    return journal_path(tmp, run_id)


def bench_read(path: Path) -> tuple[int, float]:
    reader = JournalReader(path)
    t0 = time.perf_counter()
    n = 0
    for chunk in reader.iter_chunks(0):
        n += len(chunk)
    return n, time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="runwire-bench-") as d:
        tmp = Path(d)
        print(f"journal dir {tmp} (the figures depend on this file system and on the load of the machine)")
        median_rate("append + flush (one os.write per event)", 5, lambda: bench_append(tmp, 200_000))
        stats: dict[str, int] = {}
        median_rate(
            "append + flush + publish (PUB -> SUB)", 5, lambda: bench_publish(tmp, 100_000, stats),
            lambda: f"\n{'':<44} last run: sent {stats['sent']:,}, dropped {stats['dropped']:,}, received by the SUB {stats['received']:,}",
        )
        median_rate("append + fsync group commit (64 emitters)", 3, lambda: bench_fsync(tmp, 64, 500))
        t0 = time.perf_counter()
        big = write_big_journal(tmp, 1_000_000)
        print(f"(wrote a 1,000,000-event journal, {big.stat().st_size / 1e6:.0f} MB, in {time.perf_counter() - t0:.1f}s)", flush=True)
        median_rate("read from seq 0 (iter_chunks, 1M events)", 3, lambda: bench_read(big))


if __name__ == "__main__":
    main()
