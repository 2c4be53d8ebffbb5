"""The one configuration file (`runwire.toml`) read by all three services: its schema and its loading.

Unknown keys and wrong types fail at load with the file, the key path and what was expected. Paths are
made absolute once, here: the state directory is `home` (relative to the config file's folder) or
`RUNWIRE_HOME` (relative to the working directory), and journals live in `<home>/events/`.

(Over 400 lines on purpose: each section's struct and its validation sit side by side, in the order the
file reads; parameters, their own concept, are in shared/params.py.)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from .errors import BadParams, ConfigError, UnknownPipeline
from .events import is_valid_stage_name
from .params import ParamSpec, check_param_value, resolve_params
from .values import Params

CONFIG_ENV = "RUNWIRE_CONFIG"
HOME_ENV = "RUNWIRE_HOME"
TOKEN_ENV = "RUNWIRE_TOKEN"
DEFAULT_CONFIG_NAME = "runwire.toml"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Config tables refuse keys they do not know: a typo fails at start, naming the key."""


class SchedulerConfig(_Strict, frozen=True):
    control: str = "tcp://127.0.0.1:5555"  # ROUTER for the gateway and the CLI
    dispatch: str = "tcp://127.0.0.1:5557"  # ROUTER that runners connect to
    publish: str = "tcp://127.0.0.1:5559"  # PUB of the events the scheduler writes (queued, ends it decides)
    max_concurrent_runs: int = 4
    runner_lost_after: float = 10.0  # seconds without a runner heartbeat before its runs fail
    request_timeout: float = 5.0
    keep_days: float = 0.0  # ended runs last written longer ago lose journal and report; 0: keep every run


class RunnerConfig(_Strict, frozen=True):
    publish: str = "tcp://127.0.0.1:5556"  # PUB of the event stream (the contract's default)
    control: str = "tcp://127.0.0.1:5558"  # ROUTER for identity and the doctor's probe
    id: str = ""  # default: the host name (stable across restarts: a restarted runner finds its runs)
    capacity: int = 4  # runs at once
    heartbeat_interval: float = 1.0
    send_hwm: int = 100_000
    durability: Literal["flush", "fsync"] = "flush"
    group_commit_ms: float = 5.0
    kill_grace: float = 5.0  # seconds between TERM and KILL of a stage's process group


