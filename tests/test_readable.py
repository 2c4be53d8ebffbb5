"""runner_svc.readable: a descriptor watched across waits wakes its reader for each message, does not
make the loop spin while the reader is busy and the descriptor stays readable, and is let go of at the
end and on cancel. Real socket pairs, the real event loop."""

from __future__ import annotations

import asyncio
import socket

import anyio

from runner_svc.readable import Readable


async def test_each_message_wakes_the_reader_once_read() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        got = []
        async with Readable(a.fileno()) as r:
            for i in range(50):
                b.send(b"m%d\n" % i)
                with anyio.fail_after(5):
                    await r.wait()
                got.append(a.recv(100))
        assert got == [b"m%d\n" % i for i in range(50)]


async def test_a_readable_descriptor_with_a_busy_reader_does_not_wake_the_loop_each_turn() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        async with Readable(a.fileno()) as r:
            calls = 0
            on_readable = r._on_readable

            def counted() -> None:
                nonlocal calls
                calls += 1
                on_readable()

            r._on_readable = counted  # type: ignore[method-assign]
            b.send(b"x\n")
            await r.wait()  # woken; the reader now does something else and leaves the byte there
            for _ in range(200):
                await asyncio.sleep(0)  # turns of the loop: a watched, readable fd would call back each one
            assert calls <= 2, calls
            with anyio.fail_after(5):
                await r.wait()  # still readable: the next wait returns at once
            assert a.recv(10) == b"x\n"


async def test_the_descriptor_is_let_go_of_at_the_end_and_on_cancel() -> None:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        async with Readable(a.fileno()) as r:
            with anyio.move_on_after(0.05):
                await r.wait()  # nothing comes: cancelled
            b.send(b"y\n")
            with anyio.fail_after(5):
                await r.wait()  # a cancelled wait leaves it usable
        assert not loop.remove_reader(a.fileno())  # no longer watched
