"""The clean journal blocks (cleanblocks.py) of each run, kept on disk in the gateway's state directory,
`<home>/state/gateway/blocks/<run_id>.blocks`, so that a gateway that restarts still sends the lines of
runs it knew as they are, from its first replay on.

A cache, never the truth: a replay sends a block's bytes only if they hash to the digest kept here,
and every record carries a CRC of its fields, so a torn or damaged record is skipped (and said) and its
lines are decoded as if it were never written. Forging records needs write access to the home, which
holds the journals themselves. Appends are one write() of whole records (no fsync: a record lost in a
crash costs one decode). Only blocks of PERSIST_MIN bytes or more are kept: a run smaller than that
replays in about a millisecond anyway, and gets no file.

File: HEADER, then records of RECORD.size bytes: offset, length, first seq, lines, flags (1: the last
line is the run's end; 2: learned from the hub), SHA-256 of the block, CRC-32 of all that."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from shared.ids import is_valid_run_id

from .cleanblocks import CleanBlock

log = logging.getLogger(__name__)

HEADER = b"runwire clean blocks 1\n"
RECORD = struct.Struct("<QIQIB32sI")
_FIELDS = struct.Struct("<QIQIB32s")
PERSIST_MIN = 64 * 1024
SUFFIX = ".blocks"
WARN_EVERY_S = 60.0  # a failing disk is said at once, then at most once a minute (with a count)
_TERMINAL, _LEARNED = 1, 2


def encode(block: CleanBlock) -> bytes:
    flags = (_TERMINAL if block.terminal else 0) | (_LEARNED if block.learned else 0)
    fields = _FIELDS.pack(block.offset, block.length, block.first_seq, block.n, flags, block.digest)
    return fields + struct.pack("<I", zlib.crc32(fields))


def decode(data: bytes, where: str) -> list[CleanBlock]:
    """The blocks of a file's bytes; what is torn or damaged is skipped and said (naming `where`)."""
    if not data.startswith(HEADER):
        log.warning("%s does not start with %r: ignored (its runs' replays decode their lines)", where, HEADER)
        return []
    body = memoryview(data)[len(HEADER):]
    whole = len(body) - len(body) % RECORD.size
    if whole != len(body):
        log.info("%s ends in a torn record (%d bytes): ignored", where, len(body) - whole)
    blocks: list[CleanBlock] = []
    bad = 0
    for i in range(0, whole, RECORD.size):
        offset, length, first, n, flags, dig, crc = RECORD.unpack_from(body, i)
        if crc != zlib.crc32(body[i:i + _FIELDS.size]) or length == 0 or n == 0 or first < 1 or flags > 3:
            bad += 1
            continue
        blocks.append(CleanBlock(offset, length, first, n, bool(flags & _TERMINAL), dig, bool(flags & _LEARNED)))
    if bad:
        log.warning("%s: %d of %d record(s) damaged (CRC or fields): skipped", where, bad, whole // RECORD.size)
    return blocks


class BlockStore:
    """One file per run in `directory`. Blocking: called from replays' worker threads, and from the
    event loop for what the hub delivers (one small append per ~128 KiB of a run's events)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.errors = 0
        self._warned_at = -WARN_EVERY_S
        self._unwarned = 0

    def path(self, run_id: str) -> Path:
        return self.directory / f"{run_id}{SUFFIX}"

    def load(self, run_id: str) -> list[CleanBlock]:
        path = self.path(run_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            self._failed(f"cannot read {path}", e)
            return []
        return decode(data, str(path))

    def append(self, run_id: str, blocks: Iterable[CleanBlock]) -> None:
        data = b"".join(encode(b) for b in blocks if b.length >= PERSIST_MIN)
        if not data:
            return
        path = self.path(run_id)
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            except FileNotFoundError:
                if self._create(path, data):
                    return
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # made by another thread meanwhile
            try:
                os.write(fd, data)  # whole records in one write: appends by two threads do not interleave
            finally:
                os.close(fd)
        except OSError as e:
            self._failed(f"cannot append to {path}", e)

    def _create(self, path: Path, data: bytes) -> bool:
        """Make the run's file with its header and `data` at once (written aside, then linked in: no
        reader or appender ever sees it without its header). False if it exists already."""
        self.directory.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        aside.write_bytes(HEADER + data)
        try:
            os.link(aside, path)
        except FileExistsError:
            return False
        finally:
            aside.unlink()
        return True

    def forget(self, run_id: str) -> None:
        try:
            self.path(run_id).unlink(missing_ok=True)
        except OSError as e:
            self._failed(f"cannot remove {self.path(run_id)}", e)

    def prune(self, present: set[str]) -> int:
        """Remove the files of runs whose journals are gone (blocking; at start-up). The count."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        except OSError as e:
            self._failed(f"cannot list {self.directory}", e)
            return 0
        removed = 0
        for name in names:
            if name.startswith(".") and f"{SUFFIX}." in name:  # a file written aside by a process killed then
                try:
                    (self.directory / name).unlink(missing_ok=True)
                except OSError as e:
                    self._failed(f"cannot remove {self.directory / name}", e)
                continue
            run_id = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else ""
            if not is_valid_run_id(run_id) or run_id in present:
                continue  # not ours (left alone), or a run still there
            self.forget(run_id)
            removed += 1
        return removed

    def _failed(self, what: str, e: OSError) -> None:
        """A cache that cannot be kept costs decodes, not events: said (rate-limited), counted."""
        self.errors += 1
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S:
            self._unwarned += 1
            return
        more = f" ({self._unwarned} more such error(s) in the last minute)" if self._unwarned else ""
        log.warning("clean-block store: %s: %s; replays decode what it would have held%s", what, e.strerror or e, more)
        self._warned_at = now
        self._unwarned = 0
