"""Fuzzing config files: hypothesis-generated TOML (unknown keys, wrong types, odd values in the keys
that are parsed further, deep nesting) through shared.config.settings_from_toml gives Settings or a
ConfigError naming the file, never another exception; and a bad config stops a real service at start
with a non-zero exit and a message naming the file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, strategies as st

from shared.config import Settings, settings_from_toml
from shared.errors import ConfigError
from tests.fuzzing import NUMBERISH, fuzz, hostile_text, json_values
from tests.harness import REPO

PATH = Path("/fuzz/dir/runwire-fuzz.toml")


def toml_key(key: str) -> str:
    return json.dumps(key)  # a quoted key: TOML basic strings take JSON's escapes


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def to_toml(doc: dict[str, Any]) -> str:
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{toml_key(k)}]")
            lines += [f"{toml_key(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


values = st.one_of(json_values, NUMBERISH, hostile_text, st.floats(), st.integers(-2**70, 2**70))

SECTIONS: dict[str, list[str]] = {
    "scheduler": ["control", "dispatch", "publish", "max_concurrent_runs", "runner_lost_after", "request_timeout", "keep_days"],
    "runner": ["publish", "control", "id", "capacity", "heartbeat_interval", "send_hwm", "durability", "group_commit_ms", "kill_grace"],
    "gateway": ["host", "port", "subscribe", "client_queue_events", "client_queue_bytes", "send_timeout", "max_body_bytes", "runner_stale_after"],
}
STAGE_KEYS = ["name", "command", "callable", "timeout", "progress_interval", "log_rate", "fan_out", "max_parallel",
              "item_policy", "on_failure", "retries", "retry_backoff", "requires", "outputs", "success_marker",
              "marker_grace", "env"]
PARAM_KEYS = ["type", "default", "description", "choices", "pattern", "min_items"]
SCHEDULE_KEYS = ["pipeline", "cron", "every", "anchor", "timezone", "params", "enabled", "fire_at_start",
                 "misfire_grace", "misfire", "catch_up_max", "overlap"]
# values a validator parses further: regexes, cron, durations, zones, times
TRICKY = st.sampled_from(["(", "[a-", "*/0 * * * *", "61 * * * *", "* * * * * * *", "0m", "-5m", "1x", "9" * 30 + "s",
                          "Mars/Olympus", "../../etc/localtime", "UTC\x00", "", "2026-02-30T00:00:00", "T", "stop",
                          "{x}", "a/b", "\x00", "x" * 300, "callable:", ":", "os:system"])


def _table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), st.one_of(values, TRICKY), max_size=5)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(["home", "timezone", "log_level", "bogus"]), max_size=3, unique=True)):
        doc[key] = draw(st.one_of(values, TRICKY))
    for section, keys in SECTIONS.items():
        if draw(st.booleans()):
            doc[section] = draw(_table(keys))
    if draw(st.booleans()):
        stage = {"name": draw(st.one_of(st.just("s"), TRICKY)), "command": ["echo", "{x}"], **draw(_table(STAGE_KEYS))}
        pipeline = {"stages": draw(st.one_of(st.just([stage]), values)),
                    "params": {"x": {"type": "str", **draw(_table(PARAM_KEYS))}}, **draw(_table(["description", "max_concurrent", "zzz"]))}
        doc["pipelines"] = {draw(st.one_of(st.just("p"), TRICKY)): pipeline}
        if draw(st.booleans()):
            doc["schedules"] = {"s": {"pipeline": draw(st.sampled_from(["p", "nope"])), "every": "15m", **draw(_table(SCHEDULE_KEYS))}}
    return doc


def _check(text: str) -> None:
    try:
        result = settings_from_toml(text, PATH)
    except ConfigError as e:
        assert str(PATH) in str(e), e
        return
    assert isinstance(result, Settings)


@pytest.mark.timeout(180)  # 400 generated configs, in-process: ~8 s alone, 30 s and more on a loaded machine
@fuzz(400)
@given(doc=configs())
@example(doc={"gateway": {"port": "8080"}})
@example(doc={"scheduler": {"max_concurrent_runs": 2**64}})
@example(doc={"pipelines": {"p": {"stages": [{"name": "s", "command": ["x"]}], "params": {"x": {"type": "str", "pattern": "("}}}}})
@example(doc={"schedules": {"s": {"pipeline": "p", "cron": "*/0 * * * *"}}, "pipelines": {"p": {"stages": [{"name": "s", "command": ["x"]}]}}})
@example(doc={"timezone": "UTC\x00"})
@example(doc={"timezone": "x" * 300})  # found in CI: ZoneInfo raised OSError (file name too long)
@example(doc={"home": "\x00"})  # found in CI: resolving the home raised ValueError
def test_generated_configs_give_settings_or_a_config_error_naming_the_file(doc: dict[str, Any]) -> None:
    _check(to_toml(doc))


@fuzz(200)
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
@example(text="a = " + "[" * 5000 + "]" * 5000)
@example(text="a = " + "{a = " * 5000 + "1" + "}" * 5000)
@example(text="[gateway]\nport = " + "[" * 3000 + "]" * 3000)
@example(text="[" + "a." * 5000 + "a]")
@example(text="\x00")
def test_random_text_gives_settings_or_a_config_error_naming_the_file(text: str) -> None:
    _check(text)


@pytest.mark.parametrize("text", [
    "[gateway]\nprot = 1\n",
    "timezone = 5\n",
    "a = " + "[" * 5000 + "]" * 5000 + "\n",
    "[scheduler]\nmax_concurrent_runs = 0\n",
    "\xff\xfe garbage",
], ids=["unknown-key", "wrong-type", "deep-nesting", "bad-value", "garbage"])
def test_a_bad_config_stops_the_scheduler_at_start_naming_the_file(tmp_path: Path, text: str) -> None:
    config = tmp_path / "bad-runwire.toml"
    config.write_bytes(text.encode("utf-8", "surrogateescape") if text.isascii() else text.encode("latin-1"))
    proc = subprocess.run([sys.executable, "-m", "scheduler_svc", "--config", str(config)], cwd=str(REPO),
                          capture_output=True, timeout=60, text=True)
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert str(config) in proc.stderr + proc.stdout, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
