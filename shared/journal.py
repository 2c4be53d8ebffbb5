"""The run journal: `<home>/events/pipeline_<run_id>.jsonl`, one event per line, one writer at a time.

The writer assigns gapless seqs, writes each line with one `os.write` (flush per event: the line is in
the OS before anyone publishes it) or, in `fsync` mode, group-commits an fsync every few milliseconds.
On open it takes an exclusive `flock`, so two writers on one journal fail loudly instead of interleaving,
and it repairs a torn last line left by a crash. Readers use complete lines only, skip and count corrupt
lines, and find any seq by bisecting the file (seqs grow with the offset), so resuming a long run does
not re-read it from the start.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import anyio
import msgspec

from .errors import JournalBusy, JournalError, JournalFenced, RunEnded
from .events import (
    PIPELINE_STAGE,
    Event,
    event_to_json_line,
    is_terminal,
    is_valid_stage_name,
    json_decoder,
    now_timestamp,
)
from .ids import check_run_id
from .values import DECODE_ERRORS

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "pipeline_"
JOURNAL_SUFFIX = ".jsonl"
CHUNK_BYTES = 1 << 20
_BISECT_WINDOW = 64 * 1024

Durability = Literal["flush", "fsync"]


@dataclass
class JournalStats:
    """Process-wide counts of what readers and writers had to repair or skip (exported as metrics)."""

    torn_lines_repaired: int = 0
    corrupt_lines_skipped: int = 0
    _warned: set[tuple[str, int]] = field(default_factory=set)


stats = JournalStats()


def stats_fields() -> dict[str, int]:
    """This process's journal repair counts, as a heartbeat carries them."""
    return {"journal_torn_repaired": stats.torn_lines_repaired, "journal_corrupt_skipped": stats.corrupt_lines_skipped}


def journal_path(journal_dir: Path, run_id: str) -> Path:
    """The journal file of a run; the run id is checked, so no request can name another path."""
    return journal_dir / f"{JOURNAL_PREFIX}{check_run_id(run_id)}{JOURNAL_SUFFIX}"


def run_id_from_path(path: Path) -> str | None:
    name = path.name
    if not (name.startswith(JOURNAL_PREFIX) and name.endswith(JOURNAL_SUFFIX)):
        return None
    return name[len(JOURNAL_PREFIX) : -len(JOURNAL_SUFFIX)] or None


def list_run_ids(journal_dir: Path) -> list[str]:
    """Run ids of every journal in the directory, sorted (time-sortable ids sort oldest first)."""
    from .ids import is_valid_run_id

    ids = []
    try:
        entries = os.scandir(journal_dir)
    except FileNotFoundError:
        return []
    with entries:
        for entry in entries:
            rid = run_id_from_path(Path(entry.name))
            if rid is not None and is_valid_run_id(rid):
                ids.append(rid)
    ids.sort()
    return ids


def remove_older_journals(journal_dir: Path, prefix: str, keep: int) -> list[str]:
    """Delete the journals of runs whose id starts with `prefix`, all but the newest `keep` (ids sort by
    creation time). For runs that exist only to be looked at once, such as doctor's probes. Returns the
    run ids removed."""
    ids = [rid for rid in list_run_ids(journal_dir) if rid.startswith(prefix)]
    removed = ids[: max(0, len(ids) - keep)]
    for rid in removed:
        try:
            journal_path(journal_dir, rid).unlink()
        except FileNotFoundError:
            continue  # another process removed it first: the outcome is the same
    return removed


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory: so a new entry in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- reading


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
            probe = f.read(_BISECT_WINDOW)
            nl = probe.find(b"\n")
            if nl < 0:
                return None
            start = pos + nl
        while start < hi:
            f.seek(start)
            block = f.read(_BISECT_WINDOW)
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
            while hi - lo > _BISECT_WINDOW:
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

    def read_chunk(self, offset: int, after_seq: int = 0, max_bytes: int = CHUNK_BYTES) -> tuple[list[Event], int]:
        """Events in complete lines from `offset` (a line start), with seq > after_seq; and the next offset.

        The next offset equals `offset` when no complete line lies beyond it yet (a writer is mid-line
        or the file ends there).
        """
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return [], offset
        with f:
            f.seek(offset)
            size = max_bytes
            while True:
                buf = f.read(size)
                cut = buf.rfind(b"\n")
                if cut >= 0:
                    break
                if len(buf) < size:  # end of file inside a line being written: not ours yet
                    return [], offset
                f.seek(offset)
                size *= 2  # one line longer than the chunk: read more
        block = buf[: cut + 1]
        events = _decode_block(self.path, self.run_id, block, offset)
        if after_seq > 0 and events and events[0].seq <= after_seq:
            events = [e for e in events if e.seq > after_seq]
        return events, offset + cut + 1

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
                step = min(_BISECT_WINDOW, pos)
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


