"""How the scheduler judges a runner's silence: on a clock of its own that advances only while the
scheduler runs, so a pause of the judge (SIGSTOP, a starved host, a suspended VM) is not taken for a
silence of the judged. Pure: no sockets, the real clock injectable, so it is tested with a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


class JudgeClock:
    """Seconds the scheduler was there to hear a heartbeat.

    The monitor calls `tick()` every tick; each tick advances the clock by the real time since the
    previous one, but by at most `max_step`. Time the scheduler spent stopped therefore counts as one
    step, and heartbeats sent meanwhile (waiting unread in the socket) are read before their sender's
    silence can pass `runner_lost_after`. Before the first tick the clock reads real (monotonic) time:
    what the scheduler records at start, before judging begins, compares with what it judges later.
    """

    def __init__(self, max_step: float, real: Callable[[], float] = time.monotonic) -> None:
        self.max_step = max_step
        self._real = real
        self._now: float | None = None
        self._last_real = 0.0

    def now(self) -> float:
        return self._real() if self._now is None else self._now

    def tick(self) -> float:
        """Advance; return the seconds of real time not counted (0 when the tick came on time)."""
        real = self._real()
        if self._now is None:
            self._now = real
            self._last_real = real
            return 0.0
        step = max(real - self._last_real, 0.0)  # monotonic never goes back; a fake clock might
        self._last_real = real
        counted = min(step, self.max_step)
        self._now += counted
        return step - counted


@dataclass(frozen=True)
class Verdict:
    lost: bool
    deferred: bool = False  # silent past the limit, but input waits unread: maybe its heartbeat


def verdict(silence: float, lost_after: float, unread_input: bool) -> Verdict:
    """Is a runner silent for `silence` judge seconds lost? Input still unread on the dispatch socket
    defers the verdict (the heartbeat may be in it), for at most another `lost_after`: a socket kept
    busy by a flood must not keep a dead runner alive."""
    if silence <= lost_after:
        return Verdict(lost=False)
    if unread_input and silence <= 2 * lost_after:
        return Verdict(lost=False, deferred=True)
    return Verdict(lost=True)
