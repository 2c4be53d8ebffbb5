"""Writing a journal: the single writer of a run (exclusive flock), gapless seqs, one write per batch of lines,
group-commit fsync when asked; a torn last line left by a crash is repaired on open; `begin_run` is
the one way a run comes to exist."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import msgspec

from ..errors import JournalBusy, JournalError, JournalFenced, RunEnded
from ..events import (
    PIPELINE_STAGE,
    TERMINAL_KINDS,
    Event,
    EventDraft,
    is_valid_stage_name,
    json_decoder,
    json_encoder,
    now_timestamp,
)
from .files import BISECT_WINDOW, Durability, fsync_path, journal_path, log, stats
from .reader import JournalReader


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
        return self.append_many(((stage, event, msg, data),))[0]

    def append_many(self, drafts: Sequence[EventDraft]) -> list[Event]:
        """Write the next events, (stage, event, msg, data) each, with gapless seqs in ONE write; return them.

        They share one timestamp (they reach the journal at one instant; formatting it once is part of
        what makes a batch cheap). All or nothing: a draft that is refused (a bad stage name, an event
        after the run's terminal one, data that cannot be encoded) writes none of the batch, and a batch
        that fails the fence check after its write is not part of the journal: none of it may be
        published. A reader sees the batch's lines appear together (one write), never a torn line."""
        if self._fd is None:
            raise JournalError(f"journal {self.path} is closed")
        if not drafts:
            return []
        if self.ended:
            stage, event = drafts[0][0], drafts[0][1]
            raise RunEnded(f"run {self.run_id} has ended; {stage}/{event} not appended to {self.path}")
        if self.fenced:
            stage, event = drafts[0][0], drafts[0][1]
            raise JournalFenced(f"run {self.run_id}: {stage}/{event} not written: this writer was fenced off {self.path}")
        run_id = self.run_id
        timestamp = now_timestamp(self.tz)
        valid = self._valid_stages
        seq = self.last_seq
        ended = False
        events: list[Event] = []
        for stage, event, msg, data in drafts:
            if stage not in valid:
                self._check_stage(stage)
            if ended:
                raise RunEnded(
                    f"run {run_id}: {stage}/{event} follows the terminal event in one batch; "
                    f"none of the batch appended to {self.path}"
                )
            seq += 1
            events.append(Event(run_id, seq, timestamp, stage, event, msg, data))  # type: ignore[arg-type]
            if stage == PIPELINE_STAGE and event in TERMINAL_KINDS:
                ended = True
        try:
            lines = _encode_lines(events)
        except (TypeError, msgspec.EncodeError) as e:
            bad = _first_unencodable(events)
            raise JournalError(
                f"event {bad.stage}/{bad.event} of run {run_id} cannot be encoded: {e}"
                + (f"; none of its batch of {len(events)} appended" if len(events) > 1 else "")
            ) from e
        self._write(lines)
        # Checked after the write and before anyone publishes the events: a fence renames the path to
        # a new file first and copies this one after, so a batch that passes here is in that copy,
        # and one written after the fence is refused here and never published. Once per batch: the
        # batch is one write, so it is in the copy whole or not at all.
        if not self.owns_path():
            self.fenced = True
            first, last = events[0], events[-1]
            what = f"{first.stage}/{first.event} seq {first.seq}" + (f"..{last.seq}" if len(events) > 1 else "")
            raise JournalFenced(
                f"run {run_id}: {self.path} no longer names the file this writer holds: the run was "
                f"ended in its place (fenced); {what} is not part of the journal"
            )
        self.last_seq = seq
        self.ended = ended
        return events

    def append_copied(self, events: Sequence[Event]) -> None:
        """Write events another writer journaled elsewhere (cluster mode: the scheduler's `queued`, read
        from the event stream) as they are: seqs and timestamps unchanged, one write. They must be this
        run's and continue this journal (seq last + 1, consecutive); nothing after a terminal one."""
        if self._fd is None:
            raise JournalError(f"journal {self.path} is closed")
        if not events:
            return
        seq, ended = self.last_seq, self.ended
        for ev in events:
            if ev.run_id != self.run_id or ev.seq != seq + 1 or ended:
                raise JournalError(f"journal {self.path}: copied event {ev.run_id} seq {ev.seq} does not continue "
                                   f"run {self.run_id} at seq {seq}{' (after its terminal event)' if ended else ''}; "
                                   "none of them written")
            if not is_valid_stage_name(ev.stage):
                raise JournalError(f"journal {self.path}: copied event seq {ev.seq} has an invalid stage name {ev.stage!r}")
            seq, ended = ev.seq, ev.is_terminal
        self._write(_encode_lines(list(events)))
        if not self.owns_path():
            self.fenced = True
            raise JournalFenced(f"run {self.run_id}: {self.path} no longer names the file this writer holds (fenced)")
        self.last_seq, self.ended = seq, ended

    def discard_after(self, seq: int) -> int:
        """Cut the journal back to event `seq`: cluster mode, where lines this writer journaled were
        refused by the event stream (another writer had taken the run, fenced) and must not stay as
        the run's. Returns the bytes cut."""
        if self._fd is None:
            raise JournalError(f"journal {self.path} is closed")
        if seq >= self.last_seq:
            return 0
        pos = JournalReader(self.path, self.run_id).offset_after(seq)
        with open(self.path, "rb") as f:
            f.seek(pos)
            for line in f:
                try:
                    line_seq = json_decoder.decode(line).seq
                except msgspec.DecodeError as e:
                    raise JournalError(f"journal {self.path}: a bad line at byte {pos} while cutting back to seq {seq}: {e}") from e
                if line_seq > seq:
                    break
                pos += len(line)
        size = os.fstat(self._fd).st_size
        os.ftruncate(self._fd, pos)
        self.last_seq = self._synced_seq = seq
        self.ended = False
        log.warning("journal %s: cut back to seq %d (%d bytes): not acknowledged by the event stream", self.path, seq, size - pos)
        return size - pos

    def _check_stage(self, stage: str) -> None:
        if not is_valid_stage_name(stage):
            raise JournalError(f"invalid stage name {stage!r} for run {self.run_id}: no '/', 1-128 chars")
        if len(self._valid_stages) < 1024:
            self._valid_stages.add(stage)

    def owns_path(self) -> bool:
        """Does the journal's path still name the file this writer holds? (One stat, ~1 us.)"""
        try:
            st = os.stat(self._path_str)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_dev) == self._ident

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        written = 0
        try:
            written = os.write(self._fd, line)  # the whole batch, nearly always: no loop, no view
            if written == len(line):
                return
            view = memoryview(line)
            while written < len(line):
                written += os.write(self._fd, view[written:])
        except OSError as e:
            if written:
                # never leave part of a batch behind: cut it off again
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


_encode_lines = json_encoder.encode_lines  # newline-delimited JSON: the journal's lines, each ending in \n


def _first_unencodable(events: list[Event]) -> Event:
    for ev in events:
        try:
            json_encoder.encode(ev)
        except (TypeError, msgspec.EncodeError):
            return ev
    return events[0]


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
            step = min(BISECT_WINDOW, pos)
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