# --------------------------------------------------------------------------------------------- writing


class JournalWriter:
    """The single writer of one run's journal. Use `open_journal` or `JournalWriter.create`."""

    def __init__(
        self,
        path: Path,
        fd: int,
        run_id: str,
        tz: ZoneInfo,
        last_seq: int,
        ended: bool,
        durability: Durability = "flush",
        group_commit_ms: float = 5.0,
    ) -> None:
        self.path = path
        self.run_id = run_id
        self.tz = tz
        self.last_seq = last_seq
        self.ended = ended
        self.durability = durability
        self._fd: int | None = fd
        # the file this writer holds: when the path stops naming it (the scheduler fenced the run, see
        # shared/fence.py), every write after that is refused and nothing of it may be published
        st = os.fstat(fd)
        self._ident = (st.st_ino, st.st_dev)
        self._path_str = os.fspath(path)
        self.fenced = False
        self._group_commit = group_commit_ms / 1000.0
        self._synced_seq = last_seq
        self._sync_done: anyio.Event | None = None
        self._valid_stages: set[str] = set()  # names already checked (a run has few stages; append is hot)

    # -- lifecycle

    @classmethod
    def _open_fd(cls, path: Path, create: bool) -> int:
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError as e:
            raise JournalError(f"journal {path} already exists: a run id is used once") from e
        except OSError as e:
            raise JournalError(f"cannot open journal {path} for writing: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalBusy(f"journal {path} is held by another writer") from e
            raise JournalError(f"cannot lock journal {path}: {e.strerror}") from e
        return fd

    @classmethod
    def open(
        cls,
        journal_dir: Path,
        run_id: str,
        tz: ZoneInfo,
        durability: Durability = "flush",
        group_commit_ms: float = 5.0,
    ) -> JournalWriter:
        """Take over an existing journal: lock it, repair a torn last line, continue after the last seq."""
        path = journal_path(journal_dir, run_id)
        if not path.exists():
            raise JournalError(f"journal {path} does not exist: the run was never queued")
        fd = cls._open_fd(path, create=False)
        try:
            _repair_torn_tail(fd, path)
            last = JournalReader(path, run_id).last_event()
        except BaseException:
            os.close(fd)
            raise
        last_seq = last.seq if last else 0
        ended = bool(last and last.is_terminal)
        return cls(path, fd, run_id, tz, last_seq, ended, durability, group_commit_ms)

    @classmethod
    def create(
        cls,
        journal_dir: Path,
        run_id: str,
        tz: ZoneInfo,
        durability: Durability = "flush",
        group_commit_ms: float = 5.0,
    ) -> JournalWriter:
        """Start a new journal; refuses a run id whose journal exists."""
        journal_dir.mkdir(parents=True, exist_ok=True)
        path = journal_path(journal_dir, run_id)
        fd = cls._open_fd(path, create=True)
        return cls(path, fd, run_id, tz, 0, False, durability, group_commit_ms)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- appending

    def append(self, stage: str, event: str, msg: str = "", data: dict[str, Any] | None = None) -> Event:
        """Write the next event (seq = last + 1) in one write; return it. Raises RunEnded after a terminal."""
        if self._fd is None:
            raise JournalError(f"journal {self.path} is closed")
        if stage not in self._valid_stages:
            if not is_valid_stage_name(stage):
                raise JournalError(f"invalid stage name {stage!r} for run {self.run_id}: no '/', 1-128 chars")
            if len(self._valid_stages) < 1024:
                self._valid_stages.add(stage)
        if self.ended:
            raise RunEnded(f"run {self.run_id} has ended; {stage}/{event} not appended to {self.path}")
        if self.fenced:
            raise JournalFenced(f"run {self.run_id}: {stage}/{event} not written: this writer was fenced off {self.path}")
        ev = Event(
            run_id=self.run_id,
            seq=self.last_seq + 1,
            timestamp=now_timestamp(self.tz),
            stage=stage,
            event=event,  # type: ignore[arg-type]
            msg=msg,
            data=data,
        )
        try:
            line = event_to_json_line(ev)
        except (TypeError, msgspec.EncodeError) as e:
            raise JournalError(f"event {stage}/{event} of run {self.run_id} cannot be encoded: {e}") from e
        self._write_line(line)
        # Checked after the write and before anyone publishes the event: a fence renames the path to
        # a new file first and copies this one after, so an event that passes here is in that copy,
        # and one written after the fence is refused here and never published.
        if not self.owns_path():
            self.fenced = True
            raise JournalFenced(
                f"run {self.run_id}: {self.path} no longer names the file this writer holds: the run was "
                f"ended in its place (fenced); {stage}/{event} seq {ev.seq} is not part of the journal"
            )
        self.last_seq = ev.seq
        if is_terminal(stage, event):
            self.ended = True
        return ev

    def owns_path(self) -> bool:
        """Does the journal's path still name the file this writer holds? (One stat, ~1 us.)"""
        try:
            st = os.stat(self._path_str)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_dev) == self._ident

    def _write_line(self, line: bytes) -> None:
        assert self._fd is not None
        written = 0
        try:
            written = os.write(self._fd, line)  # the whole line, nearly always: no loop, no view
            if written == len(line):
                return
            view = memoryview(line)
            while written < len(line):
                written += os.write(self._fd, view[written:])
        except OSError as e:
            if written:
                # never leave half a line behind: cut it off again
                size = os.fstat(self._fd).st_size
                os.ftruncate(self._fd, size - written)
            raise JournalError(f"cannot append to journal {self.path}: {e.strerror}") from e

    def sync(self) -> None:
        """fsync now (blocking)."""
        if self._fd is not None:
            os.fsync(self._fd)
            self._synced_seq = self.last_seq

    async def wait_durable(self, seq: int) -> None:
        """Return once event `seq` is as durable as the setting asks: at once for `flush`; after a
        group-commit fsync (shared by every append in the same few milliseconds) for `fsync`."""
        if self.durability == "flush":
            return
        while self._synced_seq < seq:
            if self._sync_done is None:
                done = self._sync_done = anyio.Event()
                try:
                    await anyio.sleep(self._group_commit)
                    target = self.last_seq
                    fd = self._fd
                    if fd is None:
                        raise JournalError(f"journal {self.path} closed before its fsync")
                    await anyio.to_thread.run_sync(os.fsync, fd)
                    self._synced_seq = max(self._synced_seq, target)
                finally:
                    self._sync_done = None
                    done.set()
            else:
                await self._sync_done.wait()


