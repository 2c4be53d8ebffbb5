"""Process groups of stage processes: is a group still alive, end it (TERM, grace, KILL). Finding a
run's processes by their environment (what a dead runner, or a stage's own daemon, left behind) is in
shared/procs.py, which the scheduler uses too.

Liveness is read from /proc and ignores zombies: a killed grandchild re-parented to an init that does
not reap stays a zombie, which is dead for every purpose here.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio

from shared.procs import RUN_ID_ENV, stat_fields

__all__ = ["RUN_ID_ENV", "end_group", "group_members"]

log = logging.getLogger(__name__)

_POLL = 0.05


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: fall back to "does the group exist at all"
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass  # the group exists but is not ours to signal: still alive, which is what is asked
        return [pgid]
    for name in entries:
        if not name.isdigit():
            continue
        fields = stat_fields(name)
        if fields and fields[1] == pgid and fields[0] not in ("Z", "X"):
            members.append(int(name))
    return members


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def end_group(pgid: int, grace: float, what: str) -> bool:
    """End every process of the group: SIGTERM, up to `grace` seconds, then SIGKILL. Shielded, so a
    cancelled caller still leaves no process behind. Returns True if anything had to be ended."""
    with anyio.CancelScope(shield=True):
        if not group_members(pgid):
            return False
        _signal_group(pgid, signal.SIGTERM)
        deadline = anyio.current_time() + grace
        while anyio.current_time() < deadline:
            await anyio.sleep(_POLL)
            if not group_members(pgid):
                return True
        left = group_members(pgid)
        if left:
            log.warning("%s: process group %d did not end within %.1fs of SIGTERM: SIGKILL to %s", what, pgid, grace, left)
            _signal_group(pgid, signal.SIGKILL)
            for _ in range(100):  # SIGKILL cannot be refused; this only waits for the kernel
                if not group_members(pgid):
                    break
                await anyio.sleep(_POLL)
            else:
                log.error("%s: process group %d still has live members after SIGKILL: %s", what, pgid, group_members(pgid))
    return True  # a shielded scope is never cancelled: only the returns above leave it early
