"""Process groups of stage processes: is a group still alive, end it (TERM, grace, KILL), and find the
processes a dead runner left behind (by the RUNWIRE_RUN_ID in their environment).

Liveness is read from /proc and ignores zombies: a killed grandchild re-parented to an init that does
not reap stays a zombie, which is dead for every purpose here.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio

log = logging.getLogger(__name__)

RUN_ID_ENV = "RUNWIRE_RUN_ID"
_POLL = 0.05


def _stat_fields(pid: str) -> tuple[str, int] | None:
    """(state, pgrp) of a process from /proc/<pid>/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after the last ')'
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[2])
    except (IndexError, ValueError):
        return None


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
        fields = _stat_fields(name)
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
        return True


def processes_of_run(run_id: str) -> list[int]:
    """Processes (of this user) whose environment names the run: stage processes and their children."""
    needle = f"{RUN_ID_ENV}={run_id}".encode()
    found = []
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue  # gone meanwhile, or another user's process: not a stage of ours
        if needle in env.split(b"\0"):
            fields = _stat_fields(name)
            if fields and fields[0] not in ("Z", "X"):
                found.append(int(name))
    return found


def kill_orphans(run_id: str) -> list[int]:
    """SIGKILL what a dead runner left running for this run (its process groups died with it only if
    the stage process reacted to its parent's death); returns the pids killed."""
    killed = []
    for pid in processes_of_run(run_id):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            continue
        except PermissionError as e:
            log.error("run %s: cannot kill left-over stage process %d: %s", run_id, pid, e)
    return killed