class GatewayConfig(_Strict, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8080
    # PUB endpoints to subscribe to: every runner's and the scheduler's
    subscribe: list[str] = msgspec.field(default_factory=lambda: ["tcp://127.0.0.1:5556", "tcp://127.0.0.1:5559"])
    client_queue_events: int = 20_000
    client_queue_bytes: int = 16 * 1024 * 1024
    send_timeout: float = 10.0
    max_body_bytes: int = 64 * 1024
    runner_stale_after: float = 5.0  # heartbeat age after which /healthz calls a runner unreachable


class StageConfig(_Strict, frozen=True):
    name: str
    command: list[str] | None = None  # argv, never a shell; "{param}", "{item}", "{home}", "{run_id}" filled
    callable: str | None = None  # "module:function", run in a child process
    timeout: float = 3600.0
    progress_interval: float = 60.0
    log_rate: int = 200  # log events per second per stage; beyond it lines are counted and summarised
    fan_out: list[str] | str | None = None  # items, or the name of a list parameter
    max_parallel: int = 4
    item_policy: Literal["all", "any"] = "all"  # which fan-out items must succeed for the stage
    on_failure: Literal["stop", "continue"] = "stop"
    retries: int = 0
    retry_backoff: float = 1.0  # seconds before the first retry, doubled each time
    requires: str | None = None  # glob (relative to home) that must match, else the stage is skipped
    outputs: list[str] = []  # globs (relative to home) that must match after success
    success_marker: str | None = None  # a line meaning "done": the process is ended if it lingers
    marker_grace: float = 10.0
    env: dict[str, str] = {}


class PipelineConfig(_Strict, kw_only=True, frozen=True):
    description: str = ""
    max_concurrent: int = 1  # runs of this pipeline at once (beyond it, runs wait queued)
    params: dict[str, ParamSpec] = {}
    stages: list[StageConfig]


class ScheduleConfig(_Strict, frozen=True):
    pipeline: str
    cron: str | None = None
    every: str | None = None  # "15m": slots aligned to `anchor`, whenever the service started
    anchor: str = "2000-01-01T00:00:00"  # local time in `timezone`
    timezone: str | None = None  # default: the top-level timezone
    params: Params = {}
    enabled: bool = True  # the initial state; pause/resume is persisted and wins
    fire_at_start: bool = False
    misfire_grace: float = 60.0
    misfire: Literal["coalesce", "catch_up"] = "coalesce"
    catch_up_max: int = 10
    overlap: Literal["skip", "queue", "allow"] = "skip"


AlertKind = Literal["failure", "cancelled", "long_run", "skipped", "runner_lost"]
ALERT_KINDS: tuple[str, ...] = AlertKind.__args__  # type: ignore[attr-defined]


class AlertConfig(_Strict, frozen=True):
    """`[alerts.<name>]`: a webhook POSTed on the run outcomes in `on` (scheduler_svc/alerts.py)."""

    url: str  # http:// or https://
    on: list[AlertKind]
    pipelines: list[str] = []  # empty: every pipeline
    long_run_after: str | None = None  # "30m": required with `long_run` in `on`
    retries: int = 5  # attempts after the first
    backoff: float = 2.0  # seconds before the first retry, doubled each time
    backoff_max: float = 300.0
    timeout: float = 10.0  # seconds per attempt
    headers: dict[str, str] = {}


# ---- [cluster]: several hosts on NATS JetStream and PostgreSQL (absent: one host, as by default) ----

class CurveConfig(_Strict, frozen=True):
    """The cluster's CURVE key pair (`runwire keys` writes it), a copy on every host: servers bind with
    the secret, clients verify servers by the public key and present the pair, and servers accept only
    clients presenting it. Paths are relative to the config file's folder."""

    public_file: str
    secret_file: str


class ClusterConfig(_Strict, frozen=True):
    nats: list[str]  # JetStream servers, e.g. ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
    state: str  # PostgreSQL URL, e.g. "postgresql://runwire@10.0.0.1:5432/runwire"
    stream_max_age: str = "7d"  # the event stream keeps a run's events this long
    stream_replicas: int = 3  # JetStream replicas of the event stream (1 for a one-server trial)
    curve: CurveConfig | None = None  # needed to bind any ZeroMQ socket beyond loopback


class Config(_Strict, frozen=True):
    home: str = ".runwire"
    timezone: str = "UTC"
    log_level: str = "INFO"
    scheduler: SchedulerConfig = SchedulerConfig()
    runner: RunnerConfig = RunnerConfig()
    gateway: GatewayConfig = GatewayConfig()
    pipelines: dict[str, PipelineConfig] = {}
    schedules: dict[str, ScheduleConfig] = {}
    alerts: dict[str, AlertConfig] = {}
    cluster: ClusterConfig | None = None


# tables of named entries (section -> entry type): an error inside one is reported with the entry's name
_NAMED_TABLES: dict[str, type[msgspec.Struct]] = {
    "pipelines": PipelineConfig, "schedules": ScheduleConfig, "alerts": AlertConfig}


@dataclass(frozen=True)
class Settings:
    """A loaded config with its absolute paths, resolved once."""

    config: Config
    path: Path  # the absolute config file
    home: Path
    token: str | None

    @property
    def journal_dir(self) -> Path:
        return self.home / "events"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.config.timezone)

    def pipeline(self, name: str) -> PipelineConfig:
        try:
            return self.config.pipelines[name]
        except KeyError:
            known = ", ".join(sorted(self.config.pipelines)) or "none"
            raise UnknownPipeline(f"unknown pipeline {name!r} (configured: {known})") from None


def parse_duration(text: str) -> int:
    """'15m' -> 900 seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration like '30s', '15m', '1h' or '1d'")
    value = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if value <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return value


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--config, else RUNWIRE_CONFIG, else ./runwire.toml; absolute."""
    raw = explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME
    return Path(raw).expanduser().resolve()


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    path = find_config_path(explicit)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (set --config or {CONFIG_ENV})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    return settings_from_toml(data, path)


