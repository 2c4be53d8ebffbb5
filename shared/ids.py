"""Run ids: the contract's pattern, checked wherever an id is accepted, and time-sortable new ids."""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import datetime, timezone

from .errors import InvalidRunId

RUN_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
PROBE_PREFIX = "probe-"  # run ids of the doctor's probe runs (hidden from run lists, never archived)
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)

_lock = threading.Lock()
_last_us = 0


def is_valid_run_id(run_id: object) -> bool:
    return isinstance(run_id, str) and _RUN_ID_RE.fullmatch(run_id) is not None


def check_run_id(run_id: object) -> str:
    """Return `run_id` if it matches the contract's pattern, else raise InvalidRunId naming it."""
    if not is_valid_run_id(run_id):
        shown = repr(run_id)[:80]
        raise InvalidRunId(f"invalid run id {shown}: must match {RUN_ID_PATTERN}")
    return run_id  # type: ignore[return-value]


def new_run_id(prefix: str = "") -> str:
    """A new run id that sorts by creation time: `20261123T031500123456Z-1a2b3c`.

    Microseconds are forced strictly increasing within this process, so two ids made in the same
    microsecond still sort in creation order; the random suffix keeps ids from two processes apart.
    """
    global _last_us
    with _lock:
        now_us = time.time_ns() // 1000
        if now_us <= _last_us:
            now_us = _last_us + 1
        _last_us = now_us
    secs, micros = divmod(now_us, 1_000_000)
    moment = datetime.fromtimestamp(secs, tz=timezone.utc).replace(microsecond=micros)
    stamp = moment.strftime("%Y%m%dT%H%M%S%fZ")
    return check_run_id(f"{prefix}{stamp}-{os.urandom(3).hex()}")
