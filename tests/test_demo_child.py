"""Demo stages run the way the runner runs them: `python -m runner_svc.child module:function` in a child
process, cwd = home, messages as JSON lines on the fd in RUNWIRE_STAGE_FD. This test plays the runner's
side of that documented protocol with a plain pipe (the runner itself is tested in its own files).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import pytest

from runwire_demo import data
from shared.stage import STAGE_FD_ENV, STAGE_INFO_ENV, CountersMessage, LogMessage, StageInfo, info_to_env, stage_message_decoder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("runner_svc.child") is None, reason="runner_svc/child.py is not written yet"
)


def _run_child(home: Path, target: str, stage: str, item: str | None = None):
    read_fd, write_fd = os.pipe()
    env = {**os.environ, STAGE_FD_ENV: str(write_fd), STAGE_INFO_ENV: info_to_env(
        StageInfo(run_id="c1", stage=stage, item=item, home=str(home)))}
    env.pop("PYTHONPATH", None)  # the runner does not set it: the package must import from anywhere
    lines: list[bytes] = []

    def drain() -> None:
        with os.fdopen(read_fd, "rb") as f:
            lines.extend(f)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "runner_svc.child", target], cwd=home, env=env, pass_fds=(write_fd,),
            capture_output=True, text=True, timeout=90,
        )
    finally:
        os.close(write_fd)
        reader.join(timeout=30)
    return proc, [stage_message_decoder.decode(line) for line in lines]


def test_whole_pipeline_in_child_processes(tmp_path: Path) -> None:
    data.generate(tmp_path / "data" / "raw", days=3, end=date(2025, 3, 14), instruments=["ES", "GC"])
    proc, messages = _run_child(tmp_path, "runwire_demo.translator:run", "translator")
    assert proc.returncode == 0, proc.stderr
    assert "File written: ES_2025.parquet (4,140 rows)" in [m.msg for m in messages if isinstance(m, LogMessage)]
    assert CountersMessage(values={"files_written": 2}) in messages
    for item in ("ES", "GC"):
        proc, messages = _run_child(tmp_path, "runwire_demo.analyzer:run", "analyzer", item)
        assert proc.returncode == 0, proc.stderr
        assert CountersMessage(values={"days": 3}) in messages
    proc, messages = _run_child(tmp_path, "runwire_demo.merger:run", "merger")
    assert proc.returncode == 0, proc.stderr
    assert CountersMessage(values={"monthly_files": 4}) in messages
    assert len(list((tmp_path / "data" / "analyzer_runs").rglob("*.parquet"))) == 4


def test_malformed_raw_file_fails_the_child(tmp_path: Path) -> None:
    (raw,) = data.generate(tmp_path / "data" / "raw", days=1, end=date(2025, 3, 14), instruments=["NQ"])
    raw.write_text(raw.read_text().replace("\n", "\nnot a bar,1,2,3,4,5\n", 1))
    proc, messages = _run_child(tmp_path, "runwire_demo.translator:run", "translator")
    assert proc.returncode == 1
    # the traceback on stderr (which the runner turns into log events) names the file, line and column
    assert f"{raw}: line 2, column 'timestamp': cannot read 'not a bar'" in proc.stderr
    assert raw.exists()
    assert any(isinstance(m, LogMessage) and m.msg.startswith("Malformed raw file kept") for m in messages)
