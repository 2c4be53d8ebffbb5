"""The gateway's SUB reader (gateway_svc.subscription): every message in order across bursts, pauses and
batch limits; multipart messages kept whole; a wake-up consumed elsewhere found by `check()`; a flood
does not starve the other tasks. Real ZeroMQ sockets (TCP on loopback, inproc where the test needs the
send to reach the reader's queue synchronously).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import zmq

from gateway_svc.subscription import Subscription
from tests.harness import free_port


def _pair(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> tuple[zmq.Socket[bytes], Subscription]:
    pub: zmq.Socket[bytes] = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoint)
    sub = Subscription(ctx)
    sub.sock.setsockopt(zmq.RCVHWM, 0)
    sub.sock.connect(endpoint)
    sub.sock.setsockopt(zmq.SUBSCRIBE, b"")
    return pub, sub


async def _joined(pub: zmq.Socket[bytes], sub: Subscription) -> None:
    """Send probes until one arrives (a SUB that has just connected misses what is sent before)."""
    with anyio.fail_after(10):
        while True:
            pub.send_multipart([b"probe", b""])
            with anyio.move_on_after(0.05):
                await sub.next_batch(1000)
                break
    await anyio.sleep(0.05)
    sub.take(1_000_000)  # probes still on their way


@asynccontextmanager
async def _joined_pair(endpoint: str) -> AsyncIterator[tuple[zmq.Socket[bytes], Subscription]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, sub = _pair(ctx, endpoint)
    try:
        await _joined(pub, sub)
        yield pub, sub
    finally:
        sub.close()
        pub.close(linger=0)
        ctx.term()


async def test_every_message_arrives_whole_and_in_order_across_bursts_pauses_and_batch_limits() -> None:
    rng = random.Random(5)
    total = 20_000
    got: list[int] = []
    batches = 0
    async with _joined_pair(f"tcp://127.0.0.1:{free_port()}") as (pub, sub):

        async def publish() -> None:
            n = 0
            while n < total:
                for _ in range(min(total - n, rng.choice((1, 1, 3, 50, 700)))):
                    pub.send_multipart([b"ev/t", n.to_bytes(4, "big"), b"x" * (n % 3)])
                    n += 1
                await anyio.sleep(rng.choice((0, 0, 0.0005, 0.002, 0.02)))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                while len(got) < total:
                    msgs = await sub.next_batch(rng.choice((1, 64, 5000)))
                    batches += 1
                    for frames in msgs:
                        assert len(frames) == 3 and frames[0] == b"ev/t", frames
                        n = int.from_bytes(frames[1], "big")
                        assert frames[2] == b"x" * (n % 3)
                        got.append(n)
        assert got == list(range(total))
        assert 1 < batches < total  # batched, and not all at once
        assert not sub.check() and sub.missed_wakeups == 0


async def test_a_wakeup_consumed_elsewhere_is_found_by_check() -> None:
    # ZMQ_FD signals edges: asking ZMQ_EVENTS takes the news off the descriptor. Done here behind the
    # reader's back (inproc: the send reaches the reader's queue before send returns), the reader sleeps
    # on with a message waiting; check() must see it and wake the reader.
    got: list[list[bytes]] = []
    async with _joined_pair("inproc://subscription-test") as (pub, sub):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def read() -> None:
                    got.extend(await sub.next_batch(100))

                tg.start_soon(read)
                await anyio.sleep(0.05)  # the reader waits on the descriptor
                assert not sub.check()  # nothing waiting: no false alarm
                pub.send_multipart([b"ev/t", b"late"])
                assert sub.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN  # consumes the descriptor's news
                await anyio.sleep(0.2)
                assert got == []  # the reader missed it ...
                assert sub.check()  # ... until the periodic check finds it
        assert got == [[b"ev/t", b"late"]]
        assert sub.missed_wakeups == 1


async def test_a_flood_of_back_to_back_batches_lets_other_tasks_run() -> None:
    turns = 0
    async with _joined_pair("inproc://subscription-flood") as (pub, sub):
        for n in range(5_000):
            pub.send_multipart([b"ev/t", n.to_bytes(4, "big")])
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def other() -> None:
                    nonlocal turns
                    while True:
                        turns += 1
                        await anyio.lowlevel.checkpoint()

                tg.start_soon(other)
                taken = 0
                batches = 0
                while taken < 5_000:
                    taken += len(await sub.next_batch(50))
                    batches += 1
                tg.cancel_scope.cancel()
        assert batches == 100
        assert turns >= batches - 1  # the other task ran between back-to-back batches


async def test_a_terminated_context_fails_the_waiting_reader_with_the_cause() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, sub = _pair(ctx, "inproc://subscription-term")
    pub.close(linger=0)
    failure: list[BaseException] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                try:
                    await sub.next_batch(100)
                except zmq.ZMQError as e:
                    failure.append(e)

            tg.start_soon(read)
            await anyio.sleep(0.05)
            # zmq_ctx_term blocks until every socket is closed; meanwhile the sockets' operations fail
            # with ETERM, which the waiting reader must see rather than wait forever
            tg.start_soon(anyio.to_thread.run_sync, ctx.term)
            try:
                with anyio.move_on_after(5):
                    while not failure:
                        await anyio.sleep(0.01)
            finally:
                sub.close()  # lets zmq_ctx_term return
    assert failure and isinstance(failure[0], zmq.ContextTerminated), failure