def settings_from_toml(data: bytes | str, path: Path) -> Settings:
    try:
        config = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Object contains unknown field `prot` - at `$.gateway`"
        raise ConfigError(f"{path}: {_humanize(_name_the_entry(data, str(e)))}") from e
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except RecursionError as e:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: not valid TOML: arrays or inline tables nested too deeply") from e
    _validate(config, path)
    home_raw = os.environ.get(HOME_ENV)
    try:
        home = Path(home_raw).expanduser().resolve() if home_raw else (path.parent / config.home).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, a name too long, a loop of links
        where = f"${HOME_ENV}" if home_raw else "key `home`"
        raise ConfigError(f"{path}: {where}: not a usable directory path ({e})") from None
    token = os.environ.get(TOKEN_ENV) or None
    return Settings(config=config, path=path, home=home, token=token)


def _name_the_entry(data: bytes | str, msg: str) -> str:
    """msgspec says `$.alerts[...].on[0]` for a value in a table of named entries: find the entry's name."""
    import tomllib

    section = msg.rpartition("`$.")[2].partition("[...]")[0]
    if "[...]" not in msg or section not in _NAMED_TABLES:
        return msg
    try:
        entries = tomllib.loads(data if isinstance(data, str) else data.decode()).get(section, {})
        for name, value in entries.items():
            try:
                msgspec.convert(value, type=_NAMED_TABLES[section])
            except msgspec.ValidationError as e:
                found = str(e)
                where = f"`$.{section}.{name}"
                return found.replace("`$", where, 1) if "`$" in found else f"{found} - at {where}`"
    except (ValueError, RecursionError, AttributeError):  # not decodable this way: keep msgspec's words
        return msg
    return msg


def _humanize(msg: str) -> str:
    # "$.gateway.port" -> "key gateway.port"
    return re.sub(r"`\$\.?([^`]*)`", lambda m: f"key `{m.group(1) or '(top level)'}`", msg)


def _fail(path: Path, key: str, expected: str) -> ConfigError:
    return ConfigError(f"{path}: key `{key}`: {expected}")


