"""ZeroMQ framing of the event stream: topics, payloads, and the runner's heartbeat.

Event messages are two frames: `ev/<run_id>/<stage>/<event>` (UTF-8) and the event as a MessagePack map.
Both the runner and the scheduler publish, each the events it writes to journals (the scheduler:
`queued`, and the ends it decides itself: cancel while queued, runner lost, skipped slots).
Heartbeats are two frames too: `hb/<runner_id>` and a MessagePack `Heartbeat`, so a subscriber that
subscribes to `ev/` alone never sees them, and one that subscribes to `hb/` learns each active run's
last seq (a lost tail shows as a heartbeat seq above the last event it received).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from .errors import ProtocolError
from .events import Event, msgpack_decoder, msgpack_encoder
from .values import DECODE_ERRORS

EVENT_TOPIC_PREFIX = b"ev/"
HEARTBEAT_TOPIC_PREFIX = b"hb/"

log = logging.getLogger(__name__)


def event_topic(ev: Event) -> bytes:
    return event_topic_of(ev.run_id, ev.stage, ev.event)


def event_topic_of(run_id: str, stage: str, event: str) -> bytes:
    return f"ev/{run_id}/{stage}/{event}".encode()


def run_topic_prefix(run_id: str) -> bytes:
    """Subscribe to this to receive exactly one run's events."""
    return f"ev/{run_id}/".encode()


def encode_event_frames(ev: Event) -> list[bytes]:
    return [event_topic(ev), msgpack_encoder.encode(ev)]


def decode_event_payload(payload: bytes) -> Event:
    try:
        return msgpack_decoder.decode(payload)
    except DECODE_ERRORS as e:
        raise ProtocolError(f"bad event payload ({len(payload)} bytes): {e}") from e


class Heartbeat(msgspec.Struct, omit_defaults=True):
    """A publisher's periodic proof of life on its PUB socket (runners, and the scheduler too)."""

    runner_id: str  # the publisher's id; "scheduler" for the scheduler
    timestamp: str
    journal_dir: str
    config_path: str
    # run_id -> last seq written to the journal (and published) for every run this publisher owns now,
    # and for the runs it ended in the last ENDED_RUNS_KEPT_S seconds: a subscriber that lost a run's
    # last events (its terminal one included) learns of them here
    runs: dict[str, int] = {}
    interval: float = 1.0
    service: str = "runner"  # "runner" or "scheduler"
    # the publisher's journal repairs so far (shared.journal.stats): torn lines it cut off when it took
    # a journal over, corrupt lines its readers skipped; the gateway exports them on /metrics
    journal_torn_repaired: int = 0
    journal_corrupt_skipped: int = 0
    stopping: bool = False  # the publisher's last heartbeat before a clean stop: it is gone, not late


ENDED_RUNS_KEPT_S = 60.0


class RecentlyEnded:
    """The runs a publisher ended in the last ENDED_RUNS_KEPT_S seconds, with their last seq: what its
    heartbeats keep listing after the end, so a subscriber that lost a terminal event learns of it.

    With a `path` the list is kept in that file too (rewritten at each end, times by the wall clock), so
    a publisher that restarts, or restarts again, goes on listing the runs it ended within the minute,
    those its own recovery ended at start included."""

    def __init__(self, keep_s: float = ENDED_RUNS_KEPT_S, path: Path | None = None) -> None:
        self.keep_s = keep_s
        self.path = path
        self._ended: dict[str, tuple[int, float]] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("recently ended runs: cannot read %s (%s); heartbeats start without them", path, e)
            return
        try:
            kept = _ended_decoder.decode(raw)
        except DECODE_ERRORS as e:
            log.warning("recently ended runs: %s is not a valid list (%s); heartbeats start without it", path, e)
            return
        self._ended = {run_id: (seq, at) for run_id, (seq, at) in kept.items()}
        self._prune()

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(_ended_encoder.encode({r: [seq, at] for r, (seq, at) in self._ended.items()}))
            os.replace(tmp, self.path)
        except OSError as e:
            log.error("recently ended runs: cannot write %s (%s); a restart within a minute forgets them", self.path, e)

    def add(self, run_id: str, last_seq: int) -> None:
        self._ended[run_id] = (last_seq, time.time())
        self._prune()
        self._save()

    def _prune(self) -> None:
        now = time.time()
        horizon = now - self.keep_s
        # an entry from the future (the clock was set back) is kept no longer than one from now
        for run_id in [r for r, (_, at) in self._ended.items() if at < horizon or at > now + self.keep_s]:
            del self._ended[run_id]

    def seqs(self) -> dict[str, int]:
        """run_id -> last seq of the runs still kept (older ones are dropped here)."""
        self._prune()
        return {run_id: seq for run_id, (seq, _) in self._ended.items()}


_ended_encoder = msgspec.json.Encoder()
_ended_decoder = msgspec.json.Decoder(dict[str, tuple[int, float]])

_hb_encoder = msgspec.msgpack.Encoder()
_hb_decoder = msgspec.msgpack.Decoder(Heartbeat)


def heartbeat_topic(runner_id: str) -> bytes:
    return f"hb/{runner_id}".encode()


def encode_heartbeat_frames(hb: Heartbeat) -> list[bytes]:
    return [heartbeat_topic(hb.runner_id), _hb_encoder.encode(hb)]


def decode_heartbeat_payload(payload: bytes) -> Heartbeat:
    try:
        return _hb_decoder.decode(payload)
    except DECODE_ERRORS as e:
        raise ProtocolError(f"bad heartbeat payload ({len(payload)} bytes): {e}") from e


def configure_socket(sock: zmq.Socket[Any], *, sndhwm: int | None = None, rcvhwm: int | None = None) -> None:
    """Set linger 0 and explicit high-water marks (never rely on the library's defaults)."""
    sock.setsockopt(zmq.LINGER, 0)
    if sndhwm is not None:
        sock.setsockopt(zmq.SNDHWM, sndhwm)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
