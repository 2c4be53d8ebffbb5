"""`python -m tests.faulty_runner`: the real runner, but with a fault planted past every check: after its
config is loaded and validated, stage `broken` of pipeline `raises` gets an environment value with a
NUL byte, which no input can carry any more (the config, the launch and the dispatch all refuse it).
Spawning that stage then raises outside the stage's own error handling: the stand-in for a bug in
execution, for tests/test_open_stages.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec

from runner_svc.main import main
from shared import entry
from shared.config import Settings

_load = entry.load_settings


def _with_fault(path: str | Path | None = None) -> Settings:
    settings = _load(path)
    pipeline = settings.config.pipelines["raises"]
    stages = [msgspec.structs.replace(st, env={"X": "a\x00b"}) if st.name == "broken" else st for st in pipeline.stages]
    pipelines = {**settings.config.pipelines, "raises": msgspec.structs.replace(pipeline, stages=stages)}
    return dataclasses.replace(settings, config=msgspec.structs.replace(settings.config, pipelines=pipelines))


entry.load_settings = _with_fault  # type: ignore[assignment]
raise SystemExit(main())
