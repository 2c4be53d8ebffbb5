"""Re-runs on request: a new run of an ended run's pipeline and parameters, linked to it (`rerun_of` in
the new run's `queued` data; the gateway lists each run's re-runs from those events).

From the failed stage (`from_failed`): the new run starts at the first stage of the original that did
not succeed (failed, cancelled, or never ended), and the stages before it are skipped by the runner,
journaled as skipped ("outputs present from run X"). That is only sound when each of those stages
declares `outputs` and they are present under home now, so the request is refused (Conflict, naming
the stage and the globs) otherwise. The queued event records `from_stage`; the dispatch carries it to
the runner, which checks the outputs again before it skips a stage (and runs the stage if they went).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio

from shared.config import PipelineConfig, Settings
from shared.control import Rerun
from shared.errors import Conflict, NotFound
from shared.ids import check_run_id, new_run_id
from shared.journal import read_events
from shared.outputs import missing_outputs
from shared.params import resolve_params
from shared.replies import RerunResult
from shared.runstate import RunState, fold

from .journaling import Journaling
from .runbook import RunBook
from .runs import RunRecord

log = logging.getLogger(__name__)

_DONE = ("success", "skipped")  # a stage in one of these needs no running again


def first_unfinished(state: RunState, pipeline: PipelineConfig) -> str | None:
    """The first stage of the pipeline (config order) that did not succeed or skip in `state`."""
    for stage in pipeline.stages:
        st = state.stages.get(stage.name)
        if st is None or st.status not in _DONE:
            return stage.name
    return None


def check_earlier_outputs(home: Path, pipeline: PipelineConfig, from_stage: str, run_id: str) -> list[str]:
    """The stages before `from_stage`, each with declared outputs present under home; Conflict naming
    the first stage that has none declared, or whose outputs match nothing."""
    earlier = []
    for stage in pipeline.stages:
        if stage.name == from_stage:
            break
        if not stage.outputs:
            raise Conflict(f"run {run_id}: cannot re-run from stage {from_stage}: earlier stage {stage.name} declares "
                           "no outputs (add `outputs = [...]` to it), so whether its work is done is unknown; "
                           "re-run without --from-failed")
        missing = missing_outputs(home, stage.outputs)
        if missing:
            raise Conflict(f"run {run_id}: cannot re-run from stage {from_stage}: the outputs of earlier stage "
                           f"{stage.name} match nothing under {home}: {', '.join(missing)}; re-run without --from-failed")
        earlier.append(stage.name)
    return earlier


class Reruns:
    def __init__(self, book: RunBook, settings: Settings, journaling: Journaling) -> None:
        self.book = book
        self.settings = settings
        self.journaling = journaling

    async def rerun(self, req: Rerun) -> RerunResult:
        run_id = check_run_id(req.run_id)
        rec = await self._record(run_id)
        if not rec.ended:
            raise Conflict(f"run {run_id} has not ended ({rec.status}); re-run it once it has ended")
        pipeline = self.settings.pipeline(rec.pipeline)  # UnknownPipeline: gone from the config
        params = resolve_params(pipeline, rec.params)  # BadParams: the config's parameters changed since
        from_stage: str | None = None
        skipped: list[str] = []
        if req.from_failed:
            from_stage, skipped = await self._from_failed(rec, pipeline)
        trigger: dict[str, Any] = {"trigger": "rerun", "rerun_of": run_id}
        if from_stage is not None:
            trigger["from_stage"] = from_stage
        how = f" from stage {from_stage}" if from_stage else ""
        new = await self.journaling.queue_run(rec.pipeline, params, trigger, new_run_id(),
                                              f"{rec.pipeline} queued: re-run of {run_id}{how}")
        log.info("run %s (%s) queued: re-run of %s%s%s", new.run_id, rec.pipeline, run_id, how,
                 f", skipping {', '.join(skipped)} (outputs present)" if skipped else "")
        return RerunResult(run_id=new.run_id, status="queued", rerun_of=run_id, from_stage=from_stage,
                           skipped_stages=skipped)

    async def _record(self, run_id: str) -> RunRecord:
        """The run to repeat; NotFound when there is none."""
        rec = self.book.get(run_id)
        if rec is None:
            raise NotFound(f"run {run_id} not found in {self.settings.journal_dir}")
        return rec

    async def _from_failed(self, rec: RunRecord, pipeline: PipelineConfig) -> tuple[str, list[str]]:
        """(the stage to start from, the earlier stages to skip): from its journal, and the earlier
        stages' outputs on this host."""
        return await anyio.to_thread.run_sync(self._from_failed_sync, rec, pipeline)

    def _from_failed_sync(self, rec: RunRecord, pipeline: PipelineConfig) -> tuple[str, list[str]]:
        state = fold(rec.run_id, read_events(self.settings.journal_dir, rec.run_id))
        from_stage = first_unfinished(state, pipeline)
        if from_stage is None:
            raise Conflict(f"run {rec.run_id} ({rec.outcome}): every stage succeeded or was skipped, so there is no "
                           "failed stage to re-run from; re-run without --from-failed")
        return from_stage, check_earlier_outputs(self.settings.home, pipeline, from_stage, rec.run_id)
