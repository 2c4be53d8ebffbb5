"""No process outlives its run, also when someone else ended the run: a stage's grandchild that left its
process group (its own session) is ended when the scheduler ends the run "runner lost", and when the
runner restarts it ends what is left of runs that have ended meanwhile, without touching processes of
runs that have not ended (another live runner's) or of another runwire home. Real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from shared.config import load_settings
from shared.dispatch import RunAccepted
from shared.journal import JournalWriter, read_events
from tests.harness import Service, write_config
from tests.runner_peer import RunnerRig, journal, pid_alive, queue_run, wait_gone
from tests.test_fencing import BODY, launch, processes_with_run_id, wait_for
from tests.test_runner_stages import pids_from_logs


def stage_pids(journal_dir: Path, run_id: str) -> tuple[int, int]:
    def got():  # type: ignore[no-untyped-def]
        evs = read_events(journal_dir, run_id)
        g, s = pids_from_logs(evs, "grandchild"), pids_from_logs(evs, "stage")
        return (g[0], s[0]) if g and s else None
    return wait_for(f"the pids printed by {run_id}'s stage", got, 30)


def test_runner_lost_run_leaves_no_process(tmp_path: Path, services: list[Service]) -> None:
    cfg, _ = write_config(tmp_path, BODY)
    settings = load_settings(cfg)
    services.append(Service("scheduler_svc", cfg, tmp_path).start())
    runner = Service("runner_svc", cfg, tmp_path).start()
    run_id = launch(settings.config.scheduler.control, "ticking")
    grandchild, _ = stage_pids(settings.journal_dir, run_id)
    runner.kill9()
    last = wait_for("runner lost", lambda: (lambda evs: evs[-1] if evs and evs[-1].is_terminal else None)(read_events(settings.journal_dir, run_id)), 30)
    assert last.msg.startswith("runner lost"), last
    assert wait_gone(grandchild, 10), "the grandchild outlived its run's end"
    assert processes_with_run_id(run_id) == []
    services.append(Service("runner_svc", cfg, tmp_path).start())
    assert processes_with_run_id(run_id) == []


def test_restart_ends_processes_of_runs_ended_meanwhile(tmp_path: Path, services: list[Service]) -> None:
    """The scheduler ended the run on another host (here: by hand, as it writes it, without killing):
    the restarted runner finds the grandchild by its run id and ends it. A process of a run that has not
    ended, started by a live runner, and one of another home with an ended run's id are left alone."""
    rig = RunnerRig(tmp_path, BODY, services=services).start()
    tz = ZoneInfo("America/Chicago")
    bystanders: list[subprocess.Popen[bytes]] = []
    try:
        run_id = queue_run(rig.home, "ticking")
        rig.sched.dispatch(run_id, "ticking")
        rig.sched.wait_for(RunAccepted, run_id=run_id)
        grandchild, stage = stage_pids(rig.home / "events", run_id)
        rig.kill9()
        assert wait_gone(stage, 10)
        with JournalWriter.open(rig.home / "events", run_id, tz) as w:
            w.append("pipeline", "failure", "runner lost: no heartbeat from test-runner for 3 s")
        live_run = queue_run(rig.home, "ticking")
        with JournalWriter.open(rig.home / "events", live_run, tz) as w:
            w.append("pipeline", "start", "on another runner", {"runner": "other", "attempt": 1, "pid": os.getpid()})
        sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
        env = {**os.environ, "RUNWIRE_HOME": str(rig.home), "RUNWIRE_RUNNER_PID": str(os.getpid())}
        bystanders.append(subprocess.Popen(sleeper, env={**env, "RUNWIRE_RUN_ID": live_run}))
        bystanders.append(subprocess.Popen(sleeper, env={**env, "RUNWIRE_RUN_ID": run_id, "RUNWIRE_HOME": str(tmp_path / "elsewhere")}))
        time.sleep(0.2)
        assert pid_alive(grandchild)
        rig.restart()
        assert wait_gone(grandchild, 10), "the restarted runner left the ended run's grandchild running"
        assert [p for p in processes_with_run_id(run_id) if p != bystanders[1].pid] == []
        assert all(p.poll() is None for p in bystanders), "a process that is not the ended run's was killed"
        assert [e.event for e in journal(rig.home, live_run)] == ["queued", "start"]
    finally:
        for p in bystanders:
            p.kill()
            p.wait(5)
        rig.close()
