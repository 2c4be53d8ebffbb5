"""The archive worker's stderr (gateway_svc.archiver): anyio starts the worker with fd 2 on a pipe that
nobody reads, and sys.stderr on /dev/null. What a C library, a print or a warning writes there in the
worker is said by the gateway, and a write larger than a pipe holds does not block the worker."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import anyio
import pytest

from gateway_svc.archiver import Archiver
from tests.test_gateway_helpers import make_settings


def _writes_to_stderr(n: int) -> int:
    """Run in the archive worker: what Arrow or Polars writing to fd 2, a print and a warning do."""
    os.write(2, b"E" * n + b"\n")
    print("a line printed to sys.stderr", file=sys.stderr)
    warnings.warn("a warning in the archive worker", RuntimeWarning, stacklevel=1)
    return n


async def test_what_the_archive_worker_writes_to_its_stderr_is_said_and_never_blocks_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings, _ = make_settings(tmp_path)
    archiver = Archiver(settings)
    with caplog.at_level(logging.WARNING), anyio.fail_after(30):
        assert await archiver._in_worker(_writes_to_stderr, 2_000_000) == 2_000_000  # more than a pipe and its reader hold
        assert await archiver._in_worker(_writes_to_stderr, 10) == 10
    said = [r.getMessage() for r in caplog.records if r.name == "gateway_svc.archiver"]
    assert len(said) == 2, said
    assert said[0].startswith("the archive worker wrote 2,000,") and "(the first 16,384 bytes)" in said[0]
    assert said[1].startswith("the archive worker wrote ") and "E" * 10 + "\n" in said[1]
    assert "a line printed to sys.stderr" in said[1] and "2,000," not in said[1]  # emptied after each call
    assert any(r.name == "py.warnings" and "a warning in the archive worker" in r.getMessage() for r in caplog.records)
