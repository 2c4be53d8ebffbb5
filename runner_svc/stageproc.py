"""One stage process from spawn to end: its own process group, output read line by line, stage
messages read from a socket pair (both handed on in batches: all that one wake-up found), timeout and
success-marker handling, and a group that is always ended (TERM, grace, KILL) before this returns,
whether the stage exited, timed out or was cancelled."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream

from shared.stage import STAGE_FD_ENV, StageMessage, stage_message_decoder
from shared.values import DECODE_ERRORS

from .procs import end_group
from .readable import Readable

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024  # a longer "line" is cut into pieces of this size
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a longer ctx message (no newline in sight) is skipped with a note
DRAIN_TIMEOUT = 5.0  # seconds to read what is left in the pipes after the process group ended
# (time spent in the handlers does not count: a journal or event stream that holds a batch up, e.g.
# JetStream without quorum in cluster mode, must not cut the stage's last output off)

RECV_BYTES = 64 * 1024
MAX_BATCH_BYTES = 1024 * 1024  # read per wake-up at most, so one batch never holds up the loop for long

LinesHandler = Callable[[str, list[str]], Awaitable[None]]  # (stream, the lines of one read)
MessagesHandler = Callable[[Sequence[StageMessage]], Awaitable[None]]  # the messages of one wake-up, in order
NoteHandler = Callable[[str], Awaitable[None]]


class _DrainDeadline:
    """The readers' deadline once the stage has ended, paused while a handler is busy."""

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        self.busy = 0
        self._left = DRAIN_TIMEOUT

    def start(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self._left = DRAIN_TIMEOUT
        scope.deadline = float("inf") if self.busy else anyio.current_time() + DRAIN_TIMEOUT

    def _enter(self) -> None:
        self.busy += 1
        scope = self.scope
        if self.busy == 1 and scope is not None:
            self._left = max(scope.deadline - anyio.current_time(), 0.0)
            scope.deadline = float("inf")

    def _leave(self) -> None:
        self.busy -= 1
        if self.busy == 0 and self.scope is not None:
            self.scope.deadline = anyio.current_time() + self._left

    def paused(self, handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def call(*args: object) -> None:
            self._enter()
            try:
                await handler(*args)
            finally:
                self._leave()
        return call


@dataclass
class ProcessResult:
    returncode: int | None
    timed_out: bool = False
    ended_by_marker: bool = False
    marker_seen: bool = False
    leftovers_ended: bool = False  # processes still in the group after the stage process exited
    last_stderr: str = ""

    @property
    def ok(self) -> bool:
        if self.timed_out:
            return False
        return self.ended_by_marker or self.returncode == 0

    def describe(self, timeout: float) -> str:
        if self.timed_out:
            return f"timed out after {timeout:g}s: process group ended"
        if self.ended_by_marker:
            return "printed its success marker but did not exit: process group ended"
        rc = self.returncode
        if rc is None:
            return "did not exit"
        if rc == 0:
            return "exited with status 0"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            why = f"killed by {name}"
        else:
            why = f"exited with status {rc}"
        if self.last_stderr:
            why += f" (last stderr line: {self.last_stderr[:300]})"
        return why


def _refuse_nul(argv: list[str], env: dict[str, str]) -> None:
    """A NUL cannot be passed to a process: asyncio's loop refuses it (ValueError), uvloop's cuts the
    string there without a word. Refused here, the same on either loop."""
    for arg in argv:
        if "\x00" in arg:
            raise ValueError(f"embedded null byte in the stage's command argument {arg!r}")
    for key, value in env.items():
        if "\x00" in key or "\x00" in value:
            raise ValueError(f"embedded null byte in the stage's environment variable {key!r}")


async def run_process(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    kill_grace: float,
    success_marker: str | None,
    marker_grace: float,
    on_lines: LinesHandler,
    on_messages: MessagesHandler,
    on_note: NoteHandler,
    what: str,
    on_spawn: Callable[[int], None] = lambda pid: None,
) -> ProcessResult:
    """Run argv in a new session; feed output lines and stage messages to the handlers, in batches
    (what one read brought); return how it ended. Cancellation ends the process group (shielded) and propagates."""
    _refuse_nul(argv, env)
    drain = _DrainDeadline()
    on_lines, on_messages, on_note = drain.paused(on_lines), drain.paused(on_messages), drain.paused(on_note)
    parent_sock, child_sock = socket.socketpair()
    parent_sock.setblocking(False)
    env = {**env, STAGE_FD_ENV: str(child_sock.fileno())}
    try:
        proc = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(cwd),
            env=env,
            start_new_session=True,  # its own process group: ending the group ends its children too
            pass_fds=(child_sock.fileno(),),
        )
    except BaseException:
        parent_sock.close()
        child_sock.close()
        raise
    child_sock.close()  # the child holds its copy; our end sees EOF when every holder has exited
    pgid = proc.pid
    on_spawn(pgid)
    result = ProcessResult(returncode=None)
    marker_seen = anyio.Event()

    async def read_lines(stream: ByteReceiveStream | None, name: str) -> None:
        if stream is None:
            return
        buf = b""
        async for chunk in stream:
            buf += chunk
            if b"\n" not in chunk and len(buf) < MAX_LINE_BYTES:
                continue
            *raws, buf = buf.split(b"\n")
            while len(buf) >= MAX_LINE_BYTES:
                raws.append(buf[:MAX_LINE_BYTES])
                buf = buf[MAX_LINE_BYTES:]
            await handle_lines(name, raws)  # the lines of one read: one batch
        if buf:
            await handle_lines(name, [buf])

    async def handle_lines(name: str, raws: list[bytes]) -> None:
        lines = [raw.rstrip(b"\r").decode("utf-8", errors="replace") for raw in raws]
        if name == "stderr":
            for line in reversed(lines):
                if line.strip():
                    result.last_stderr = line.strip()
                    break
        if success_marker and not result.marker_seen and any(success_marker in line for line in lines):
            result.marker_seen = True
            marker_seen.set()
        await on_lines(name, lines)

    def receive_waiting() -> tuple[bytes, bool]:
        """Everything waiting on the socket (up to MAX_BATCH_BYTES), and whether the stage closed it."""
        chunks: list[bytes] = []
        size = 0
        while size < MAX_BATCH_BYTES:
            try:
                chunk = parent_sock.recv(RECV_BYTES)
            except BlockingIOError:
                break
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
            if len(chunk) < RECV_BYTES:
                break  # drained, most likely: a recv to hear EAGAIN costs a syscall per wake-up, and
                # anything more keeps the (watched) socket readable, so it is read at the next wake-up
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), False

    async def read_messages() -> None:
        buf = b""
        dropping = 0  # bytes of an over-long message being skipped up to its newline
        eof = False
        async with Readable(parent_sock.fileno()) as readable:
            while not eof:
                await readable.wait()
                # all that is waiting, not one recv's worth: a burst becomes one batch, so one journal
                # write and one round of sends instead of one each per message
                chunk, eof = receive_waiting()
                if not chunk:
                    continue
                if dropping:
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        dropping += len(chunk)
                        continue
                    await on_note(f"stage message of over {MAX_MESSAGE_BYTES} bytes ignored ({dropping + nl} bytes)")
                    dropping, chunk = 0, chunk[nl + 1:]
                nl = chunk.rfind(b"\n")  # in the new bytes only: a long message is not scanned again and again
                if nl < 0:
                    buf += chunk
                    if len(buf) > MAX_MESSAGE_BYTES:  # a message without end in sight: never buffer it whole
                        dropping, buf = len(buf), b""
                    continue
                complete, buf = buf + chunk[: nl + 1], chunk[nl + 1:]
                if len(buf) > MAX_MESSAGE_BYTES:
                    dropping, buf = len(buf), b""
                await handle_messages(complete)
        if dropping or buf.strip():
            await on_note(f"stage message cut off by the stage's exit ignored ({dropping + len(buf)} bytes)")

    async def handle_messages(complete: bytes) -> None:
        """The messages of `complete` (whole lines) as batches; a bad or over-long line becomes a note
        in its place, so the run's events keep the stage's order."""
        if len(complete) <= MAX_MESSAGE_BYTES:
            try:
                batch = stage_message_decoder.decode_lines(complete)  # the common case: all good, one call
            except DECODE_ERRORS:
                pass  # some line is bad: find it, line by line
            else:
                if batch:
                    await on_messages(batch)
                return
        batch = []
        for raw in complete.split(b"\n"):
            if not raw or raw.isspace():
                continue
            if len(raw) > MAX_MESSAGE_BYTES:
                note = f"stage message of over {MAX_MESSAGE_BYTES} bytes ignored ({len(raw)} bytes)"
            else:
                try:
                    batch.append(stage_message_decoder.decode(raw))
                    continue
                except DECODE_ERRORS as e:
                    note = f"bad stage message ({len(raw)} bytes) ignored: {e}"
            if batch:
                await on_messages(batch)
                batch = []
            await on_note(note)
        if batch:
            await on_messages(batch)

    async def wait_exit() -> None:
        async with anyio.create_task_group() as watchers:
            async def watch_marker() -> None:
                await marker_seen.wait()
                with anyio.move_on_after(marker_grace):
                    await proc.wait()
                    return
                result.ended_by_marker = True
                await on_note(
                    f"printed success marker {success_marker!r} but still running after {marker_grace:g}s: "
                    "ending its process group; its exit status is not held against it"
                )
                await end_group(pgid, kill_grace, what)

            if success_marker:
                watchers.start_soon(watch_marker)
            await proc.wait()
            watchers.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as readers:
            readers.start_soon(read_lines, proc.stdout, "stdout")
            readers.start_soon(read_lines, proc.stderr, "stderr")
            readers.start_soon(read_messages)
            with anyio.move_on_after(timeout) as deadline:
                await wait_exit()
            if deadline.cancelled_caught:
                result.timed_out = True
                await on_note(f"timed out after {timeout:g}s: ending its process group (TERM, then KILL after {kill_grace:g}s)")
                await end_group(pgid, kill_grace, what)
                await proc.wait()
            elif not result.ended_by_marker:
                # the stage is over: whatever it left running in its group goes too (and would hold the pipes)
                if await end_group(pgid, kill_grace, what):
                    result.leftovers_ended = True
                    await on_note("the stage process exited but left processes in its group: they were ended")
            result.returncode = proc.returncode
            # the readers end at EOF; a process outside the group holding a pipe must not hang the stage
            drain.start(readers.cancel_scope)
        if readers.cancel_scope.cancelled_caught:
            await on_note(f"output still open {DRAIN_TIMEOUT:g}s after the stage ended "
                          "(held by a process outside its group): stopped reading")
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None or result.returncode is None:
                await end_group(pgid, kill_grace, what)
            await proc.aclose()
            parent_sock.close()
    return result
