"""What a pipeline stage sees: the `StageContext` a Python callable receives, and the channel that
carries its logs, counters and metrics to the runner.

A callable stage `module:function` runs in a child process (so it can always be killed) and is called
as `function(ctx)`. Its messages travel as JSON lines over a pipe whose fd is in RUNWIRE_STAGE_FD; the
stage's facts (run, stage, item, params, home) are in RUNWIRE_STAGE_INFO. The runner turns them into
`log` and `metric` events and puts the counters into its periodic progress metric.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from .values import Object, Params

STAGE_FD_ENV = "RUNWIRE_STAGE_FD"
STAGE_INFO_ENV = "RUNWIRE_STAGE_INFO"


class StageInfo(msgspec.Struct, kw_only=True):
    run_id: str
    stage: str
    item: str | None = None
    attempt: int = 1
    params: Params = {}
    home: str


class StageMessage(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    pass


class LogMessage(StageMessage, tag="log"):
    msg: str
    data: Object | None = None  # type: ignore[valid-type]


class MetricMessage(StageMessage, tag="metric"):
    msg: str
    data: Object | None = None  # type: ignore[valid-type]


class CountersMessage(StageMessage, tag="counters"):
    values: dict[str, float]


AnyStageMessage = LogMessage | MetricMessage | CountersMessage
_encoder = msgspec.json.Encoder()
stage_message_decoder = msgspec.json.Decoder(AnyStageMessage)


class StageContext:
    """Handed to a callable stage: report logs, counters and metrics; read params, item and paths."""

    def __init__(self, info: StageInfo, send: Callable[[bytes], None]) -> None:
        self.info = info
        self._send = send
        self.counters: dict[str, float] = {}

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def stage(self) -> str:
        return self.info.stage

    @property
    def item(self) -> str | None:
        """The fan-out item this call handles (e.g. 'ES'), or None for a stage without fan-out."""
        return self.info.item

    @property
    def params(self) -> dict[str, Any]:
        return self.info.params

    @property
    def home(self) -> Path:
        return Path(self.info.home)

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def _emit(self, message: StageMessage) -> None:
        self._send(_encoder.encode(message) + b"\n")

    def log(self, msg: str, **data: Any) -> None:
        """A `log` event now."""
        self._emit(LogMessage(msg=msg, data=data or None))

    def metric(self, msg: str, **data: Any) -> None:
        """A `metric` event now (progress metrics are sent by the runner every progress_interval)."""
        self._emit(MetricMessage(msg=msg, data=data or None))

    def add(self, name: str, n: float = 1) -> None:
        """Increase a counter (e.g. files_written); counters ride on the runner's progress metric."""
        self.counters[name] = self.counters.get(name, 0) + n
        self._emit(CountersMessage(values={name: self.counters[name]}))

    def set(self, name: str, value: float) -> None:
        self.counters[name] = value
        self._emit(CountersMessage(values={name: value}))


def context_from_env() -> StageContext:
    """The context of the current child process, as set up by the runner."""
    try:
        fd = int(os.environ[STAGE_FD_ENV])
        info = msgspec.json.decode(os.environ[STAGE_INFO_ENV], type=StageInfo)
    except (KeyError, ValueError, msgspec.DecodeError) as e:
        raise RuntimeError(f"not started as a runwire stage ({STAGE_FD_ENV}/{STAGE_INFO_ENV} missing or bad): {e}") from e

    def send(line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]

    return StageContext(info, send)


def collecting_context(info: StageInfo) -> tuple[StageContext, list[StageMessage]]:
    """A context that keeps its messages in a list: for running a stage function in a test."""
    got: list[StageMessage] = []
    return StageContext(info, lambda line: got.append(stage_message_decoder.decode(line))), got


def info_to_env(info: StageInfo) -> str:
    return json.dumps(msgspec.to_builtins(info))
