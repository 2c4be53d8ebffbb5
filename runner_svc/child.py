"""Bootstrap of every stage process: `python -m runner_svc.child module:function` calls a callable stage
with its `StageContext`; `python -m runner_svc.child --exec -- argv...` becomes a command stage.

First it asks the kernel to SIGKILL this process when the runner dies (PR_SET_PDEATHSIG, Linux), so a
runner killed with -9 does not leave its stages running; the setting survives exec, which is why
command stages start through here too. Children that a stage spawns itself are found later by their
RUNWIRE_RUN_ID environment (see shared/procs.py) when the run ends or the runner restarts.

Command stages start it as a script with `python -S` (no site-packages, for a fast start), so this module
imports only the standard library at the top; `shared` is imported for callable stages only.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import traceback

RUNNER_PID_ENV = "RUNWIRE_RUNNER_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(f"runwire stage: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    except OSError as e:
        print(f"runwire stage: cannot set PR_SET_PDEATHSIG: {e}", file=sys.stderr)
    # the runner may have died between fork and prctl: then nobody would kill us later
    expected = os.environ.get(RUNNER_PID_ENV)
    if expected and os.getppid() != int(expected):
        print("runwire stage: the runner is gone before the stage started; not starting", file=sys.stderr)
        os._exit(125)


def run_command(argv: list[str]) -> int:
    if not argv:
        print("runwire stage: empty command", file=sys.stderr)
        return 127
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"runwire stage: cannot execute {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    return 127  # not reached: exec replaced this process


def run_callable(target: str) -> int:
    from shared.stage import context_from_env

    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except (ImportError, AttributeError) as e:
        print(f"runwire stage: cannot load callable {target!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 126
    ctx = context_from_env()
    try:
        func(ctx)  # the return value is ignored (a returned count must not become an exit status)
    except SystemExit:
        raise  # sys.exit(n) from the stage sets the exit status as usual
    except BaseException:  # the traceback goes to stderr, which becomes log events; the stage fails
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str]) -> int:
    die_with_parent()
    if argv[:1] == ["--exec"]:
        rest = argv[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return run_command(rest)
    if len(argv) != 1:
        print("usage: python -m runner_svc.child module:function | --exec -- argv...", file=sys.stderr)
        return 2
    return run_callable(argv[0])


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    raise SystemExit(main(sys.argv[1:]))
