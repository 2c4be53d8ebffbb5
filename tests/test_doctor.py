"""`runwire doctor` against real services: passes on a healthy trio (and the runner keeps only the newest
probe journals), and names the failing part when the runner is down, when the gateway reads another
journal directory, and when the scheduler is down."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

from runner_svc.control import PROBES_KEPT
from shared.config import load_settings
from shared.ids import PROBE_PREFIX, new_run_id
from shared.journal import JournalWriter, begin_run, journal_path, list_run_ids
from tests.harness import Service, write_config

RUNWIRE = str(Path(sys.executable).parent / "runwire")


def _doctor(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RUNWIRE, "doctor", "--config", str(cfg)], capture_output=True, text=True, timeout=60)


def _line(out: str, check: str) -> str:
    for line in out.splitlines():
        if f"  {check}:" in line:
            return line
    raise AssertionError(f"no {check!r} line in:\n{out}")


def test_doctor_passes_on_a_healthy_trio(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = write_config(tmp_path)
    journal_dir = load_settings(cfg).journal_dir
    tz = ZoneInfo("UTC")
    # probe journals of earlier doctor runs, and a run that is not a probe (never touched)
    def ended_run(run_id: str, pipeline: str, trigger: str) -> str:
        begin_run(journal_dir, run_id, tz, pipeline, {}, {"trigger": trigger})
        writer = JournalWriter.open(journal_dir, run_id, tz)
        writer.append("pipeline", "success", "done")
        writer.close()
        return run_id

    old_probes = [ended_run(new_run_id(PROBE_PREFIX), "doctor-probe", "probe") for _ in range(PROBES_KEPT + 3)]
    other = ended_run(new_run_id("x"), "nap", "manual")
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    result = _doctor(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    probe = _line(result.stdout, "probe event")  # how fast it was is a figure in the line, not a verdict
    assert probe.startswith("PASS") and re.search(r"WebSocket in \d+ ms", probe), probe
    for check in ("config", "journal writable", "scheduler reachable", "runner reachable", "gateway healthy"):
        assert _line(result.stdout, check).startswith("PASS")
    # the probe's journal is kept with the newest earlier ones; older probe journals are gone
    probes = [rid for rid in list_run_ids(journal_dir) if rid.startswith(PROBE_PREFIX)]
    assert len(probes) == PROBES_KEPT and probes[:-1] == old_probes[-(PROBES_KEPT - 1):], probes
    assert journal_path(journal_dir, other).exists()


def test_doctor_names_the_runner_when_it_is_down(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = write_config(tmp_path)
    for module in ("scheduler_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    result = _doctor(cfg)
    assert result.returncode == 1
    assert _line(result.stdout, "runner reachable").startswith("FAIL")
    assert _line(result.stdout, "scheduler reachable").startswith("PASS")
    assert _line(result.stdout, "probe event").startswith("FAIL")


def test_doctor_names_the_scheduler_when_it_is_down(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = write_config(tmp_path)
    for module in ("runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    result = _doctor(cfg)
    assert result.returncode == 1
    assert _line(result.stdout, "scheduler reachable").startswith("FAIL")
    assert _line(result.stdout, "runner reachable").startswith("PASS")


def test_doctor_names_a_gateway_reading_another_journal_directory(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = write_config(tmp_path)
    for module in ("scheduler_svc", "runner_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    other = tmp_path / "elsewhere"
    services.append(Service("gateway_svc", cfg, tmp_path, env={"RUNWIRE_HOME": str(other)}).start())
    result = _doctor(cfg)
    assert result.returncode == 1, result.stdout
    bad = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("gateway" in line and str(other) in line for line in bad), result.stdout


def test_doctor_without_the_gateways_token_fails_plainly(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = write_config(tmp_path)
    for module in ("scheduler_svc", "runner_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    services.append(Service("gateway_svc", cfg, tmp_path, env={"RUNWIRE_TOKEN": "s3cret"}).start())
    result = _doctor(cfg)  # no RUNWIRE_TOKEN in the doctor's environment
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    line = _line(result.stdout, "probe event")
    assert line.startswith("FAIL") and "401" in line and "RUNWIRE_TOKEN" in line
