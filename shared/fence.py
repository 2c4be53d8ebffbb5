"""Fencing a journal's writer off: how the scheduler ends a run whose runner it declared lost while that
runner's process still holds the journal's flock (stopped, hung, partitioned: flock cannot tell).

A lock held by a stopped process cannot be taken, so the fence is at the file, not the lock:

1. copy the journal's complete lines to a new file and lock it;
2. hard-link the journal to `.fenced-<run_id>.jsonl` (the old file stays reachable), then rename the
   copy over the journal's path. From here the old writer's check after each write (the path must still
   name its file: `JournalWriter.owns_path`) fails, so it publishes nothing more and stops;
3. copy what the old writer wrote between step 1 and step 2 (every line it published is among them:
   it checked after writing and before the rename) and hand the new file to the caller, who writes the
   run's end; then fsync, and remove the old file (what it holds beyond the copy was never published).

The path always names a journal; readers see the same bytes at the same offsets, in a new inode. One
fence at a time per directory (`.fence.lock`), so `restore_fences` at start can finish or undo what a
process that died mid-fence left: the old file takes its path back unless the new one has its end.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from zoneinfo import ZoneInfo

from .errors import JournalError
from .ids import is_valid_run_id
from .journal import JOURNAL_SUFFIX, JournalReader, JournalWriter, fsync_path, journal_path

log = logging.getLogger(__name__)

FENCE_LOCK = ".fence.lock"
_FENCED = ".fenced-"  # the old file, kept reachable during a fence
_COPY = ".fencing-"  # the new file before it takes the journal's path


def _name(prefix: str, run_id: str) -> str:
    return f"{prefix}{run_id}{JOURNAL_SUFFIX}"


@contextmanager
def _fence_lock(journal_dir: Path) -> Iterator[None]:
    fd = os.open(journal_dir / FENCE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking, briefly: a fence holds it for a few file operations
        yield
    finally:
        os.close(fd)


def _complete_lines(path: Path, start: int) -> bytes:
    """The bytes of `path` from `start` through its last newline (a line being written is not ours)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    return data[: data.rfind(b"\n") + 1]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)


@contextmanager
def fenced_writer(journal_dir: Path, run_id: str, tz: ZoneInfo) -> Iterator[JournalWriter]:
    """Fence off whoever holds the run's journal and yield a writer of the journal's new file (its
    last seq and `ended` read from it). On a normal exit the writes are fsynced and the old file is
    removed; if the caller raises, the old file takes its path back (nothing is lost either way)."""
    path = journal_path(journal_dir, run_id)
    old = journal_dir / _name(_FENCED, run_id)
    copy = journal_dir / _name(_COPY, run_id)
    with _fence_lock(journal_dir):
        _restore_one(journal_dir, run_id)  # what a fencer that died here left
        try:
            head = _complete_lines(path, 0)
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise JournalError(f"cannot fence journal {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, head)
            os.link(path, old)
            try:
                os.replace(copy, path)
            except BaseException:
                old.unlink()
                raise
        except BaseException as e:
            os.close(fd)
            copy.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise JournalError(f"cannot fence journal {path}: {e}") from e
            raise
        writer: JournalWriter | None = None
        try:
            delta = _complete_lines(old, len(head))
            _write_all(fd, delta)
            last = JournalReader(path, run_id).last_event()
            writer = JournalWriter(path, fd, run_id, tz, last.seq if last else 0, bool(last and last.is_terminal))
            yield writer
            writer.sync()
            fsync_path(journal_dir)
            dropped = os.stat(old).st_size - len(head) - len(delta)
            old.unlink()
            log.warning("journal %s fenced: its writer still held the lock; the journal is now a copy of its %d "
                        "bytes (%d written during the fence)%s", path, len(head) + len(delta), len(delta),
                        f"; {dropped} bytes the fenced writer wrote after that were dropped (never published)"
                        if dropped else "")
        except BaseException:
            os.replace(old, path)  # the old file has every line: the journal is as it was before
            log.error("journal %s: fence undone (the old file is the journal again)", path)
            raise
        finally:
            if writer is not None:
                writer.close()
            else:
                os.close(fd)


def _last_is_terminal(path: Path, run_id: str) -> bool:
    last = JournalReader(path, run_id).last_event()
    return bool(last and last.is_terminal)


def _restore_one(journal_dir: Path, run_id: str) -> None:
    path = journal_path(journal_dir, run_id)
    old = journal_dir / _name(_FENCED, run_id)
    copy = journal_dir / _name(_COPY, run_id)
    if copy.exists():
        copy.unlink()  # never took the journal's path: the journal is untouched
        log.warning("journal %s: removed %s, left by a fence that did not finish", path, copy.name)
    if not os.path.lexists(old):
        return
    if not path.exists():
        os.rename(old, path)
        log.warning("journal %s: put back from %s (a fence did not finish)", path, old.name)
    elif _same_file(old, path) or _last_is_terminal(path, run_id):
        old.unlink()  # the fence never replaced the journal, or it finished but for this removal
        log.warning("journal %s: removed %s, left by a fence", path, old.name)
    else:
        os.replace(old, path)
        log.warning("journal %s: a fence did not write the run's end; the fenced file is the journal again", path)


def restore_fences(journal_dir: Path) -> list[str]:
    """At a service's start: finish or undo the fences a process died in the middle of; returns the run
    ids whose journals were touched."""
    try:
        names = os.listdir(journal_dir)
    except FileNotFoundError:
        return []
    run_ids = sorted({
        name[len(prefix): -len(JOURNAL_SUFFIX)]
        for name in names for prefix in (_FENCED, _COPY)
        if name.startswith(prefix) and name.endswith(JOURNAL_SUFFIX)
    })
    run_ids = [rid for rid in run_ids if is_valid_run_id(rid)]
    if not run_ids:
        return []
    with _fence_lock(journal_dir):
        for run_id in run_ids:
            _restore_one(journal_dir, run_id)
    return run_ids
