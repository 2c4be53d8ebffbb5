"""Start-up recovery: a run this runner was executing when it died (its journal's `start` names this
runner, its last event is not terminal, nobody holds its lock) gets a terminal `failure` saying so, and
whatever its stages left running is killed. No run stays "running" forever. Processes of runs that have
ended meanwhile (the scheduler ended them "runner lost") are ended too, whichever runner started them:
an ended run has nothing left to do. Processes of runs not ended that are not this runner's are left
alone (another live runner on this host may own them)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from shared.errors import JournalError, ServiceUnavailable
from shared.events import PIPELINE_STAGE, Event
from shared.fence import restore_fences
from shared.journal import JournalReader, JournalWriter, journal_path, list_run_ids
from shared.procs import StageProcess, is_alive, kill_processes, kill_run_processes, run_processes
from shared.runstate import fold, open_stages

from .publish import ChunkAppender, Publisher, RunJournal

log = logging.getLogger(__name__)

_HEAD_BYTES = 64 * 1024  # `start` is the second line of a journal: the head is enough to find it


@dataclass
class Recovered:
    run_id: str
    attempt: int
    last_seq: int


def _start_event(reader: JournalReader) -> Event | None:
    events, _ = reader.read_chunk(0, 0, _HEAD_BYTES)
    for ev in events:
        if ev.stage == PIPELINE_STAGE and ev.event == "start":
            return ev
    return None


def end_processes_of_ended_runs(journal_dir: Path, home: Path) -> list[int]:
    """Kill the processes (of this home) whose run has ended, or whose journal is gone and whose runner
    is dead; one pass over /proc. Returns the pids killed."""
    by_run: dict[str, list[StageProcess]] = {}
    for p in run_processes(home):
        by_run.setdefault(p.run_id, []).append(p)
    killed: list[int] = []
    for run_id, procs in sorted(by_run.items()):
        path = journal_path(journal_dir, run_id)
        if path.exists():
            last = JournalReader(path, run_id).last_event()
            if last is None or not last.is_terminal:
                continue  # not ended: this runner's own are recovered below; another's are not ours
            why = f"its run ended {last.event} ({last.msg})"
        else:
            procs = [p for p in procs if p.runner_pid is None or not is_alive(p.runner_pid)]
            why = f"its run has no journal in {journal_dir} and its runner is gone"
        pids = kill_processes(procs, why)
        if pids:
            log.warning("run %s: killed %d process(es) still running after their run: %s (%s)", run_id, len(pids), pids, why)
            killed.extend(pids)
    return killed


async def recover_interrupted_runs(
    journal_dir: Path, home: Path, runner_id: str, tz: ZoneInfo, publisher: Publisher,
    durability: str = "flush", group_commit_ms: float = 5.0,
    take_over: Callable[[JournalWriter], Awaitable[ChunkAppender]] | None = None,
) -> list[Recovered]:
    """`take_over` (cluster mode): a run's journal brought level with the event stream, and its
    appender there; the run's end then goes to the stream too. A run the stream has ended already
    (the scheduler declared this runner lost) is not recovered: its end is the scheduler's."""
    restored = restore_fences(journal_dir)
    if restored:
        log.warning("finished or undid %d journal fence(s) a process died in: %s", len(restored), ", ".join(restored))
    end_processes_of_ended_runs(journal_dir, home)
    out: list[Recovered] = []
    for run_id in list_run_ids(journal_dir):
        path = journal_path(journal_dir, run_id)
        reader = JournalReader(path, run_id)
        last = reader.last_event()
        if last is None or last.is_terminal:
            continue
        start = _start_event(reader)
        if start is None or (start.data or {}).get("runner") != runner_id:
            continue  # queued only (the scheduler's), or another runner's run
        try:
            writer = JournalWriter.open(journal_dir, run_id, tz, durability, group_commit_ms)  # type: ignore[arg-type]
        except JournalError as e:
            log.warning("run %s: interrupted run of this runner not recovered now: %s", run_id, e)
            continue
        stream = None
        if take_over is not None:
            try:
                stream = await take_over(writer)
            except (JournalError, ServiceUnavailable) as e:
                writer.close()
                log.warning("run %s: interrupted run of this runner not recovered now: %s", run_id, e)
                continue
        journal = RunJournal(writer, publisher, stream)
        try:
            if writer.ended:
                continue  # ended by someone else between our read and the lock
            killed = kill_run_processes(home, run_id, "left running by the previous runner")
            if killed:
                log.warning("run %s: killed %d process(es) left running by the previous runner: %s", run_id, len(killed), killed)
            attempt = int((start.data or {}).get("attempt", 1))
            last_seq = writer.last_seq
            msg = f"runner {runner_id} restarted: run interrupted (last seq {last_seq})"
            for stage, item in open_stages(fold(run_id, reader.read())):
                data = {"item": item} if item is not None else None
                await journal.emit(stage, "failure", f"interrupted: {msg}", data)
            end = await journal.emit(PIPELINE_STAGE, "failure", msg, {"runner": runner_id, "attempt": attempt, "last_seq": last_seq})
            if end is None:
                continue  # fenced meanwhile: the scheduler wrote the run's end (RunJournal said so)
            log.warning("run %s: %s; terminal failure written to %s", run_id, msg, path)
            out.append(Recovered(run_id, attempt, end.seq))
        finally:
            journal.close()
    return out
