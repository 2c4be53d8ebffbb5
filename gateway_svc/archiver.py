"""The gateway's archiver: it sees every run end (the hub follows all runs) and writes each ended run
to the Parquet archive (`runwire_history.archive`) in a worker process (anyio.to_process), off the
event loop and off its interpreter: building a run's rows is Python work, about 1.3 us per event, that
in a thread would hold the GIL against every client's delivery and catch-up for as long (a 100,000-event
run: ~0.15 s; a client resuming just as a run ended caught up ~2x slower). At start it syncs the
archive with the journals (runs that ended while no gateway ran). A failed write is logged as an error
and retried with backoff; it never delays a run or the event stream. What the worker logs is said by
the gateway, under the worker's logger names, when the call returns, and so is what it writes to its
stderr (anyio leaves that on a pipe nobody reads: the worker points it at a file of its own). The
worker is killed if the gateway stops mid-write, and leaves when the gateway dies (the archive is made
for both: atomic files, a ledger, a sync at start).

In cluster mode (`from_stream`) a gateway host has no journals: each gateway keeps its own archive,
made from the event stream: every run's events are read from it at the run's end, and at start every
ended run of the index (loaded from the stream) not archived yet is. Gateways' archives are copies
made from the same stream, not replicas of each other; a run aged out of the stream before a gateway
first saw it is not in that gateway's archive."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.to_process
import msgspec

from runwire_history.archive import Archive, archivable, archive_dir_of
from runwire_history.schema import NotArchivable
from shared.config import Settings
from shared.events import Event

log = logging.getLogger(__name__)

RETRY_FIRST = 1.0
RETRY_MAX = 60.0

# ---------------------------------------------------------------------------- in the worker process

LogLine = tuple[int, str, str]  # (level, logger name, message with its traceback)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.name, self.format(record)))


STDERR_SAID = 16 * 1024  # of what the worker wrote to its stderr during a call, the first bytes said

_stderr_fd: int | None = None


def _own_stderr() -> int:
    """Point the worker's fd 2 (and sys.stderr, which anyio sets to /dev/null) at a file of its own,
    once. anyio starts the worker with its stderr on a pipe that nobody reads: what a C library (Arrow,
    Polars) or a Python warning wrote there was lost, and once the pipe and the gateway's unread buffer
    of it were full, the next write blocked the worker, and the archive, for good (2 MB did:
    tests/test_archiver_worker.py)."""
    global _stderr_fd
    if _stderr_fd is None:
        fd, path = tempfile.mkstemp(prefix="runwire-archive-worker-stderr-")
        os.unlink(path)
        os.dup2(fd, 2)
        _stderr_fd = fd
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
        logging.captureWarnings(True)
    return _stderr_fd


def _take_stderr(fd: int) -> LogLine | None:
    """What was written to the worker's stderr since the last call, as one log line; then empty it."""
    sys.stderr.flush()
    size = os.fstat(fd).st_size
    if not size:
        return None
    said = os.pread(fd, STDERR_SAID, 0).decode(errors="backslashreplace").rstrip()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)  # fd 2 shares this offset
    more = f" (the first {STDERR_SAID:,} bytes)" if size > STDERR_SAID else ""
    return (logging.WARNING, __name__, f"the archive worker wrote {size:,} bytes to its stderr{more}:\n{said}")


def _logged(level: str, fn: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None, list[LogLine]]:
    """Run `fn` in the worker, keeping what it logs, and what it writes to its stderr, to be said by the
    gateway."""
    fd = _own_stderr()
    handler = _Lines()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    try:
        result: tuple[Any, Exception | None] = (fn(*args), None)
    except Exception as e:  # handed back whole: raised again in the gateway, after the lines
        result = (None, e)
    err = _take_stderr(fd)
    if err is not None:
        handler.lines.append(err)
    return result[0], result[1], handler.lines


def _archive_packed(archive: Archive, run_id: str, packed: bytes) -> bool:
    return archive.archive_run(run_id, msgspec.msgpack.decode(packed, type=list[Event]))


# ---------------------------------------------------------------------------- in the gateway


class Archiver:
    def __init__(self, settings: Settings) -> None:
        cluster = settings.config.cluster is not None
        self.archive = Archive(archive_dir_of(settings.home), None if cluster else settings.journal_dir)
        self.log_level = settings.config.log_level
        self._read: Callable[[str], Awaitable[Sequence[Event]]] | None = None  # cluster mode: a run's events
        self._ended: Callable[[], Iterable[str]] = lambda: ()  # cluster mode: the ended runs known at start
        self.pending: dict[str, None] = {}  # run ids ended, not yet archived (insertion order)
        self._wake = asyncio.Event()
        self.archived = 0
        self.failures = 0
        self.synced = False

    def from_stream(self, read: Callable[[str], Awaitable[Sequence[Event]]], ended: Callable[[], Iterable[str]]) -> None:
        """Cluster mode: runs' events come from `read` (the event stream); `ended` lists the runs to
        archive at start."""
        self._read = read
        self._ended = ended

    def run_ended(self, run_id: str) -> None:
        """Called by the hub for each terminal event it delivers (never blocks)."""
        if archivable(run_id):
            self.pending[run_id] = None
            self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._retrying("sync the archive with the journals", self._sync)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                run_id = next(iter(self.pending))
                await self._retrying(f"archive run {run_id}", self._archive_one, run_id)
                self.pending.pop(run_id, None)

    async def _sync(self) -> None:
        rep = await self._in_worker(self.archive.sync)
        self.archived += len(rep.archived)
        log.info("archive %s: %s", self.archive.dir, rep.summary())
        if self._read is not None:
            have = await anyio.to_thread.run_sync(self.archive.archived)
            todo = [r for r in self._ended() if archivable(r) and r not in have]
            for run_id in todo:
                await self._retrying(f"archive run {run_id} from the event stream", self._archive_one, run_id)
            log.info("archive %s: %d ended run(s) of the event stream archived, %d there already",
                     self.archive.dir, len(todo), len(have))
        self.synced = True

    async def _archive_one(self, run_id: str) -> None:
        try:
            if self._read is not None:
                packed = msgspec.msgpack.encode(await self._read(run_id))  # one bytes to pickle, not 1e5 structs
                done = await self._in_worker(_archive_packed, self.archive, run_id, packed)
            else:
                done = await self._in_worker(self.archive.archive_run, run_id)
            if done:
                self.archived += 1
        except (NotArchivable, FileNotFoundError) as e:
            # nothing to retry: a journal removed by hand, or a run someone else's end event named
            log.error("run %s cannot be archived: %s", run_id, e)

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the worker process; its log lines said here, in order, then its result or its
        error. Cancelled (the gateway stopping): the worker is killed."""
        result, error, lines = await anyio.to_process.run_sync(_logged, self.log_level, fn, *args, cancellable=True)
        for level, name, text in lines:
            logging.getLogger(name).log(level, "%s", text)
        if error is not None:
            raise error
        return result

    async def _retrying(self, what: str, step, *args: str) -> None:  # type: ignore[no-untyped-def]
        delay = RETRY_FIRST
        while True:
            try:
                await step(*args)
                return
            except Exception as e:  # any failure of a write: loud, retried, never dropped
                self.failures += 1
                log.error("archive %s: cannot %s: %s (retrying in %.0f s)", self.archive.dir, what, e, delay,
                          exc_info=self.failures == 1)
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
