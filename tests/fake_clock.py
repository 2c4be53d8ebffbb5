"""A wall clock for the schedule driver that moves only when a test says so (`scheduler_svc.clock.Clock`)."""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio


class FakeClock:
    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware start")
        self._now = start
        self._sleepers: list[tuple[datetime, anyio.Event]] = []

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + timedelta(seconds=seconds)
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        woken = anyio.Event()
        entry = (deadline, woken)
        self._sleepers.append(entry)
        try:
            await woken.wait()
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        for deadline, woken in self._sleepers:
            if deadline <= self._now:
                woken.set()

    async def idle(self, timeout: float = 10.0) -> None:
        """Return once someone sleeps past now (the driver has done what was due, and waits)."""
        with anyio.fail_after(timeout):
            while not any(deadline > self._now and not woken.is_set() for deadline, woken in self._sleepers):
                await anyio.sleep(0.01)
