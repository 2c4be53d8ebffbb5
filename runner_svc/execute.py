"""Executing one run's pipeline: stages in order, each attempt a killable process group, with fan-out
over items, retries with backoff, `requires`/`outputs` globs, progress metrics and capped logs. Every
stage ends with an event (success, failure, skipped or cancelled), so no stage is left "running"."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from shared.config import PipelineConfig, StageConfig
from shared.errors import BadCommand
from shared.events import Event, EventDraft
from shared.outputs import first_match, missing_outputs
from shared.stage import STAGE_INFO_ENV, CountersMessage, LogMessage, MetricMessage, StageInfo, StageMessage, info_to_env

from . import child
from .argv import fill_argv
from .child import RUNNER_PID_ENV
from .logcap import LogCap
from .procs import RUN_ID_ENV
from .publish import RunJournal
from .report import ItemReport, RunReport, StageReport
from .stageproc import run_process

log = logging.getLogger(__name__)

_cancelled = anyio.get_cancelled_exc_class
CHILD_SCRIPT = str(Path(child.__file__).resolve())


@dataclass
class StageOutcome:
    status: str  # success, failure, skipped
    msg: str


def _ts(ev: Event | None) -> str | None:
    return ev.timestamp if ev is not None else None


class RunExecution:
    """Runs the stages of one run, writing their events through the run's journal."""

    def __init__(
        self,
        *,
        home: Path,
        runner_id: str,
        run_id: str,
        attempt: int,
        pipeline: PipelineConfig,
        params: dict[str, Any],
        journal: RunJournal,
        report: RunReport,
        kill_grace: float,
        cancel_reason: Callable[[], str],
        from_stage: str | None = None,
        rerun_of: str | None = None,
    ) -> None:
        self.home = home
        self.runner_id = runner_id
        self.run_id = run_id
        self.attempt = attempt
        self.pipeline = pipeline
        self.params = params
        self.journal = journal
        self.report = report
        self.kill_grace = kill_grace
        self.cancel_reason = cancel_reason
        # a re-run from a failed stage (the queued event's data says so): the stages before it are
        # skipped while their declared outputs are present
        self.from_stage = from_stage if any(s.name == from_stage for s in pipeline.stages) else None
        self.rerun_of = rerun_of
        self._ended_stages: set[str] = set()
        for stage in pipeline.stages:
            report.stage(stage.name)

    async def emit(self, stage: str, event: str, msg: str = "", data: dict[str, Any] | None = None) -> Event | None:
        return await self.journal.emit(stage, event, msg, data)

    async def emit_shielded(self, stage: str, event: str, msg: str = "", data: dict[str, Any] | None = None) -> Event | None:
        with anyio.CancelScope(shield=True):
            ev = await self.journal.emit(stage, event, msg, data)
        return ev

    # ------------------------------------------------------------------------------------- pipeline

    async def execute(self) -> tuple[str, str]:
        """Run every stage; return the run's outcome ("success" or "failure") and why. Cancellation
        propagates after every stage has its event (the caller writes the terminal `cancelled`)."""
        failed: list[tuple[str, str]] = []
        stop_reason: str | None = None
        resuming = self.from_stage is not None
        try:
            for stage in self.pipeline.stages:
                if stop_reason is not None:
                    await self._skip(stage, stop_reason)
                    continue
                resuming = resuming and stage.name != self.from_stage
                if resuming and await self._skip_done(stage):
                    continue
                outcome = await self.run_stage(stage)
                if outcome.status == "failure":
                    failed.append((stage.name, outcome.msg))
                    if stage.on_failure == "stop":
                        stop_reason = f"not run: stage {stage.name} failed"
        except _cancelled():
            with anyio.CancelScope(shield=True):
                for stage in self.pipeline.stages:
                    if stage.name not in self._ended_stages:
                        await self._skip(stage, f"not run: run cancelled ({self.cancel_reason()})")
            raise
        n = len(self.pipeline.stages)
        if not failed:
            skipped = [s for s, r in self.report.stages.items() if r.status == "skipped"]
            extra = f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else ""
            return "success", f"{n} of {n} stages done{extra}"
        if len(failed) == 1:
            name, why = failed[0]
            return "failure", f"stage {name} failed: {why}"
        return "failure", f"{len(failed)} stages failed: " + "; ".join(f"{name}: {why}" for name, why in failed)

    async def _skip_done(self, stage: StageConfig) -> bool:
        """A stage before the re-run's starting stage: skipped when its outputs are there (checked again
        here: the scheduler checked them when the re-run was asked for), else run."""
        missing = missing_outputs(self.home, stage.outputs) if stage.outputs else ["(no outputs declared)"]
        if missing:
            await self.emit(stage.name, "log", f"{stage.name}: run again: outputs of run {self.rerun_of} missing "
                            f"now ({', '.join(missing)})", {"source": "runner", "missing": missing})
            return False
        await self._skip(stage, f"outputs present from run {self.rerun_of}",
                         {"rerun_of": self.rerun_of, "outputs": stage.outputs})
        return True

    async def _skip(self, stage: StageConfig, reason: str, data: dict[str, Any] | None = None) -> StageOutcome:
        ev = await self.emit(stage.name, "skipped", reason, data)
        self.report.stage(stage.name).finish("skipped", _ts(ev), reason)
        self._ended_stages.add(stage.name)
        return StageOutcome("skipped", reason)

    # ---------------------------------------------------------------------------------------- stage

    def _items(self, stage: StageConfig) -> list[str] | None:
        if stage.fan_out is None:
            return None
        if isinstance(stage.fan_out, str):
            value = self.params.get(stage.fan_out, [])
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        return [str(v) for v in stage.fan_out]

    async def run_stage(self, stage: StageConfig) -> StageOutcome:
        rep = self.report.stage(stage.name)
        if stage.requires and first_match(self.home, stage.requires) is None:
            return await self._skip(
                stage, f"skipped: requires {stage.requires!r}, which matches nothing under {self.home}",
                {"requires": stage.requires},
            )
        items = self._items(stage)
        if items is not None and not items:
            return await self._skip(stage, f"skipped: no items to fan out over ({stage.fan_out!r} is empty)")
        what = f"{stage.name} started" + (f" over {len(items)} items ({stage.max_parallel} at once)" if items else "")
        ev = await self.emit(stage.name, "start", what, {"items": items} if items else None)
        rep.begin(_ts(ev) or "")
        cap = LogCap(stage.log_rate, lambda msg, data: self.emit(stage.name, "log", msg, {**data, "source": "runner"}))
        data: dict[str, Any] | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report_held_back, cap)
                if items is None:
                    ok, msg = await self._invoke(stage, None, cap, rep)
                else:
                    ok, msg, data = await self._fan_out(stage, items, cap, rep)
                tg.cancel_scope.cancel()
            await cap.report(final=True)
            if ok and stage.outputs:
                missing = missing_outputs(self.home, stage.outputs)
                if missing:
                    ok = False
                    msg = f"declared outputs match nothing under {self.home}: {', '.join(missing)} ({msg})"
        except _cancelled():
            with anyio.CancelScope(shield=True):
                await cap.report(final=True)
                reason = self.cancel_reason()
                ev = await self.emit(stage.name, "cancelled", f"{stage.name} cancelled: {reason}")
                rep.finish("cancelled", _ts(ev), reason)
                self._ended_stages.add(stage.name)
            raise
        status = "success" if ok else "failure"
        if cap.held_total:
            data = {**(data or {}), "log_lines_held_back": cap.held_total}
        ev = await self.emit(stage.name, status, msg, data)
        rep.finish(status, _ts(ev), msg)
        if rep.items:
            totals: dict[str, float] = {}
            for item in rep.items.values():
                for k, v in item.counters.items():
                    totals[k] = totals.get(k, 0) + v
            rep.counters = totals
        self._ended_stages.add(stage.name)
        return StageOutcome(status, msg)

    async def _report_held_back(self, cap: LogCap) -> None:
        while True:
            await anyio.sleep(1.0)
            await cap.report()

    async def _fan_out(
        self, stage: StageConfig, items: list[str], cap: LogCap, rep: StageReport
    ) -> tuple[bool, str, dict[str, Any]]:
        limiter = anyio.CapacityLimiter(stage.max_parallel)
        results: dict[str, tuple[bool, str]] = {}
        for item in items:
            rep.items[item] = ItemReport(status="pending")

        async def one(item: str) -> None:
            async with limiter:
                irep = rep.items[item]
                ev = await self.emit(stage.name, "start", f"{stage.name} [{item}] started", {"item": item})
                irep.begin(_ts(ev) or "")
                try:
                    ok, msg = await self._invoke(stage, item, cap, irep)
                except _cancelled():
                    reason = self.cancel_reason()
                    ev = await self.emit_shielded(stage.name, "cancelled", f"{stage.name} [{item}] cancelled: {reason}", {"item": item})
                    irep.finish("cancelled", _ts(ev), reason)
                    raise
                status = "success" if ok else "failure"
                ev = await self.emit(stage.name, status, msg, {"item": item})
                irep.finish(status, _ts(ev), msg)
                results[item] = (ok, msg)

        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(one, item)
        failed = [i for i in items if not results[i][0]]
        succeeded = [i for i in items if results[i][0]]
        data = {"items_succeeded": succeeded, "items_failed": failed}
        ok = not failed if stage.item_policy == "all" else bool(succeeded)
        if not failed:
            return ok, f"all {len(items)} items succeeded", data
        detail = "; ".join(f"{i}: {results[i][1]}" for i in failed)
        need = "every item must succeed" if stage.item_policy == "all" else "at least one item must succeed"
        return ok, f"{len(failed)} of {len(items)} items failed ({need}): {detail}", data

    # ----------------------------------------------------------------------------- attempts/process

    async def _invoke(self, stage: StageConfig, item: str | None, cap: LogCap, rep: ItemReport) -> tuple[bool, str]:
        """One stage (or one item of it) with its retries: (succeeded, why)."""
        total = stage.retries + 1
        msg = ""
        for attempt in range(1, total + 1):
            rep.attempts = attempt
            ok, msg = await self._attempt(stage, item, attempt, cap, rep)
            if ok:
                return True, msg if attempt == 1 else f"{msg} (attempt {attempt} of {total})"
            if attempt < total:
                delay = stage.retry_backoff * 2 ** (attempt - 1)
                data: dict[str, Any] = {"attempt": attempt + 1, "failed_attempt": attempt, "retry_in_s": delay}
                if item is not None:
                    data["item"] = item
                await self.emit(stage.name, "log", f"attempt {attempt} of {total} failed ({msg}); retrying in {delay:g}s", data)
                await anyio.sleep(delay)
        return False, msg if total == 1 else f"{msg} (after {total} attempts)"

    def _placeholders(self, stage: StageConfig, item: str | None) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.params)
        values.update(home=str(self.home), run_id=self.run_id, stage=stage.name)
        if item is not None:
            values["item"] = item
        return values

    async def _attempt(self, stage: StageConfig, item: str | None, attempt: int, cap: LogCap, rep: ItemReport) -> tuple[bool, str]:
        label = stage.name if item is None else f"{stage.name} [{item}]"
        item_data: dict[str, Any] = {} if item is None else {"item": item}
        values = self._placeholders(stage, item)
        try:
            stage_env = {k: fill_argv([v], values)[0] for k, v in stage.env.items()}
            if stage.command is not None:
                # the bootstrap as a plain script without `site` (-S): it needs the standard library only,
                # and starts ~4x faster than `-m runner_svc.child`, which matters for short commands
                argv = [sys.executable, "-S", CHILD_SCRIPT, "--exec", "--", *fill_argv(stage.command, values)]
            else:
                assert stage.callable is not None
                argv = [sys.executable, "-m", "runner_svc.child", stage.callable]
        except BadCommand as e:
            return False, f"bad command: {e}"
        info = StageInfo(run_id=self.run_id, stage=stage.name, item=item, attempt=attempt, params=self.params, home=str(self.home))
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            RUN_ID_ENV: self.run_id,
            "RUNWIRE_STAGE": stage.name,
            "RUNWIRE_HOME": str(self.home),
            RUNNER_PID_ENV: str(os.getpid()),
            STAGE_INFO_ENV: info_to_env(info),
            **({"RUNWIRE_ITEM": item} if item is not None else {}),
            **stage_env,
        }
        counters: dict[str, float] = {}
        t0 = time.monotonic()

        name = stage.name

        async def on_lines(stream: str, lines: list[str]) -> None:
            admitted = cap.admit_many(len(lines))
            if admitted:
                data = {"stream": stream, **item_data}  # one dict for the batch: events are never changed
                await self.journal.emit_many([(name, "log", line, data) for line in lines[:admitted]])

        async def on_messages(messages: Sequence[StageMessage]) -> None:
            drafts: list[EventDraft] = []
            for message in messages:
                if isinstance(message, MetricMessage):
                    data = message.data if message.data is not None else {}  # decoded for us: ours to keep
                    if item_data:
                        data = {**data, **item_data}
                    drafts.append((name, "metric", message.msg, data))
                elif isinstance(message, LogMessage):
                    if cap.admit():
                        drafts.append((name, "log", message.msg, {**(message.data or {}), "source": "stage", **item_data}))
                elif isinstance(message, CountersMessage):
                    # counters travel as floats; a whole number is shown as one (3, not 3.0)
                    counters.update({k: int(v) if float(v).is_integer() else v for k, v in message.values.items()})
            if drafts:
                await self.journal.emit_many(drafts)

        async def on_note(text: str) -> None:
            await self.emit(stage.name, "log", f"{label}: {text}", {"source": "runner", **item_data})

        def progress_data() -> dict[str, Any]:
            return {**counters, "elapsed_s": round(time.monotonic() - t0, 3), **item_data}

        async def progress() -> None:
            while True:
                await anyio.sleep(stage.progress_interval)
                await self.emit(stage.name, "metric", f"{label} running for {time.monotonic() - t0:.0f}s", progress_data())

        async with anyio.create_task_group() as tg:
            tg.start_soon(progress)
            try:
                result = await run_process(
                    argv, cwd=self.home, env=env, timeout=stage.timeout, kill_grace=self.kill_grace,
                    success_marker=stage.success_marker, marker_grace=stage.marker_grace,
                    on_lines=on_lines, on_messages=on_messages, on_note=on_note,
                    what=f"run {self.run_id} stage {label}",
                )
            except OSError as e:  # the interpreter itself could not be started: say so, do not crash the run
                tg.cancel_scope.cancel()
                return False, f"cannot start the stage process: {e}"
            finally:
                rep.counters = dict(counters)
            tg.cancel_scope.cancel()
        if counters:
            await self.emit(stage.name, "metric", f"{label} counters at its end", progress_data())
        elapsed = time.monotonic() - t0
        if result.ok:
            how = "ended after its success marker" if result.ended_by_marker else "succeeded"
            return True, f"{label} {how} in {elapsed:.1f}s"
        return False, f"{label} {result.describe(stage.timeout)}"
