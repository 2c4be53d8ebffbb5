"""A stage's last output after it exits: read whole however long the handlers take with it (a slow
journal, or in cluster mode JetStream without quorum, holds each batch up), and cut off, with a note,
only when the pipe stays open with nothing coming (held by a process outside the stage's group).
run_process with real processes; the drain timeout shortened for the test."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from runner_svc import stageproc
from shared.stage import StageMessage

OUTPUT = "import sys\nfor i in range(50):\n    print('line', i)\n"
# exits at once, leaving a process in its own session that holds stdout open and writes nothing
ORPHAN = ("import subprocess,sys\n"
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
          "print('orphan', p.pid, flush=True)\n")


class Seen:
    def __init__(self, slow_first: float = 0.0) -> None:
        self.lines: list[str] = []
        self.notes: list[str] = []
        self.slow_first = slow_first

    async def on_lines(self, stream: str, lines: list[str]) -> None:
        if self.slow_first and not self.lines:
            await anyio.sleep(self.slow_first)  # the journal or the event stream holding the batch up
        self.lines.extend(lines)

    async def on_messages(self, messages: Sequence[StageMessage]) -> None:
        pass

    async def on_note(self, text: str) -> None:
        self.notes.append(text)


async def run(code: str, seen: Seen, tmp_path: Path) -> stageproc.ProcessResult:
    return await stageproc.run_process(
        [sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ), timeout=60, kill_grace=1.0,
        success_marker=None, marker_grace=1.0, on_lines=seen.on_lines, on_messages=seen.on_messages,
        on_note=seen.on_note, what="drain test")


@pytest.fixture(autouse=True)
def short_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stageproc, "DRAIN_TIMEOUT", 0.5)


async def test_a_handler_slower_than_the_drain_timeout_loses_no_line(tmp_path: Path) -> None:
    seen = Seen(slow_first=1.5)  # three drain timeouts, spent in the handler after the stage exited
    result = await run(OUTPUT, seen, tmp_path)
    assert result.ok
    assert seen.lines == [f"line {i}" for i in range(50)]
    assert not any("output still open" in n for n in seen.notes), seen.notes


async def test_a_pipe_held_open_by_a_process_outside_the_group_is_cut_off_with_a_note(tmp_path: Path) -> None:
    seen = Seen()
    try:
        with anyio.fail_after(20):
            result = await run(ORPHAN, seen, tmp_path)
    finally:
        for line in seen.lines:
            if line.startswith("orphan "):
                os.kill(int(line.split()[1]), signal.SIGKILL)
    assert result.returncode == 0
    assert any("output still open" in n for n in seen.notes), seen.notes
