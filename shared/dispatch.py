"""The channel between the scheduler and its runners: runners connect a DEALER (routing id = runner id)
to the scheduler's `dispatch` ROUTER. MessagePack, one frame per message, tagged by `type`.

Ownership of a run's journal passes once, with `DispatchRun`: until then the scheduler (which wrote
`queued`) owns it; after `RunAccepted` the runner is its only writer, until it sends `RunFinished`,
or until the scheduler declares the runner lost (no `RunnerStatus` within `runner_lost_after`) and
takes the journal back to write the terminal `failure`. Every run message carries the attempt number,
so a late message from a runner declared lost is recognised and ignored (fencing).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .values import Params


class RunnerMessage(msgspec.Struct, tag_field="type", kw_only=True):
    runner_id: str


class RunnerStatus(RunnerMessage, tag="status"):
    """Sent on connect and every heartbeat interval: proof of life, capacity, and the runs it owns."""

    capacity: int
    pid: int
    version: str
    config_path: str
    journal_dir: str
    publish: str
    control: str
    runs: dict[str, int] = {}  # run_id -> attempt, every run this runner owns now


class RunAccepted(RunnerMessage, tag="accepted"):
    run_id: str
    attempt: int


class RunRejected(RunnerMessage, tag="rejected"):
    """The runner could not take the run (journal unusable, pipeline unknown to it); it wrote nothing."""

    run_id: str
    attempt: int
    reason: str


class RunFinished(RunnerMessage, tag="finished"):
    run_id: str
    attempt: int
    outcome: Literal["success", "failure", "cancelled"]


class SchedulerMessage(msgspec.Struct, tag_field="type", kw_only=True):
    run_id: str
    attempt: int


class DispatchRun(SchedulerMessage, tag="dispatch"):
    pipeline: str
    params: Params = {}
    # a re-run from a failed stage: the stages before `from_stage` are skipped while their declared
    # outputs are present; both come from the run's `queued` event (the journal stays the truth)
    from_stage: str | None = None
    rerun_of: str | None = None


class CancelRun(SchedulerMessage, tag="cancel"):
    reason: str = "cancelled on request"


class ReleaseRun(SchedulerMessage, tag="release"):
    """The scheduler has ended this run without the runner (declared lost): stop it, write nothing."""

    reason: str


FromRunner = RunnerStatus | RunAccepted | RunRejected | RunFinished
FromScheduler = DispatchRun | CancelRun | ReleaseRun

_encoder = msgspec.msgpack.Encoder()
from_runner_decoder = msgspec.msgpack.Decoder(FromRunner)
from_scheduler_decoder = msgspec.msgpack.Decoder(FromScheduler)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)
