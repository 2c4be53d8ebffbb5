"""Stage programs for the runner tests: run as a script (`python runner_stages.py MODE ...`) for command
stages, or imported (with this folder on PYTHONPATH) for callable stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

IGNORE_TERM = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"


def hang() -> int:
    """Spawn a grandchild that ignores SIGTERM, say both pids, then hang."""
    child = subprocess.Popen([sys.executable, "-c", IGNORE_TERM])
    print(f"grandchild {child.pid}", flush=True)
    print(f"stage {os.getpid()}", flush=True)
    time.sleep(300)
    return 0


def daemon() -> int:
    """Leave a process behind outside the stage's process group (its own session), then succeed."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"daemon {child.pid}", flush=True)
    return 0


def fail_once(marker: str) -> int:
    path = Path(marker)
    if path.exists():
        print("second attempt: fine", flush=True)
        return 0
    path.write_text("failed once")
    print("first attempt: failing", file=sys.stderr, flush=True)
    return 3


def item(name: str, failing: str) -> int:
    if name in failing.split(","):
        print(f"item {name} fails", file=sys.stderr, flush=True)
        return 5
    print(f"item {name} ok", flush=True)
    return 0


def spam(n: int) -> int:
    out = sys.stdout
    for i in range(n):
        out.write(f"line {i}\n")
    out.flush()
    return 0


def linger(marker: str) -> int:
    print(f"stage {os.getpid()}", flush=True)
    print(marker, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(300)
    return 0


# ---------------------------------------------------------------------------------- callable stages


def counting(ctx) -> None:  # type: ignore[no-untyped-def]
    ctx.log("hello from a callable", answer=42)
    ctx.add("files_written", 2)
    ctx.add("files_written")
    ctx.metric("half way", pct=50)
    print(f"plain print from {ctx.stage} of {ctx.run_id}")
    time.sleep(0.8)  # long enough for a progress metric carrying the counters
    ctx.set("rows", 1234)


def failing(ctx) -> None:  # type: ignore[no-untyped-def]
    ctx.log("about to fail")
    raise ValueError("callable went wrong on purpose")


def flooding(ctx) -> None:  # type: ignore[no-untyped-def]
    """Hostile messages on the stage's message socket: 20 MiB without a newline (then its end), a bad
    line, then a good message; the runner must skip the first two with notes and keep the third."""
    fd = int(os.environ["RUNWIRE_STAGE_FD"])

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    for _ in range(20):
        send(b"x" * (1 << 20))
    send(b"\n{not json\n")
    ctx.metric("still heard", ok=1)


def bursting(ctx) -> None:  # type: ignore[no-untyped-def]
    """Bursts, as fast as the stage can: `count` metrics, one write each (what `ctx.metric` does); then
    one write holding 1,000 messages with a bad line after the first 500 (the runner must put its note
    between them); then `lines` stdout lines in one write."""
    count, lines = int(ctx.params["count"]), int(ctx.params["lines"])
    for i in range(count):
        ctx.metric("tick", i=i)
    fd = int(os.environ["RUNWIRE_STAGE_FD"])
    raw = [b'{"kind":"metric","msg":"tick","data":{"i":%d}}\n' % (count + i) for i in range(1000)]
    data = memoryview(b"".join(raw[:500]) + b"{not json\n" + b"".join(raw[500:]))
    while data:
        data = data[os.write(fd, data):]
    sys.stdout.write("".join(f"line {i}\n" for i in range(lines)))
    sys.stdout.flush()


def hang_callable(ctx) -> None:  # type: ignore[no-untyped-def]
    hang()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "hang":
        sys.exit(hang())
    if mode == "daemon":
        sys.exit(daemon())
    if mode == "fail_once":
        sys.exit(fail_once(args[0]))
    if mode == "item":
        sys.exit(item(args[0], args[1]))
    if mode == "spam":
        sys.exit(spam(int(args[0])))
    if mode == "linger":
        sys.exit(linger(args[0]))
    if mode == "fail":
        print("failing on purpose", file=sys.stderr)
        sys.exit(4)
    if mode == "ok":
        print("ok")
        sys.exit(0)
    sys.exit(f"unknown mode {mode}")
