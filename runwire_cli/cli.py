"""The `runwire` command: start a service, launch and follow runs, list runs and schedules, doctor.

Everything but the service commands speaks to the gateway's HTTP/WebSocket API (the one entry point,
with its token), so the CLI sees exactly what the dashboard sees. The service subcommands import their
service lazily (a CLI call does not load three services), and `runwire runner` is `python -m runner_svc`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from shared.config import Settings, load_settings
from shared.errors import BadParams, ConfigError, RunwireError, ServiceUnavailable
from shared.httpapi import Launched, RunPage, RunsPage, SchedulesPage
from shared.ids import check_run_id
from shared.params import parse_param_text
from shared.protocol import ErrorFrame, EventsFrame, Hello
from shared.replies import CancelResult, ScheduleInfo

from . import reruns
from .client import GatewayClient, gateway_url
from .render import event_line, json_line, print_table, use_colour

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 3
SERVICES = {"scheduler": "scheduler_svc.main", "runner": "runner_svc.main", "gateway": "gateway_svc.main"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runwire", description="Scheduled data pipelines, watched live.")
    # the common options work before the command (`runwire --json runs`) and after it (`runwire runs
    # --json`): the command's copies default to SUPPRESS so they do not overwrite what came before
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for parser in (p, common):
        parser.add_argument("--config", help="config file (default: $RUNWIRE_CONFIG, then ./runwire.toml)")
        parser.add_argument("--gateway", help="gateway URL (default: $RUNWIRE_GATEWAY_URL, then the config's)")
        parser.add_argument("--json", action="store_true", help="machine-readable output: one JSON object per line")

    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service", add_help=False)

    launch = sub.add_parser("launch", parents=[common], help="launch a pipeline run")
    launch.add_argument("pipeline")
    launch.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--follow", action="store_true", help="show the run live; exit status from its outcome")

    tail = sub.add_parser("tail", parents=[common], help="print events as they come (one run, or all)")
    tail.add_argument("run_id", nargs="?")
    tail.add_argument("--after-seq", type=int, default=0)

    runs = sub.add_parser("runs", parents=[common], help="list runs, newest first")
    runs.add_argument("--status")
    runs.add_argument("--limit", type=int, default=20)

    sub.add_parser("schedules", parents=[common], help="list schedules with their next fire time")
    for verb in ("pause", "resume"):
        s = sub.add_parser(verb, parents=[common], help=f"{verb} a schedule (persisted)")
        s.add_argument("name")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running run")
    cancel.add_argument("run_id")

    demo = sub.add_parser("demo-data", parents=[common], help="write sample market-data exports for the demo")
    demo.add_argument("--days", type=int, default=None, help="trading days of minute bars (default: a small demo span)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--if-absent", action="store_true", help="do nothing when raw or processed data is present")

    reruns.add_parsers(sub, common)

    # cluster mode: the CURVE key pair for ZeroMQ across hosts (shared.curve)
    keys = sub.add_parser("keys", parents=[common], help="write the cluster's CURVE key pair (ZeroMQ across hosts)")
    keys.add_argument("--out", default=".", metavar="DIR", help="folder for runwire.key and runwire.key_secret (default: .)")

    sub.add_parser("doctor", parents=[common], help="check that config, journal, services and the event path agree")

    # history and the archive: the commands live in the `history` package, imported when one runs
    hist = sub.add_parser("history", parents=[common], help="run counts, success rate and durations from the archive")
    hist.add_argument("pipeline")
    hist.add_argument("--since", default="7d", help="window: runs queued in the last 7d (24h, 90m, 2w ...)")
    hist.add_argument("--stage", help="one stage and its fan-out items")
    archive = sub.add_parser("archive", parents=[common], help="the Parquet archive of ended runs")
    archive.add_argument("action", choices=["rebuild"], help="rebuild: archive every ended journal not archived, repair the rest")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:
        module = importlib.import_module(SERVICES[argv[0]])
        return int(module.main(argv[1:]))
    args = _parser().parse_args(argv)
    try:
        return anyio.run(_dispatch, args)
    except KeyboardInterrupt:
        return 130
    except ConfigError as e:
        print(f"runwire: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunwireError as e:
        print(f"runwire: {e}", file=sys.stderr)
        return EXIT_FAILED


def _write_keys(out: Path, *, as_json: bool) -> int:
    from shared.curve import write_keypair

    public, secret = write_keypair(out)
    if as_json:
        print(json_line({"public_file": str(public.resolve()), "secret_file": str(secret.resolve())}))
        return EXIT_OK
    print(f"wrote {public} and {secret} (mode 0600). Copy both to every host of the cluster, and name them in")
    print(f'its config:\n\n[cluster.curve]\npublic_file = "{public.resolve()}"\nsecret_file = "{secret.resolve()}"')
    return EXIT_OK


def _settings(args: argparse.Namespace, required: bool = True) -> Settings | None:
    try:
        return load_settings(args.config)
    except ConfigError:
        if required or args.config:
            raise
        return None


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        from .doctor import Doctor, run_doctor

        loaded = load_settings(args.config)
        if loaded.config.cluster is not None:
            from .cluster_doctor import ClusterDoctor  # cluster mode's engines are imported only with [cluster]

            return await run_doctor(ClusterDoctor(loaded, args.gateway), as_json=args.json)
        return await run_doctor(Doctor(loaded, args.gateway), as_json=args.json)
    if args.command == "demo-data":
        return _demo_data(args)
    if args.command == "keys":
        return _write_keys(Path(args.out), as_json=args.json)
    if args.command in ("history", "archive"):
        from . import history as history_cli  # polars and pyarrow load only for these

        return int(await history_cli.run(args, _settings(args, required=args.command == "archive")))
    settings = _settings(args, required=args.command == "launch")
    token = settings.token if settings else None
    async with GatewayClient(gateway_url(settings, args.gateway), token) as client:
        match args.command:
            case "launch":
                assert settings is not None
                return await _launch(client, settings, args)
            case "tail":
                if args.after_seq and not args.run_id:
                    raise BadParams("--after-seq needs a RUN_ID (the all-runs stream resumes by cursor)")
                if args.run_id:
                    outcome = await follow_run(client, args.run_id, args.after_seq, as_json=args.json)
                    return _exit_for(outcome)
                await tail_all(client, as_json=args.json)
                return EXIT_OK
            case "runs":
                page = await client.get("/api/runs", into=RunsPage, status=args.status, limit=args.limit)
                _print_rows(page.runs, ["run_id", "pipeline", "status", "trigger", "queued_at", "ended_at", "waiting"], args.json)
            case "schedules":
                schedules = await client.get("/api/schedules", into=SchedulesPage)
                _print_rows(schedules.schedules, ["name", "pipeline", "spec", "timezone", "next_fire", "paused"], args.json)
            case "pause" | "resume":
                schedule = await client.post(f"/api/schedules/{args.name}/{args.command}", into=ScheduleInfo)
                _print_result(schedule, f"schedule {args.name}: {args.command}d", args.json)
            case "rerun" | "backfill" | "backfills":
                return await reruns.run(client, args)
            case "cancel":
                check_run_id(args.run_id)
                cancelled = await client.post(f"/api/runs/{args.run_id}/cancel", into=CancelResult)
                _print_result(cancelled, f"run {args.run_id}: {cancelled.status}", args.json)
    return EXIT_OK


def _print_rows(rows: Sequence[msgspec.Struct], columns: list[str], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json_line(row))
        return
    print_table([msgspec.structs.asdict(row) for row in rows], columns)


def _print_result(data: msgspec.Struct, text: str, as_json: bool) -> None:
    print(json_line(data) if as_json else text)


def _parse_params(settings: Settings, pipeline: str, pairs: list[str]) -> dict[str, Any]:
    spec = settings.pipeline(pipeline)
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadParams(f"-p {pair!r}: expected KEY=VALUE")
        if key not in spec.params:
            known = ", ".join(sorted(spec.params)) or "none"
            raise BadParams(f"-p {key}: pipeline {pipeline!r} has no parameter {key!r} (declared: {known})")
        try:
            params[key] = parse_param_text(spec.params[key], value)
        except BadParams as e:
            raise BadParams(f"-p {key}: {e}") from None
    return params


LAUNCH_RETRIES = (0.5, 1.0, 2.0, 4.0)  # seconds before each retry of a launch the gateway did not take


async def _post_launch(client: GatewayClient, body: dict[str, Any]) -> Launched:
    """POST /api/runs with an Idempotency-Key, retried with the same key while the gateway is away or
    answers 503: a retry can never make a second run (503 means nothing was done; a lost answer to a
    launch that was done is answered again from the key)."""
    headers = {"Idempotency-Key": f"cli-{uuid.uuid4().hex}"}
    for delay in (*LAUNCH_RETRIES, None):
        try:
            return await client.post("/api/runs", body, into=Launched, headers=headers)
        except ServiceUnavailable as e:
            if delay is None:
                raise
            print(f"runwire: launch not taken ({e}); retrying in {delay:g}s with the same Idempotency-Key",
                  file=sys.stderr)
            await anyio.sleep(delay)
    raise AssertionError("unreachable")


async def _launch(client: GatewayClient, settings: Settings, args: argparse.Namespace) -> int:
    params = _parse_params(settings, args.pipeline, args.param)
    launched = await _post_launch(client, {"pipeline": args.pipeline, "params": params})
    run_id = launched.run_id
    if args.json:
        print(json_line(launched))
    else:
        print(f"run {run_id} {launched.status}", file=sys.stderr if args.follow else sys.stdout)
    if not args.follow:
        return EXIT_OK
    return _exit_for(await follow_run(client, run_id, 0, as_json=args.json))


def _exit_for(outcome: str | None) -> int:
    return {"success": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(outcome or "", EXIT_FAILED)


async def follow_run(client: GatewayClient, run_id: str, after_seq: int, *, as_json: bool) -> str | None:
    """Print one run's events from after_seq until its terminal event; reconnect with the last seq
    printed, so nothing is printed twice or skipped. Returns the run's outcome."""
    check_run_id(run_id)
    colour = use_colour(sys.stdout) and not as_json
    last = after_seq
    backoff = 0.2
    while True:
        try:
            async for frame in client.frames(f"/ws/events/{run_id}", after_seq=last):
                if isinstance(frame, Hello) and not frame.recovered:
                    print(f"runwire: resume not exact: {frame.reason}", file=sys.stderr)
                elif isinstance(frame, ErrorFrame):
                    print(f"runwire: {frame.code}: {frame.message}", file=sys.stderr)
                elif isinstance(frame, EventsFrame):
                    for ev in frame.events:
                        if ev.seq <= last:
                            continue
                        print(json_line(ev) if as_json else event_line(ev, colour=colour), flush=True)
                        last = ev.seq
                        if ev.is_terminal:
                            return ev.event
                backoff = 0.2
            # closed normally without a terminal after `last`: the run ended at or before it
            run = await client.get(f"/api/runs/{run_id}", into=RunPage)
            if run.status in ("success", "failure", "cancelled"):
                return run.status
        except ServiceUnavailable as e:
            print(f"runwire: {e}; reconnecting after seq {last}", file=sys.stderr)
        await anyio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def tail_all(client: GatewayClient, *, as_json: bool) -> None:
    """Print every run's events from now on, until interrupted; reconnect with the cursor."""
    colour = use_colour(sys.stdout) and not as_json
    cursor: str | None = None
    last: dict[str, int] = {}
    backoff = 0.2
    while True:
        try:
            async for frame in client.frames("/ws/events", cursor=cursor):
                if isinstance(frame, Hello):
                    if not frame.recovered:
                        print(f"runwire: resume not exact: {frame.reason}", file=sys.stderr)
                    cursor = frame.cursor or cursor
                elif isinstance(frame, ErrorFrame):
                    print(f"runwire: {frame.code}: {frame.message}", file=sys.stderr)
                elif isinstance(frame, EventsFrame):
                    for ev in frame.events:
                        if ev.seq <= last.get(ev.run_id, 0):
                            continue
                        last[ev.run_id] = ev.seq
                        print(json_line(ev) if as_json else event_line(ev, colour=colour, show_run=True), flush=True)
                    cursor = frame.cursor or cursor
                backoff = 0.2
        except ServiceUnavailable as e:
            print(f"runwire: {e}; reconnecting", file=sys.stderr)
        await anyio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


def _demo_data(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from runwire_demo import data as demo

    settings = load_settings(args.config)
    raw_dir = settings.data_dir / "raw"
    if args.if_absent and _has_demo_input(settings):
        print(f"demo data present under {settings.data_dir}; nothing written")
        return EXIT_OK
    kwargs: dict[str, Any] = {"seed": args.seed}
    if args.days is not None:
        kwargs["days"] = args.days
    with tqdm(total=0, unit="chunk", desc="demo data", disable=args.json) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        files = demo.generate(raw_dir, progress=progress, **kwargs)
    print(json_line({"files": [str(f) for f in files]}) if args.json else f"wrote {len(files)} files to {raw_dir}")
    return EXIT_OK


def _has_demo_input(settings: Settings) -> bool:
    from runwire_demo import data as demo

    processed = settings.data_dir / "processed"
    return demo.has_raw_data(settings.data_dir / "raw") or (processed.is_dir() and any(Path(processed).glob("*.parquet")))