def _check_zone(path: Path, key: str, name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file name
        raise _fail(path, key, f"expected an IANA time zone like 'America/Chicago', got {name!r}") from None


def _validate(config: Config, path: Path) -> None:
    _check_zone(path, "timezone", config.timezone)
    if config.scheduler.max_concurrent_runs < 1:
        raise _fail(path, "scheduler.max_concurrent_runs", "expected an integer >= 1")
    if config.runner.capacity < 1:
        raise _fail(path, "runner.capacity", "expected an integer >= 1")
    if config.runner.id and not _NAME_RE.match(config.runner.id):
        raise _fail(path, "runner.id", f"expected letters, digits, '_', '.', '-' (got {config.runner.id!r})")
    if config.scheduler.keep_days < 0:
        raise _fail(path, "scheduler.keep_days", "expected days >= 0 (0 keeps every run)")
    if config.scheduler.runner_lost_after <= 2 * config.runner.heartbeat_interval:
        raise _fail(path, "scheduler.runner_lost_after", "expected more than twice runner.heartbeat_interval")
    for name, pipeline in config.pipelines.items():
        key = f"pipelines.{name}"
        if not _NAME_RE.match(name):
            raise _fail(path, key, "expected a pipeline name of letters, digits, '_', '.', '-'")
        _validate_pipeline(path, key, pipeline)
    for name, schedule in config.schedules.items():
        key = f"schedules.{name}"
        if not _NAME_RE.match(name):
            raise _fail(path, key, "expected a schedule name of letters, digits, '_', '.', '-'")
        _validate_schedule(path, key, schedule, config)
    for name, alert in config.alerts.items():
        key = f"alerts.{name}"
        if not _NAME_RE.match(name):
            raise _fail(path, key, "expected an alert name of letters, digits, '_', '.', '-'")
        _validate_alert(path, key, alert, config)
    if config.cluster is not None:
        _validate_cluster(path, config.cluster)


def _validate_pipeline(path: Path, key: str, pipeline: PipelineConfig) -> None:
    for pname, spec in pipeline.params.items():
        pkey = f"{key}.params.{pname}"
        if spec.pattern is not None:
            try:
                re.compile(spec.pattern)
            except re.error as e:
                raise _fail(path, f"{pkey}.pattern", f"expected a regular expression: {e}") from None
        if spec.default is not None:
            try:
                check_param_value(pname, spec, spec.default)
            except BadParams as e:
                raise _fail(path, f"{pkey}.default", str(e)) from None
    if not pipeline.stages:
        raise _fail(path, f"{key}.stages", "expected at least one stage")
    seen: set[str] = set()
    for i, stage in enumerate(pipeline.stages):
        skey = f"{key}.stages[{i}]"
        if not is_valid_stage_name(stage.name) or stage.name == "pipeline":
            raise _fail(path, f"{skey}.name", f"expected a stage name without '/', not 'pipeline' (got {stage.name!r})")
        if stage.name in seen:
            raise _fail(path, f"{skey}.name", f"stage name {stage.name!r} is used twice")
        seen.add(stage.name)
        if (stage.command is None) == (stage.callable is None):
            raise _fail(path, skey, "expected exactly one of `command` (argv list) or `callable` ('module:function')")
        if stage.command is not None and not stage.command:
            raise _fail(path, f"{skey}.command", "expected a non-empty argv list")
        # the OS takes argv and the environment as C strings: a NUL cannot reach the process, so it is
        # refused here, at load, rather than when the stage is spawned in the middle of a run
        for j, arg in enumerate(stage.command or ()):
            if "\x00" in arg:
                raise _fail(path, f"{skey}.command[{j}]", "expected an argument without a NUL character")
        for name, value in stage.env.items():
            if not name or "=" in name or "\x00" in name:
                raise _fail(path, f"{skey}.env", f"expected variable names without '=' or NUL (got {name!r})")
            if "\x00" in value:
                raise _fail(path, f"{skey}.env.{name}", "expected a value without a NUL character")
        if stage.callable is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", stage.callable):
            raise _fail(path, f"{skey}.callable", f"expected 'module:function' (got {stage.callable!r})")
        for fname in ("timeout", "progress_interval", "marker_grace", "retry_backoff"):
            if getattr(stage, fname) <= 0:
                raise _fail(path, f"{skey}.{fname}", "expected a number of seconds > 0")
        if stage.max_parallel < 1 or stage.retries < 0 or stage.log_rate < 1:
            raise _fail(path, skey, "expected max_parallel >= 1, retries >= 0, log_rate >= 1")
        if isinstance(stage.fan_out, str):
            fan_spec = pipeline.params.get(stage.fan_out)
            if fan_spec is None or fan_spec.type != "list":
                raise _fail(path, f"{skey}.fan_out", f"expected a list of items or the name of a list parameter (got {stage.fan_out!r})")


def _validate_schedule(path: Path, key: str, schedule: ScheduleConfig, config: Config) -> None:
    from datetime import datetime

    from cronsim import CronSim, CronSimError

    if schedule.pipeline not in config.pipelines:
        known = ", ".join(sorted(config.pipelines)) or "none"
        raise _fail(path, f"{key}.pipeline", f"expected a configured pipeline ({known}), got {schedule.pipeline!r}")
    if (schedule.cron is None) == (schedule.every is None):
        raise _fail(path, key, "expected exactly one of `cron` ('*/15 * * * *') or `every` ('15m')")
    tz_name = schedule.timezone or config.timezone
    _check_zone(path, f"{key}.timezone", tz_name)
    if schedule.cron is not None:
        try:
            CronSim(schedule.cron, datetime(2000, 1, 1, tzinfo=ZoneInfo(tz_name)))
        except CronSimError as e:
            raise _fail(path, f"{key}.cron", f"expected a cron expression, got {schedule.cron!r}: {e}") from None
    if schedule.every is not None:
        try:
            parse_duration(schedule.every)
        except ValueError as e:
            raise _fail(path, f"{key}.every", str(e)) from None
    try:
        datetime.fromisoformat(schedule.anchor)
    except ValueError:
        raise _fail(path, f"{key}.anchor", f"expected a local time like '2000-01-01T00:00:00', got {schedule.anchor!r}") from None
    if schedule.misfire_grace < 0 or schedule.catch_up_max < 1:
        raise _fail(path, key, "expected misfire_grace >= 0 and catch_up_max >= 1")
    try:
        resolve_params(config.pipelines[schedule.pipeline], schedule.params)
    except BadParams as e:
        raise _fail(path, f"{key}.params", str(e)) from None


_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _validate_alert(path: Path, key: str, alert: AlertConfig, config: Config) -> None:
    from urllib.parse import urlsplit

    try:
        url = urlsplit(alert.url)
        url.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        raise _fail(path, f"{key}.url", f"expected an http:// or https:// URL, got {alert.url!r}: {e}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise _fail(path, f"{key}.url", f"expected an http:// or https:// URL with a host, got {alert.url!r}")
    if not alert.on:
        raise _fail(path, f"{key}.on", f"expected at least one of {', '.join(ALERT_KINDS)}")
    for pipeline in alert.pipelines:
        if pipeline not in config.pipelines:
            known = ", ".join(sorted(config.pipelines)) or "none"
            raise _fail(path, f"{key}.pipelines", f"expected configured pipelines ({known}), got {pipeline!r}")
    if "long_run" in alert.on and alert.long_run_after is None:
        raise _fail(path, f"{key}.long_run_after", "expected a duration like '30m' (required with `long_run` in `on`)")
    if alert.long_run_after is not None:
        if "long_run" not in alert.on:
            raise _fail(path, f"{key}.long_run_after", "only with `long_run` in `on`")
        try:
            parse_duration(alert.long_run_after)
        except ValueError as e:
            raise _fail(path, f"{key}.long_run_after", str(e)) from None
    if alert.retries < 0:
        raise _fail(path, f"{key}.retries", "expected an integer >= 0")
    for fname in ("backoff", "backoff_max", "timeout"):
        if not getattr(alert, fname) > 0:
            raise _fail(path, f"{key}.{fname}", "expected a number of seconds > 0")
    if alert.backoff_max < alert.backoff:
        raise _fail(path, f"{key}.backoff_max", "expected at least `backoff`")
    for hname, value in alert.headers.items():
        if not _HEADER_NAME_RE.match(hname) or any(c in value for c in "\r\n\0"):
            raise _fail(path, f"{key}.headers", f"expected HTTP header names and single-line values (got {hname!r})")


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_PG_SCHEMES = ("postgresql", "postgres")


def _validate_cluster(path: Path, cluster: ClusterConfig) -> None:
    from urllib.parse import urlsplit

    if not cluster.nats:
        raise _fail(path, "cluster.nats", "expected at least one NATS server URL like 'nats://10.0.0.1:4222'")
    for i, url in enumerate(cluster.nats):
        parts = urlsplit(url)
        if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
            raise _fail(path, f"cluster.nats[{i}]", f"expected a URL like 'nats://host:4222' (got {url!r})")
    parts = urlsplit(cluster.state)
    if parts.scheme not in _PG_SCHEMES or not (parts.hostname or "host=" in parts.query):
        raise _fail(path, "cluster.state", "expected a PostgreSQL URL like 'postgresql://user@host:5432/db' "
                    f"(got scheme {parts.scheme!r})")  # the URL itself may hold a password: not echoed
    try:
        parse_duration(cluster.stream_max_age)
    except ValueError as e:
        raise _fail(path, "cluster.stream_max_age", str(e)) from None
    if not 1 <= cluster.stream_replicas <= 5:  # JetStream's own bounds
        raise _fail(path, "cluster.stream_replicas", "expected an integer from 1 to 5")
    if cluster.curve is not None:
        for fname in ("public_file", "secret_file"):
            if not getattr(cluster.curve, fname).strip():
                raise _fail(path, f"cluster.curve.{fname}", "expected a file path (written by `runwire keys`)")


def endpoints_of(settings: Settings) -> dict[str, str]:
    """Every endpoint the config names, for start-up logs and identity replies."""
    c = settings.config
    return {
        "scheduler.control": c.scheduler.control,
        "scheduler.dispatch": c.scheduler.dispatch,
        "scheduler.publish": c.scheduler.publish,
        "runner.publish": c.runner.publish,
        "runner.control": c.runner.control,
        "gateway.http": f"http://{c.gateway.host}:{c.gateway.port}",
    }
