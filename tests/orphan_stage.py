"""A stage program for the fencing and orphan tests: it leaves a grandchild in its own session (so it
escapes the stage's process group, as `sleep 300 &` under setsid would), says both pids, then prints a
tick every 0.2 s until killed (so a runner that wakes up has output to journal at once)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

if __name__ == "__main__":
    child = subprocess.Popen(["sleep", "300"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"grandchild {child.pid}", flush=True)
    print(f"stage {os.getpid()}", flush=True)
    i = 0
    while True:
        i += 1
        print(f"tick {i}", flush=True)
        time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0.2)
