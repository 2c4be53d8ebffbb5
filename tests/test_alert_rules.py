"""Alerts in-process: `[alerts.<name>]` validation (each bad value a ConfigError naming its key), which
alert takes which end, the webhook body, the retry delays, and the attempt log's reading."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from scheduler_svc.alert_rules import (
    RUNNER_LOST,
    RunFacts,
    choose,
    end_kinds,
    payload_of,
    rules_of,
    run_link_base,
)
from scheduler_svc.launches import EXPIRED
from scheduler_svc.runs import RunRecord
from shared.alertlog import AlertAttempt, alert_log_path, append_attempt, read_attempts, summarize
from shared.config import AlertConfig, GatewayConfig, settings_from_toml
from shared.errors import ConfigError, InvalidRunId

PIPELINES = """
[pipelines.p]
[[pipelines.p.stages]]
name = "s"
command = ["true"]
[pipelines.q]
[[pipelines.q.stages]]
name = "s"
command = ["true"]
"""


def load(alert: str) -> dict[str, AlertConfig]:
    return settings_from_toml(PIPELINES + "[alerts.a]\n" + alert, Path("/etc/runwire.toml")).config.alerts


def test_a_valid_alert_loads_with_its_defaults() -> None:
    a = load('url = "https://hooks.example.com/x?k=1"\non = ["failure", "long_run"]\nlong_run_after = "30m"\n'
             'pipelines = ["p"]\nheaders = { Authorization = "Bearer t" }')["a"]
    assert a.pipelines == ["p"] and a.retries == 5 and a.backoff == 2.0 and a.timeout == 10.0
    [rule] = rules_of({"a": a})
    assert rule.long_run_after == 1800.0 and rule.attempts == 6


@pytest.mark.parametrize("alert,key,says", [
    ('url = "ftp://x/y"\non = ["failure"]', "alerts.a.url", "http:// or https://"),
    ('url = "http://"\non = ["failure"]', "alerts.a.url", "with a host"),
    ('url = "http://h:port/"\non = ["failure"]', "alerts.a.url", "URL"),
    ('url = "http://h/"\non = []', "alerts.a.on", "at least one of failure, cancelled"),
    ('url = "http://h/"\non = ["fail"]', "alerts.a.on[0]", "fail"),
    ('url = "http://h/"\non = ["failure"]\npipelines = ["nope"]', "alerts.a.pipelines", "'nope'"),
    ('url = "http://h/"\non = ["long_run"]', "alerts.a.long_run_after", "required with `long_run`"),
    ('url = "http://h/"\non = ["long_run"]\nlong_run_after = "soon"', "alerts.a.long_run_after", "duration"),
    ('url = "http://h/"\non = ["failure"]\nlong_run_after = "5m"', "alerts.a.long_run_after", "only with `long_run`"),
    ('url = "http://h/"\non = ["failure"]\nretries = -1', "alerts.a.retries", ">= 0"),
    ('url = "http://h/"\non = ["failure"]\nbackoff = 0', "alerts.a.backoff", "> 0"),
    ('url = "http://h/"\non = ["failure"]\ntimeout = -1', "alerts.a.timeout", "> 0"),
    ('url = "http://h/"\non = ["failure"]\nbackoff = 10\nbackoff_max = 5', "alerts.a.backoff_max", "backoff"),
    ('url = "http://h/"\non = ["failure"]\nheaders = { "X Bad" = "v" }', "alerts.a.headers", "X Bad"),
    ('url = "http://h/"\non = ["failure"]\nheaders = { X = "a\\nb" }', "alerts.a.headers", "single-line"),
    ('url = "http://h/"\non = ["failure"]\nretry = 3', "alerts.a", "unknown field `retry`"),
    ('on = ["failure"]', "alerts.a", "url"),
])
def test_a_bad_alert_is_a_config_error_naming_its_key(alert: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(alert)
    assert f"`{key}`" in str(e.value) and says in str(e.value) and "/etc/runwire.toml" in str(e.value)


def rec(outcome: str, msg: str = "", pipeline: str = "p", started: bool = True) -> RunRecord:
    r = RunRecord(run_id="r1", pipeline=pipeline, params={}, phase="ended", outcome=outcome, msg=msg,
                  started_at="2026-01-01T00:00:01+00:00" if started else None)
    return r


def test_an_end_takes_the_first_kind_each_alert_wants() -> None:
    rules = rules_of({
        "all": AlertConfig(url="http://h/", on=["failure", "runner_lost", "cancelled", "skipped"]),
        "lost": AlertConfig(url="http://h/", on=["runner_lost"]),
        "failures-of-q": AlertConfig(url="http://h/", on=["failure"], pipelines=["q"]),
    })
    lost = rec("failure", f"{RUNNER_LOST}: no heartbeat from r for 4 s")
    assert end_kinds(lost, RunFacts.of(lost)) == ["runner_lost", "failure"]
    assert [(r.name, k) for r, k in choose(rules, "p", end_kinds(lost, RunFacts.of(lost)))] == [
        ("all", "runner_lost"), ("lost", "runner_lost")]
    failed = rec("failure", "stage boom failed", pipeline="q")
    assert [(r.name, k) for r, k in choose(rules, "q", end_kinds(failed, RunFacts.of(failed)))] == [
        ("all", "failure"), ("failures-of-q", "failure")]
    skipped = rec("cancelled", "overlap", started=False)
    assert end_kinds(skipped, RunFacts.of(skipped, skipped=True)) == ["skipped"]
    cancelled = rec("cancelled", "cancelled on request")
    assert end_kinds(cancelled, RunFacts.of(cancelled)) == ["cancelled"]
    expired = rec("cancelled", f"{EXPIRED} (deadline passed)", started=False)
    assert end_kinds(expired, RunFacts.of(expired)) == []  # nobody was told of that run
    assert end_kinds(rec("success"), RunFacts.of(rec("success"))) == []


def test_the_body_has_the_run_its_failed_stages_a_link_and_a_text() -> None:
    [rule] = rules_of({"ops": AlertConfig(url="http://h/", on=["failure"])})
    r = rec("failure", "stage boom failed (exit 3)")
    body = payload_of(rule, "failure", RunFacts.of(r, failed_stages=["boom"]),
                      run_link_base(GatewayConfig(host="127.0.0.1", port=8080)), "2026-01-01T00:00:02+00:00")
    assert body["id"] == "r1.ops.failure" and body["outcome"] == "failure" and body["failed_stages"] == ["boom"]
    assert body["url"] == "http://127.0.0.1:8080/#/runs/r1"
    assert body["text"] == "runwire: run r1 of p failed in boom: stage boom failed (exit 3) - http://127.0.0.1:8080/#/runs/r1"
    assert run_link_base(GatewayConfig(host="::1", port=9)) == "http://[::1]:9/"
    [long] = rules_of({"slow": AlertConfig(url="http://h/", on=["long_run"], long_run_after="10m")})
    running = RunRecord(run_id="r2", pipeline="p", params={}, phase="running")
    body = payload_of(long, "long_run", RunFacts.of(running), "http://g/", "t", running_for=725.5)
    assert body["outcome"] == "running" and body["running_for_s"] == 725.5
    assert body["text"].startswith("runwire: run r2 of p has been running for 12m 5s (alert after 10m 0s)")


def test_retries_back_off_doubling_up_to_the_cap() -> None:
    [rule] = rules_of({"a": AlertConfig(url="http://h/", on=["failure"], backoff=1.5, backoff_max=10.0)})
    assert [rule.backoff(n) for n in range(1, 6)] == [1.5, 3.0, 6.0, 10.0, 10.0]


def attempt(n: int, outcome: str, status: int | None = None, id: str = "r1.ops.failure") -> AlertAttempt:
    return AlertAttempt(id=id, alert=id.split(".")[1], kind="failure", attempt=n, time=f"t{n}", status=status,
                        error=None if outcome == "sent" else "HTTP 500", outcome=outcome)  # type: ignore[arg-type]


def test_the_attempt_log_is_read_back_skipping_bad_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert read_attempts(tmp_path, "r1") == []
    append_attempt(tmp_path, "r1", attempt(1, "retrying", 500))
    with alert_log_path(tmp_path, "r1").open("ab") as f:
        f.write(b'{"not": "an attempt"}\n')
    append_attempt(tmp_path, "r1", attempt(2, "sent", 200))
    append_attempt(tmp_path, "r1", attempt(1, "retrying", None, id="r1.other.failure"))
    with alert_log_path(tmp_path, "r1").open("ab") as f:
        f.write(b'{"id": "torn')
    with caplog.at_level(logging.WARNING):
        got = read_attempts(tmp_path, "r1")
    assert [(a.id, a.attempt) for a in got] == [("r1.ops.failure", 1), ("r1.ops.failure", 2), ("r1.other.failure", 1)]
    assert "line 2 skipped" in caplog.text and "torn last line" in caplog.text
    views = summarize(got)
    assert [(v.alert, v.outcome, v.attempts, v.status) for v in views] == [("ops", "sent", 2, 200),
                                                                           ("other", "retrying", 1, None)]
    with pytest.raises(InvalidRunId):
        read_attempts(tmp_path, "../escape")
