"""Cluster mode: re-runs of any run in the cluster's database, not only those of this term's run book
(a run that ended before a takeover is known by its row). A re-run from the failed stage is refused:
it skips the earlier stages only when their outputs are present, and those are on the host of the
runner that ran them, which the scheduler cannot look at (nor choose for the re-run)."""

from __future__ import annotations

from runwire_cluster.runs import LeaderState
from shared.config import PipelineConfig, Settings
from shared.errors import Conflict, NotFound

from .cluster_journaling import record_from_row
from .journaling import Journaling
from .reruns import Reruns
from .runbook import RunBook
from .runs import RunRecord


class ClusterReruns(Reruns):
    def __init__(self, book: RunBook, settings: Settings, journaling: Journaling, leader: LeaderState) -> None:
        super().__init__(book, settings, journaling)
        self.leader = leader

    async def _record(self, run_id: str) -> RunRecord:
        rec = self.book.get(run_id)
        if rec is not None:
            return rec
        row = await self.leader.run(run_id)
        if row is None:
            raise NotFound(f"run {run_id} not found in the cluster's runs ({self.leader.state.where})")
        return record_from_row(row)

    async def _from_failed(self, rec: RunRecord, pipeline: PipelineConfig) -> tuple[str, list[str]]:
        raise Conflict(f"run {rec.run_id}: a re-run from the failed stage is not available in cluster mode (the "
                       "earlier stages' outputs are on the host of the runner that ran them, which the scheduler "
                       "cannot check); re-run without --from-failed")
