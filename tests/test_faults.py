"""The fault run (tests/faultrun.py) in its quick setting: a minute of kill -9 and SIGSTOP/SIGCONT of each
service with stalling, disconnecting and resuming clients, then every invariant. The failure message
holds all the figures and the seed; replay with `RUNWIRE_FAULT_SEED=<seed>`, or run the long soak:
`.venv/bin/python -m tests.faultrun --seconds 600 --seed <seed>`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.faultrun import Options, run_faults


@pytest.mark.timeout(300)
async def test_fault_run_keeps_every_invariant(tmp_path: Path) -> None:
    seed = int(os.environ.get("RUNWIRE_FAULT_SEED") or random.SystemRandom().randrange(1, 10**6))
    print(f"fault run seed {seed}")
    rep = await run_faults(Options(seconds=60, seed=seed, settle=45, catch_up=20, workdir=tmp_path / "faultrun"))
    text = rep.text()
    print(text)
    assert rep.figures["runs"] >= 5, text  # the run did something: a check over nothing proves nothing
    assert rep.figures["events journaled"] > 0, text
    failed = [name for name, evidence in rep.failures.items() if evidence]
    assert not failed, text
