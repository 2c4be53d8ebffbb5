"""What alerts say and when (`[alerts.<name>]`): which kinds an end is, which alerts want it, the
webhook's JSON body and its one-line `text`, and the retry delays. Pure: no sockets, no files, no clock
but the times passed in, so every decision is tested in-process. The delivery is `alerts.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.config import AlertConfig, GatewayConfig, parse_duration

from .launches import is_expired
from .runs import RunRecord

# The message the scheduler writes on the runs it fails for a runner that went silent (runners.py)
RUNNER_LOST = "runner lost"


@dataclass(frozen=True)
class Rule:
    name: str
    cfg: AlertConfig
    long_run_after: float | None  # seconds; None unless `long_run` is in `on`

    def wants(self, pipeline: str) -> bool:
        return not self.cfg.pipelines or pipeline in self.cfg.pipelines

    def backoff(self, failed_attempts: int) -> float:
        """Seconds before the next attempt after `failed_attempts` (>= 1): doubled each time, capped."""
        return min(self.cfg.backoff * 2 ** (failed_attempts - 1), self.cfg.backoff_max)

    @property
    def attempts(self) -> int:
        return 1 + self.cfg.retries


def rules_of(alerts: dict[str, AlertConfig]) -> list[Rule]:
    return [Rule(name, cfg, float(parse_duration(cfg.long_run_after)) if cfg.long_run_after else None)
            for name, cfg in alerts.items()]


@dataclass
class RunFacts:
    """A run as an alert describes it."""

    run_id: str
    pipeline: str
    outcome: str  # success | failure | cancelled, or running (a long run)
    msg: str = ""
    schedule: str | None = None
    slot: str | None = None
    queued_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    failed_stages: list[str] | None = None
    skipped: bool = False  # a schedule slot recorded as skipped (queued -> skipped -> cancelled)

    @classmethod
    def of(cls, rec: RunRecord, **more: Any) -> RunFacts:
        return cls(run_id=rec.run_id, pipeline=rec.pipeline, outcome=rec.outcome or rec.status, msg=rec.msg,
                   schedule=rec.schedule, slot=rec.slot, queued_at=rec.queued_at, started_at=rec.started_at,
                   ended_at=rec.ended_at, **more)


def needs_journal(rec: RunRecord) -> bool:
    """Does the kind of this end, or its alert, need the journal? (failed stages; a skipped slot)"""
    return rec.outcome == "failure" or (rec.outcome == "cancelled" and rec.started_at is None)


def end_kinds(rec: RunRecord, facts: RunFacts) -> list[str]:
    """The alert kinds an ended run is, the most specific first (an alert takes the first it wants)."""
    if rec.outcome == "failure":
        return ["runner_lost", "failure"] if rec.msg.startswith(RUNNER_LOST) else ["failure"]
    if rec.outcome == "cancelled":
        if facts.skipped:
            return ["skipped"]
        if is_expired(rec):  # a launch nobody was told of: the client gave up on it
            return []
        return ["cancelled"]
    return []


def delivery_id(run_id: str, alert: str, kind: str) -> str:
    return f"{run_id}.{alert}.{kind}"


def choose(rules: list[Rule], pipeline: str, kinds: list[str]) -> list[tuple[Rule, str]]:
    """(alert, kind) for each alert that wants one of `kinds` of a run of `pipeline`."""
    out: list[tuple[Rule, str]] = []
    for rule in rules:
        if not rule.wants(pipeline):
            continue
        for kind in kinds:
            if kind in rule.cfg.on:
                out.append((rule, kind))
                break
    return out


def run_link_base(gateway: GatewayConfig) -> str:
    """The dashboard's address, to which `#/runs/<run_id>` is added (gateway_svc/static/app.js routes)."""
    host = gateway.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{gateway.port}/"


def _duration(seconds: float) -> str:
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m}m {s}s" if h else f"{m}m {s}s" if m else f"{s}s"


def text_of(kind: str, f: RunFacts, link: str, running_for: float | None, rule: Rule) -> str:
    """One line for people (the Slack-compatible `text`)."""
    run = f"run {f.run_id} of {f.pipeline}"
    if kind == "failure":
        where = f" in {', '.join(f.failed_stages)}" if f.failed_stages else ""
        what = f"runwire: {run} failed{where}: {f.msg}"
    elif kind == "runner_lost":
        what = f"runwire: {run} failed: {f.msg}"
    elif kind == "cancelled":
        what = f"runwire: {run} was cancelled: {f.msg}"
    elif kind == "skipped":
        what = f"runwire: schedule {f.schedule} skipped its slot {f.slot} ({f.pipeline}): {f.msg}"
    else:  # long_run
        after = _duration(rule.long_run_after or 0)
        what = f"runwire: {run} has been running for {_duration(running_for or 0)} (alert after {after})"
    return f"{what} - {link}"


def payload_of(rule: Rule, kind: str, f: RunFacts, link_base: str, now: str,
               running_for: float | None = None) -> dict[str, Any]:
    """The webhook's JSON body."""
    link = f"{link_base}#/runs/{f.run_id}"
    return {
        "id": delivery_id(f.run_id, rule.name, kind),
        "alert": rule.name,
        "kind": kind,
        "run_id": f.run_id,
        "pipeline": f.pipeline,
        "outcome": f.outcome,
        "msg": f.msg,
        "failed_stages": f.failed_stages or [],
        "schedule": f.schedule,
        "slot": f.slot,
        "queued_at": f.queued_at,
        "started_at": f.started_at,
        "ended_at": f.ended_at,
        "running_for_s": round(running_for, 3) if running_for is not None else None,
        "url": link,
        "time": now,
        "text": text_of(kind, f, link, running_for, rule),
    }
