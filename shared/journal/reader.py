"""Reading a journal: complete lines only, corrupt and foreign lines skipped and counted, any seq found
by bisecting the file (seqs grow with the offset), the last event found from the end."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..events import Event, json_decoder
from ..values import DECODE_ERRORS
from .files import BISECT_WINDOW, CHUNK_BYTES, journal_path, log, run_id_from_path, stats

HEAD_BYTES = 16 * 1024  # the head of a journal: `queued` and, nearly always, the runner's `start`


def _report_corrupt(path: Path, offset: int, reason: str) -> None:
    key = (str(path), offset)
    if key in stats._warned:
        return
    if len(stats._warned) > 100_000:
        stats._warned.clear()
    stats._warned.add(key)
    stats.corrupt_lines_skipped += 1
    log.warning("journal %s: skipped corrupt line at byte %d: %s", path, offset, reason)


_run_id_of = operator.attrgetter("run_id")


def _decode_block(path: Path, run_id: str | None, buf: bytes, base_offset: int) -> list[Event]:
    """Decode a block of complete lines; fall back to line by line only when the block has a bad line."""
    try:
        events = json_decoder.decode_lines(buf)
    except DECODE_ERRORS:
        events = None
    if events is not None and (run_id is None or all(map(run_id.__eq__, map(_run_id_of, events)))):
        return events
    out: list[Event] = []
    pos = 0
    for line in buf.split(b"\n"):
        start = pos
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            ev = json_decoder.decode(line)
        except DECODE_ERRORS as e:
            _report_corrupt(path, base_offset + start, str(e))
            continue
        if run_id is not None and ev.run_id != run_id:
            _report_corrupt(path, base_offset + start, f"run_id {ev.run_id!r} in the journal of {run_id!r}")
            continue
        out.append(ev)
    return out


def newer_than(events: list[Event], seq: int) -> list[Event]:
    """The events with a seq above `seq` (seqs grow along a journal: a cut at the front, nearly always)."""
    if seq > 0 and events and events[0].seq <= seq:
        return [e for e in events if e.seq > seq]
    return events


class JournalReader:
    """Reads one run's journal from any seq, complete lines only, in chunks of about 1 MiB."""

    def __init__(self, path: Path, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id if run_id is not None else run_id_from_path(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def _line_after(self, f: Any, pos: int, hi: int) -> tuple[int, int] | None:
        """(offset, seq) of the first line of this run starting at or after `pos` and before `hi`.

        A line that does not decode, or that belongs to another run, is stepped over: its seq says
        nothing about this run's order (a foreign seq 1 after our seq 2 would send the bisect past it).
        """
        if pos == 0:
            start = 0
        else:
            f.seek(pos - 1)
            probe = f.read(BISECT_WINDOW)
            nl = probe.find(b"\n")
            if nl < 0:
                return None
            start = pos + nl
        while start < hi:
            f.seek(start)
            block = f.read(BISECT_WINDOW)
            end = block.find(b"\n")
            if end < 0:
                return None
            try:
                ev = json_decoder.decode(block[:end])
            except DECODE_ERRORS:
                ev = None
            if ev is not None and (self.run_id is None or ev.run_id == self.run_id):
                return start, ev.seq
            start += end + 1
        return None

    def offset_after(self, after_seq: int) -> int:
        """A line-start offset at or before the first line whose seq exceeds `after_seq`."""
        if after_seq <= 0:
            return 0
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        lo, hi = 0, size
        with open(self.path, "rb") as f:
            while hi - lo > BISECT_WINDOW:
                mid = (lo + hi) // 2
                found = self._line_after(f, mid, hi)
                if found is None:
                    hi = mid
                    continue
                start, seq = found
                if seq <= after_seq:
                    lo = start
                else:
                    hi = mid
        return lo

    def read_block(self, offset: int, max_bytes: int = CHUNK_BYTES) -> tuple[bytes, int]:
        """The complete lines from `offset` (a line start), about `max_bytes` of them (more if one line
        is longer), and the next offset. Nothing, and the next offset equal to `offset`, when no
        complete line lies beyond it yet (a writer is mid-line or the file ends there)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return b"", offset
        with f:
            f.seek(offset)
            size = max_bytes
            while True:
                buf = f.read(size)
                cut = buf.rfind(b"\n")
                if cut >= 0:
                    break
                if len(buf) < size:  # end of file inside a line being written: not ours yet
                    return b"", offset
                f.seek(offset)
                size *= 2  # one line longer than the chunk: read more
        return buf[: cut + 1], offset + cut + 1

    def read_at(self, offset: int, length: int) -> bytes:
        """The `length` bytes at `offset` (fewer if the file is shorter or gone)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return b""
        with f:
            f.seek(offset)
            return f.read(length)

    def decode(self, block: bytes, offset: int) -> list[Event]:
        """Every event of a block of complete lines read at `offset`; corrupt and foreign lines skipped
        and counted."""
        return _decode_block(self.path, self.run_id, block, offset)

    def read_chunk(self, offset: int, after_seq: int = 0, max_bytes: int = CHUNK_BYTES) -> tuple[list[Event], int]:
        """Events in complete lines from `offset` (a line start), with seq > after_seq; and the next
        offset (see read_block)."""
        block, nxt = self.read_block(offset, max_bytes)
        if not block:
            return [], nxt
        return newer_than(self.decode(block, offset), after_seq), nxt

    def head(self, n: int = 2) -> list[Event]:
        """The first `n` events of this run (queued, then usually the runner's start): the one way to
        read a journal's head. Corrupt and foreign lines are skipped and counted, as everywhere."""
        events, _ = self.read_chunk(0, 0, max_bytes=HEAD_BYTES)
        return events[:n]

    def iter_chunks(self, after_seq: int = 0, max_bytes: int = CHUNK_BYTES) -> Iterator[list[Event]]:
        """Every event with seq > after_seq present now, as lists of about `max_bytes` of lines."""
        offset = self.offset_after(after_seq)
        while True:
            events, nxt = self.read_chunk(offset, after_seq, max_bytes)
            if nxt == offset:
                return
            offset = nxt
            if events:
                yield events

    def read(self, after_seq: int = 0, limit: int | None = None) -> list[Event]:
        out: list[Event] = []
        for chunk in self.iter_chunks(after_seq):
            out.extend(chunk)
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    def last_event(self) -> Event | None:
        """The last decodable complete line, found by reading backwards from the end."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return None
        with f:
            end = f.seek(0, os.SEEK_END)
            tail = b""
            pos = end
            while pos > 0:
                step = min(BISECT_WINDOW, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                last_nl = tail.rfind(b"\n")
                if last_nl < 0:
                    continue
                lines = tail[: last_nl + 1].split(b"\n")
                # lines[0] may be partial unless pos == 0; the trailing element is empty
                candidates = lines[:-1] if pos == 0 else lines[1:-1]
                for line in reversed(candidates):
                    if not line.strip():
                        continue
                    try:
                        ev = json_decoder.decode(line)
                    except DECODE_ERRORS:
                        continue
                    if self.run_id is None or ev.run_id == self.run_id:
                        return ev
                    _report_corrupt(self.path, pos, f"run_id {ev.run_id!r} in the journal of {self.run_id!r}")
                if pos > 0:
                    # keep the (maybe partial) first line for the next, earlier read
                    tail = lines[0] + b"\n"
        return None


def read_events(journal_dir: Path, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[Event]:
    return JournalReader(journal_path(journal_dir, run_id), run_id).read(after_seq, limit)
