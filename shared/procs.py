"""Finding a run's processes on this host: every stage process carries RUNWIRE_RUN_ID, RUNWIRE_HOME and
RUNWIRE_RUNNER_PID in its environment, and so does everything it spawns, also what left its process
group. The runner ends what a run left behind; the scheduler ends the processes of a run it ended in
place of a lost runner. Read from /proc (Linux); zombies count as gone.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUN_ID_ENV = "RUNWIRE_RUN_ID"
HOME_ENV = "RUNWIRE_HOME"
RUNNER_PID_ENV = "RUNWIRE_RUNNER_PID"

_RUN_ID_KEY = RUN_ID_ENV.encode() + b"="
_HOME_KEY = HOME_ENV.encode() + b"="
_RUNNER_KEY = RUNNER_PID_ENV.encode() + b"="


def stat_fields(pid: str) -> tuple[str, int] | None:
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


def is_alive(pid: int) -> bool:
    fields = stat_fields(str(pid))
    return fields is not None and fields[0] not in ("Z", "X")


@dataclass(frozen=True)
class StageProcess:
    pid: int
    run_id: str
    runner_pid: int | None  # the runner that started its stage (None: not said)


def _homes(home: Path) -> set[bytes]:
    return {os.fsencode(str(home)), os.fsencode(os.path.realpath(home))}


def run_processes(home: Path, run_id: str | None = None) -> list[StageProcess]:
    """Live processes (of this user) started for runs of this home, or of one run: one pass over /proc.
    Processes of another runwire home on the same host (same run ids, other journals) are not ours."""
    homes = _homes(home)
    wanted = None if run_id is None else _RUN_ID_KEY + run_id.encode()
    me = os.getpid()
    found: list[StageProcess] = []
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
        if _RUN_ID_KEY not in env:
            continue
        rid = runner = None
        home_ok = False
        for var in env.split(b"\0"):
            if var.startswith(_RUN_ID_KEY):
                rid = var
            elif var.startswith(_HOME_KEY):
                home_ok = var[len(_HOME_KEY):] in homes
            elif var.startswith(_RUNNER_KEY):
                runner = var[len(_RUNNER_KEY):]
        if rid is None or not home_ok or (wanted is not None and rid != wanted):
            continue
        fields = stat_fields(name)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        runner_pid = int(runner) if runner and runner.isdigit() else None
        found.append(StageProcess(int(name), rid[len(_RUN_ID_KEY):].decode(errors="replace"), runner_pid))
    return found


def kill_processes(procs: list[StageProcess], why: str) -> list[int]:
    """SIGKILL each; returns the pids killed. A process that cannot be killed is logged, not skipped
    silently."""
    killed = []
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        except ProcessLookupError:
            continue  # ended by itself meanwhile: the outcome asked for
        except PermissionError as e:
            log.error("run %s: cannot kill process %d (%s): %s", p.run_id, p.pid, why, e)
    return killed


def kill_run_processes(home: Path, run_id: str, why: str) -> list[int]:
    """SIGKILL every live process of one run of this home; returns the pids killed."""
    return kill_processes(run_processes(home, run_id), why)