def _repair_torn_tail(fd: int, path: Path) -> None:
    """Cut a last line without its newline (a crash mid-write) and say so."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        keep = 0
        while pos > 0:
            step = min(_BISECT_WINDOW, pos)
            pos -= step
            f.seek(pos)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
    os.ftruncate(fd, keep)
    stats.torn_lines_repaired += 1
    log.warning(
        "journal %s: repaired a torn last line (dropped %d bytes after byte %d, left by a crash)",
        path, size - keep, keep,
    )


def begin_run(
    journal_dir: Path,
    run_id: str,
    tz: ZoneInfo,
    pipeline: str,
    params: dict[str, Any],
    trigger: dict[str, Any],
    msg: str = "",
) -> Event:
    """Durably queue a run: create its journal with the `queued` event, fsync file and directory.

    This is the one way a run comes to exist; whoever calls it hands the journal over afterwards
    (with the dispatch command) to the runner, which continues it as its only writer.
    """
    writer = JournalWriter.create(journal_dir, run_id, tz)
    try:
        ev = writer.append(
            PIPELINE_STAGE,
            "queued",
            msg or f"{pipeline} queued ({trigger.get('trigger', 'manual')})",
            {"pipeline": pipeline, "params": params, **trigger},
        )
        writer.sync()
    finally:
        writer.close()
    fsync_path(journal_dir)
    return ev
