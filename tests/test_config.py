"""The config schema: bad files are refused at load naming file, key and expectation; launch
parameters are checked against their declarations."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import settings_from_toml
from shared.errors import BadParams, ConfigError
from shared.params import resolve_params

BASE = """
[pipelines.p]
[pipelines.p.params.items]
type = "list"
default = ["a", "b"]
choices = ["a", "b", "c"]
[pipelines.p.params.n]
type = "int"
default = 1
[[pipelines.p.stages]]
name = "s"
command = ["true"]
fan_out = "items"
"""


def load(text: str, tmp_path: Path):  # noqa: ANN201
    path = tmp_path / "runwire.toml"
    return settings_from_toml(text, path)


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ("[gateway]\nprot = 8080\n", "gateway", "unknown field `prot`"),
        ("[gateway]\nport = \"x\"\n", "gateway.port", "Expected `int`"),
        ("[schedules.s]\npipeline = \"p\"\ncron = \"61 * * * *\"\n", "schedules.s.cron", "cron expression"),
        ("[schedules.s]\npipeline = \"q\"\nevery = \"5m\"\n", "schedules.s.pipeline", "configured pipeline"),
        ("[schedules.s]\npipeline = \"p\"\nevery = \"5m\"\ncron = \"* * * * *\"\n", "schedules.s", "exactly one of"),
        ("[schedules.s]\npipeline = \"p\"\nevery = \"5m\"\ntimezone = \"Mars/Olympus\"\n", "schedules.s.timezone", "IANA"),
        ("timezone = \"Nowhere\"\n", "timezone", "IANA"),
        ("[scheduler]\nkeep_days = -1\n", "scheduler.keep_days", "days >= 0"),
    ],
)
def test_bad_config_names_file_key_and_expectation(tmp_path: Path, extra: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(extra + BASE, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "runwire.toml") in msg and f"`{key}`" in msg and expected in msg, msg


def test_params_are_checked_against_their_declarations(tmp_path: Path) -> None:
    p = load(BASE, tmp_path).pipeline("p")
    assert resolve_params(p, {}) == {"items": ["a", "b"], "n": 1}
    assert resolve_params(p, {"items": ["c"], "n": 4}) == {"items": ["c"], "n": 4}
    for bad, words in [
        ({"items": ["a", "a"]}, "appears more than once"),
        ({"items": []}, "at least 1 item"),
        ({"items": ["z"]}, "not one of"),
        ({"n": "4"}, "expected int"),
        ({"n": True}, "expected int"),
        ({"colour": "red"}, "unknown parameter 'colour'"),
    ]:
        with pytest.raises(BadParams, match=words):
            resolve_params(p, bad)


@pytest.mark.parametrize(
    ("stage", "key", "expected"),
    [
        ('command = ["echo", "a\\u0000b"]', "pipelines.q.stages[0].command[1]", "without a NUL"),
        ('command = ["true"]\nenv = { "A\\u0000" = "1" }', "pipelines.q.stages[0].env", "without '=' or NUL"),
        ('command = ["true"]\nenv = { "A=B" = "1" }', "pipelines.q.stages[0].env", "without '=' or NUL"),
        ('command = ["true"]\nenv = { A = "x\\u0000" }', "pipelines.q.stages[0].env.A", "without a NUL"),
    ],
)
def test_a_nul_in_a_stage_command_or_env_is_refused_at_load(tmp_path: Path, stage: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(BASE + f'[[pipelines.q.stages]]\nname = "s"\n{stage}\n', tmp_path)
    msg = str(e.value)
    assert f"`{key}`" in msg and expected in msg, msg
