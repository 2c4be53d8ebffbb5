"""The all-runs stream's cursor: what a client has received, in journal terms, so any gateway (this one
after a restart too) can resume it exactly.

A cursor is base64url (no padding) of a MessagePack map:
    v  format version (1)
    j  8 bytes naming where the events are: in single-host mode the journal directory (hash of its
       absolute path and inode); in cluster mode the cluster (`cluster_tag`: hash of the event
       stream's name and its creation time, as JetStream records it). A cursor from another
       directory or cluster, or from one deleted and made again, is refused (hello recovered=false)
    t  the watermark: unix seconds when the frame was made (gateway clock, floored)
    p  {run_id: last seq received} for runs the client is following (not ended for it)
    d  [run_id, ...] runs the client has received to their end, created after t - MARGIN

Meaning: the client holds, for every run r,
    p[r] events                         if r in p
    all of it                           if r in d, or if r was created (its `queued` timestamp, a journal
                                        fact) at or before t - MARGIN_S
    nothing                             otherwise (r created after t - MARGIN_S and not named)
Resuming replays each run from that position. Runs are ordered by creation time, not by id: a run id
that sorts below others but was created later (another id generator, a hand-made id) is still found,
because its creation time is what counts. The margin covers the delay between a run's creation and the
moment the gateway sees its journal (discovery scans every second) plus clock skew between writers on
one host; a run created more than MARGIN_S before the cursor's watermark that the gateway had never
seen is the one case it cannot serve, and MARGIN_S is far beyond any discovery delay.

In cluster mode what names the cluster is its event stream: every gateway of a cluster reads the one
JetStream stream (RUNWIRE_EVENTS on the servers of `cluster.nats`), and JetStream records the moment
it was created, the same answer for every gateway, stored with the stream itself (no shared file, no
config key to keep equal): so a cursor issued by gateway A is exact on gateway B, and a stream that
was deleted and made again (its runs gone) is another cluster, as a journal directory made again is
another directory. Run creation times in a cluster come from the scheduler's clock on another host;
MARGIN_S covers the skew between hosts too (keep their clocks synchronised, as NTP does), and
the event stream's sweep (every two seconds) is the discovery delay.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

import msgspec

from shared.ids import is_valid_run_id

VERSION = 1
MARGIN_S = 60
MAX_CURSOR_CHARS = 256 * 1024


class Cursor(msgspec.Struct, frozen=True):
    v: int
    j: bytes
    t: int
    p: dict[str, int] = {}
    d: list[str] = []


class CursorError(ValueError):
    """A cursor that cannot be used; the message is the hello frame's `reason`."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Cursor)


def journal_dir_tag(journal_dir: Path) -> bytes:
    """8 bytes that change when the journal directory is another one (path) or was made again (inode)."""
    path = Path(journal_dir).resolve()
    try:
        ino = os.stat(path).st_ino
    except FileNotFoundError:
        ino = 0
    return hashlib.blake2b(f"{path}\0{ino}".encode(), digest_size=8).digest()


def cluster_tag(stream_name: str, created: str) -> bytes:
    """8 bytes naming a cluster: its event stream's name and creation time (see the module's text)."""
    return hashlib.blake2b(f"cluster\0{stream_name}\0{created}".encode(), digest_size=8).digest()


def encode_cursor(tag: bytes, t: int, positions: dict[str, int], done: list[str]) -> str:
    raw = _encoder.encode(Cursor(VERSION, tag, t, positions, done))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, tag: bytes) -> Cursor:
    """The cursor, checked; raise CursorError saying why it cannot be served exactly."""
    if len(text) > MAX_CURSOR_CHARS:
        raise CursorError(f"cursor too long ({len(text)} characters)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        cur = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError, RecursionError) as e:
        raise CursorError(f"cursor is not one this gateway issued (undecodable: {e})") from None
    if cur.v != VERSION:
        raise CursorError(f"cursor version {cur.v} is not supported (expected {VERSION})")
    if cur.j != tag:
        raise CursorError("cursor is from another journal directory or cluster (or one deleted and made again)")
    for run_id, seq in cur.p.items():
        if not is_valid_run_id(run_id) or seq < 0:
            raise CursorError(f"cursor names an invalid run position {run_id!r:.80}: {seq}")
    for run_id in cur.d:
        if not is_valid_run_id(run_id):
            raise CursorError(f"cursor names an invalid run id {run_id!r:.80}")
    return cur
