"""A ZeroMQ subscriber of runwire's event stream that detects and recovers lost messages.

Not runwire code: only pyzmq, msgspec (for MessagePack) and the standard library, as a program in any
language would do it. It prints each event exactly once, in seq order per run:

    python examples/zmq_subscriber.py --pub tcp://127.0.0.1:5556 --pub tcp://127.0.0.1:5559 \
        --gateway http://127.0.0.1:8080 [--run RUN_ID] [--until-terminal]

Recovery: a seq gap, or a heartbeat announcing a seq above ours (a lost tail), is filled from the
gateway's `GET /api/runs/{run_id}/events?after_seq=N`; anything at or below our last seq is ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

import msgspec
import zmq


def fetch_after(gateway: str, run_id: str, after_seq: int, token: str | None) -> list[dict]:
    events: list[dict] = []
    while True:
        url = f"{gateway}/api/runs/{run_id}/events?after_seq={after_seq}&limit=1000"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.load(resp)
        events.extend(body["events"])
        if not body["more"]:
            return events
        after_seq = body["next_after_seq"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pub", action="append", required=True, help="a PUB endpoint (runner and scheduler)")
    ap.add_argument("--gateway", default="http://127.0.0.1:8080")
    ap.add_argument("--run", help="only this run")
    ap.add_argument("--until-terminal", action="store_true", help="exit after the run's terminal event")
    args = ap.parse_args()
    token = os.environ.get("RUNWIRE_TOKEN")

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    for ep in args.pub:
        sub.connect(ep)
    sub.setsockopt(zmq.SUBSCRIBE, f"ev/{args.run}/".encode() if args.run else b"ev/")
    sub.setsockopt(zmq.SUBSCRIBE, b"hb/")
    last: dict[str, int] = {}  # run_id -> last seq printed

    def emit(ev: dict) -> bool:
        """Print one event if it is the next one; True when it ends the run we wait for."""
        print(json.dumps(ev), flush=True)
        last[ev["run_id"]] = ev["seq"]
        return args.until_terminal and ev["stage"] == "pipeline" and ev["event"] in ("success", "failure", "cancelled")

    def catch_up(run_id: str) -> bool:
        for ev in fetch_after(args.gateway, run_id, last.get(run_id, 0), token):
            if ev["seq"] == last.get(run_id, 0) + 1 and emit(ev):
                return True
        return False

    try:
        while True:
            topic, payload = sub.recv_multipart()
            msg = msgspec.msgpack.decode(payload)
            if topic.startswith(b"hb/"):
                for run_id, seq in (msg.get("runs") or {}).items():
                    if (args.run is None or run_id == args.run) and seq > last.get(run_id, 0):
                        if catch_up(run_id):  # lost tail
                            return 0
                continue
            run_id, seq = msg["run_id"], msg["seq"]
            have = last.get(run_id, 0)
            if seq <= have:
                continue  # already printed (e.g. fetched during a refill)
            if seq > have + 1 and catch_up(run_id):  # a gap: fill it first
                return 0
            if seq == last.get(run_id, 0) + 1 and emit(msg):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
