"""The wall clock the schedule driver reads and sleeps on, as an object: the service uses the real one,
tests a fake one they move by hand, so slot and restart logic runs in-process without waiting."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Protocol

import anyio


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware (UTC)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""
        ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
