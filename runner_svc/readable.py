"""A descriptor watched by the event loop across waits, for a reader woken once per message or burst.

anyio.wait_readable adds the descriptor to the loop before each wait and removes it after; on uvloop
that is a poll handle made and closed per wake-up. At 1k stage messages/s, one wake-up each, that cost
~85 us of the runner's loop thread per wake-up, against ~33 us watched across waits (measured on this
host, a socket pair fed 1 message/ms from a thread, uvloop, thread CPU per wake-up).

A level-triggered descriptor that stays readable while its reader is busy elsewhere would wake the
loop on every turn: so when it fires with no one waiting, it is no longer watched until the next wait.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import anyio


class Readable:
    """`async with Readable(fd) as r: ... await r.wait() ...`: one reader task at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False
        self._waiter: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Readable:
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._watching and self._loop is not None:
            self._loop.remove_reader(self.fd)
        self._watching = False

    async def wait(self) -> None:
        """Until the descriptor is readable (at once if it is)."""
        loop = self._loop
        if loop is None:  # not entered: the plain way
            await anyio.wait_readable(self.fd)
            return
        if not self._watching:
            loop.add_reader(self.fd, self._on_readable)
            self._watching = True
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            return
        assert self._loop is not None
        self._loop.remove_reader(self.fd)  # readable, and the reader busy: watch again when it waits
        self._watching = False
