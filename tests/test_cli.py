"""The `runwire` command against the real trio: launch/--follow exit statuses, tail across a gateway
restart (never an event twice, none missing), runs, schedules, pause/resume, cancel, demo-data."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from shared.config import load_settings
from shared.journal import JournalReader, journal_path
from tests.harness import Ports, Service, write_config

RUNWIRE = str(Path(sys.executable).parent / "runwire")

PIPELINES = """
[pipelines.quick]
[pipelines.quick.params.n]
type = "int"
default = 3
[[pipelines.quick.stages]]
name = "count"
command = ["{python}", "-c", "import sys\\nfor i in range(int(sys.argv[1])): print('line', i)", "{n}"]

[pipelines.broken]
[[pipelines.broken.stages]]
name = "explode"
command = ["{python}", "-c", "import sys; print('about to fail'); sys.exit(3)"]

[pipelines.ticker]
[[pipelines.ticker.stages]]
name = "tick"
command = ["{python}", "-c", "import time\\nfor i in range(50):\\n    print('tick', i, flush=True)\\n    time.sleep(0.1)"]
log_rate = 1000

[schedules.nightly]
pipeline = "quick"
cron = "30 2 * * *"
"""


def rw(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RUNWIRE, *args, "--config", str(cfg)], capture_output=True, text=True, timeout=timeout)


def trio(tmp_path: Path, services: list[Service]) -> tuple[Path, Ports]:
    cfg, ports = write_config(tmp_path, PIPELINES)
    for module in ("scheduler_svc", "runner_svc", "gateway_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    return cfg, ports


def journal_seqs(cfg: Path, run_id: str) -> list[int]:
    return [e.seq for e in JournalReader(journal_path(load_settings(cfg).journal_dir, run_id)).read()]


def test_launch_follow_prints_each_event_once_and_exits_with_the_outcome(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = trio(tmp_path, services)
    ok = rw(cfg, "launch", "quick", "-p", "n=4", "--follow", "--json")
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    run_id = lines[0]["run_id"]
    events = lines[1:]
    assert [e["seq"] for e in events] == journal_seqs(cfg, run_id)
    assert events[-1]["stage"] == "pipeline" and events[-1]["event"] == "success"
    assert sum(1 for e in events if e["event"] == "log" and e["msg"].startswith("line")) == 4

    bad = rw(cfg, "launch", "broken", "--follow")
    assert bad.returncode == 1
    assert "failure" in bad.stdout and "explode" in bad.stdout  # one human line per event

    plain = rw(cfg, "launch", "quick")
    assert plain.returncode == 0 and "queued" in plain.stdout


def test_launch_refusals_are_clear(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = trio(tmp_path, services)
    unknown = rw(cfg, "launch", "nope")
    assert unknown.returncode != 0 and "unknown pipeline 'nope'" in unknown.stderr
    badparam = rw(cfg, "launch", "quick", "-p", "n=lots")
    assert badparam.returncode != 0 and "-p n" in badparam.stderr and "int" in badparam.stderr
    extra = rw(cfg, "launch", "quick", "-p", "colour=red")
    assert extra.returncode != 0 and "no parameter 'colour'" in extra.stderr


def test_tail_survives_a_gateway_restart_without_duplicates_or_gaps(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = trio(tmp_path, services)
    launched = rw(cfg, "launch", "ticker", "--json")
    run_id = json.loads(launched.stdout)["run_id"]
    tail = subprocess.Popen([RUNWIRE, "tail", run_id, "--json", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        gateway = services[2]
        gateway.stop()
        time.sleep(1.0)  # the run goes on writing while nobody serves it
        services.append(Service("gateway_svc", cfg, tmp_path).start())
        out, err = tail.communicate(timeout=60)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()
    assert tail.returncode == 0, err
    assert "reconnecting" in err  # it did lose the connection and came back
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert seqs == journal_seqs(cfg, run_id)


def test_runs_schedules_pause_resume_cancel(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = trio(tmp_path, services)
    run_id = json.loads(rw(cfg, "launch", "ticker", "--json").stdout)["run_id"]
    runs = [json.loads(line) for line in rw(cfg, "runs", "--json").stdout.splitlines()]
    assert run_id in [r["run_id"] for r in runs]
    table = rw(cfg, "runs").stdout
    assert table.splitlines()[0].split()[:3] == ["RUN_ID", "PIPELINE", "STATUS"] and run_id in table

    cancelled = rw(cfg, "cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stderr
    follow = rw(cfg, "tail", run_id, "--json")
    assert follow.returncode == 3  # the run's outcome: cancelled
    assert json.loads(follow.stdout.splitlines()[-1])["event"] == "cancelled"
    again = rw(cfg, "cancel", run_id)
    assert again.returncode == 1 and "409" in again.stderr

    sched = [json.loads(line) for line in rw(cfg, "schedules", "--json").stdout.splitlines()]
    assert [s["name"] for s in sched] == ["nightly"] and sched[0]["next_fire"]
    assert rw(cfg, "pause", "nightly").returncode == 0
    assert "True" in rw(cfg, "schedules").stdout.splitlines()[1]  # PAUSED column
    assert rw(cfg, "resume", "nightly").returncode == 0
    assert json.loads(rw(cfg, "schedules", "--json").stdout)["paused"] is False
    assert rw(cfg, "pause", "no-such").returncode == 1


def test_demo_data_writes_once_with_if_absent(tmp_path: Path) -> None:
    cfg, _ = write_config(tmp_path, PIPELINES)
    first = rw(cfg, "demo-data", "--days", "2", "--if-absent", timeout=120)
    assert first.returncode == 0, first.stderr
    raw = sorted((load_settings(cfg).data_dir / "raw").glob("*.csv"))
    assert len(raw) == 6
    second = rw(cfg, "demo-data", "--days", "2", "--if-absent")
    assert second.returncode == 0 and "nothing written" in second.stdout


def test_tail_of_an_ended_run_ends_and_permanent_refusals_do_not_retry(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = trio(tmp_path, services)
    run_id = json.loads(rw(cfg, "launch", "quick", "--follow", "--json").stdout.splitlines()[0])["run_id"]
    last = journal_seqs(cfg, run_id)[-1]
    for after in (last, last + 50):  # at and past the terminal event: nothing to print, the outcome is known
        done = rw(cfg, "tail", run_id, "--after-seq", str(after), timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
    before_end = rw(cfg, "tail", run_id, "--after-seq", str(last - 1), "--json")
    assert [json.loads(line)["seq"] for line in before_end.stdout.splitlines()] == [last]
    unknown = rw(cfg, "tail", "20000101T000000000000Z-none", timeout=30)
    assert unknown.returncode == 1 and "unknown_run" in unknown.stderr
    bad = rw(cfg, "tail", "a b", timeout=30)
    assert bad.returncode == 1 and "invalid run id" in bad.stderr
    # common options before the command work too
    assert run_id in rw(cfg, "--json", "runs").stdout


def test_a_launch_while_the_gateway_is_away_is_retried_and_makes_one_run(tmp_path: Path, services: list[Service]) -> None:
    """`runwire launch` sends an Idempotency-Key and retries with it while the gateway is not there (or
    answers 503): started before the gateway, it launches once the gateway is up, and only one run."""
    cfg, _ = write_config(tmp_path, PIPELINES)
    for module in ("scheduler_svc", "runner_svc"):
        services.append(Service(module, cfg, tmp_path).start())
    cli = subprocess.Popen([RUNWIRE, "launch", "quick", "--json", "--config", str(cfg)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert cli.stderr is not None
        first = cli.stderr.readline()  # the first attempt finds no gateway
        assert "retrying in" in first and "Idempotency-Key" in first, first
        services.append(Service("gateway_svc", cfg, tmp_path).start())
        out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, first + err
    run_id = json.loads(out.splitlines()[0])["run_id"]
    runs = [json.loads(line) for line in rw(cfg, "runs", "--json").stdout.splitlines()]  # one JSON line per run
    assert [r["run_id"] for r in runs] == [run_id]
