"""The per-stage cap on log events: at most `rate` output lines per second become `log` events; the
rest are counted, and a `log` event says how many were held back (each second while it happens, and
at the stage's end), so a chatty stage cannot flood the journal and every line is accounted for."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

Emit = Callable[[str, dict[str, Any]], Awaitable[object]]  # (msg, data) -> a log event of the stage


class LogCap:
    def __init__(self, rate: int, emit: Emit) -> None:
        self.rate = rate
        self._emit = emit
        self._window_start = time.monotonic()
        self._in_window = 0
        self.held = 0  # held back since the last report
        self.held_total = 0
        self.admitted_total = 0

    def admit(self) -> bool:
        """True if this line may become a log event now; otherwise it is counted as held back."""
        return self.admit_many(1) == 1

    def admit_many(self, n: int) -> int:
        """How many of n lines (the first ones) may become log events now; the rest are held back."""
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._in_window = 0
        admitted = max(0, min(n, self.rate - self._in_window))
        self._in_window += admitted
        self.admitted_total += admitted
        held = n - admitted
        self.held += held
        self.held_total += held
        return admitted

    async def report(self, final: bool = False) -> None:
        """Say how many lines were held back since the last report (nothing if none)."""
        if not self.held:
            return
        n, self.held = self.held, 0
        when = "at the stage's end" if final else "in the last second"
        await self._emit(
            f"{n} output lines held back {when} (log_rate {self.rate}/s; {self.held_total} held back in total)",
            {"held_back": n, "held_back_total": self.held_total, "log_rate": self.rate},
        )
