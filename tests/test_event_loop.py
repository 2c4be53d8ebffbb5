"""The services' event loop: uvloop where installed, asyncio's own with RUNWIRE_UVLOOP=0, a bad value a
clear error at start (exit 2). Real service processes for the last two."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from shared.entry import UVLOOP_ENV, use_uvloop
from shared.errors import ConfigError
from tests.harness import REPO, Service, write_config

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_the_switch() -> None:
    for off in ("0", "false", "No", " off "):
        assert use_uvloop({UVLOOP_ENV: off}) is False
    for on in ({}, {UVLOOP_ENV: "1"}, {UVLOOP_ENV: "yes"}):
        assert use_uvloop(on) is HAVE_UVLOOP
    with pytest.raises(ConfigError, match="RUNWIRE_UVLOOP='maybe': expected 1 or 0"):
        use_uvloop({UVLOOP_ENV: "maybe"})


def test_a_bad_value_stops_the_service_at_start(tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path, "")
    proc = subprocess.run([sys.executable, "-m", "runner_svc", "--config", str(cfg)], cwd=str(REPO),
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), UVLOOP_ENV: "maybe"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "RUNWIRE_UVLOOP='maybe'" in proc.stderr


@pytest.mark.parametrize("value", ["1", "0"])
def test_the_runner_runs_on_the_loop_asked_for(tmp_path: Path, services: list[Service], value: str) -> None:
    cfg, _ = write_config(tmp_path, "")
    svc = Service("runner_svc", cfg, tmp_path, env={UVLOOP_ENV: value})
    services.append(svc)
    svc.start()
    logged = svc.log_path.read_text()
    expected = "uvloop.Loop" if value == "1" and HAVE_UVLOOP else "asyncio.unix_events._UnixSelectorEventLoop"
    assert f"runner: event loop {expected}" in logged, logged[-2000:]
