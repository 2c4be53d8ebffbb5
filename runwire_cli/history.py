"""`runwire history PIPELINE [--since 7d] [--stage S]` (the gateway's GET /api/history, as a table or
`--json`) and `runwire archive rebuild` (the archive made whole from the journals, locally; in
cluster mode its files only: the gateway fills it from the event stream at its start). The
parsers are in cli.py, which imports this module only when one of these commands runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from runwire_history.analytics import BadWindow, parse_window
from runwire_history.archive import Archive, archive_dir_of
from shared.config import Settings, load_settings
from shared.errors import BadParams

from .client import GatewayClient, gateway_url
from .render import json_line, print_table

COMMANDS = ("history", "archive")


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}s" if v < 600 else f"{v / 60:.1f}m"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:+.1f}%"


def _pts(v: float | None) -> str:
    return "" if v is None else f" ({v * 100:+.1f} pts)"


def render(report: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """The history report as text: a summary line, the stages, the slowest and failing items, skipped slots."""
    s = report["summary"]
    w = report["window"]
    focus = f", stage {report['stage']}" if report.get("stage") else ""
    print(f"{report['pipeline']}{focus}: runs queued in the last {report['since']} "
          f"({w['from'][:16]} .. {w['to'][:16]} UTC), trend against the {report['since']} before", file=out)
    d, c = s["duration_s"], s["change"]
    print(f"runs {s['runs']}  success {s['success']}  failure {s['failure']}  cancelled {s['cancelled']}  "
          f"success rate {_rate(s['success_rate'])}{_pts(c['success_rate'])}  "
          f"duration p50 {_secs(d['p50'])} {_pct(c['p50_pct'])}  p95 {_secs(d['p95'])} {_pct(c['p95_pct'])}  "
          f"max {_secs(d['max'])}  (previous: {s['previous']['runs']} runs)".replace("  (", " (").replace("   ", "  "), file=out)
    slots = report["skipped_slots"]
    if slots["count"]:
        reasons = ", ".join(f"{r['reason']} {r['count']}" for r in slots["by_reason"])
        print(f"skipped slots {slots['count']}: {reasons}", file=out)
    if report["stages"]:
        print(file=out)
        print_table([{"stage": st["stage"], "runs": st["runs"], "ok": st["success"], "fail": st["failure"],
                      "skip": st["skipped"], "cancel": st["cancelled"], "rate": _rate(st["success_rate"]),
                      "p50": _secs(st["duration_s"]["p50"]), "p95": _secs(st["duration_s"]["p95"]),
                      "max": _secs(st["duration_s"]["max"]), "p50_trend": _pct(st["change"]["p50_pct"])}
                     for st in report["stages"]],
                    ["stage", "runs", "ok", "fail", "skip", "cancel", "rate", "p50", "p95", "max", "p50_trend"], out)
    for title, rows in (("slowest items (by p95)", report["slowest_items"]), ("failing items", report["failing_items"])):
        if not rows:
            continue
        print(f"\n{title}:", file=out)
        print_table([{"stage": i["stage"], "item": i["item"], "runs": i["runs"], "fail": i["failures"],
                      "rate": _rate(i["success_rate"]), "p50": _secs(i["duration_s"]["p50"]),
                      "p95": _secs(i["duration_s"]["p95"]), "max": _secs(i["duration_s"]["max"]),
                      "last_failure": (i["last_failure"] or "")[:60]} for i in rows],
                    ["stage", "item", "runs", "fail", "rate", "p50", "p95", "max", "last_failure"], out)
    if slots["recent"]:
        print("\nrecent skipped slots:", file=out)
        print_table(slots["recent"][-5:], ["queued_at", "run_id", "reason"], out)
    if not s["runs"] and not slots["count"]:
        print("no runs of this pipeline in the archive for this window", file=out)


async def run(args: argparse.Namespace, settings: Settings | None) -> int:
    if args.command == "archive":
        settings = settings or load_settings(args.config)
        cluster = settings.config.cluster is not None  # the archive is a gateway's, made from the event stream
        rep = Archive(archive_dir_of(settings.home), None if cluster else settings.journal_dir).sync()
        print(json_line({"archived": rep.archived, "already": rep.already, "adopted_files": rep.adopted_files,
                         "removed_files": rep.removed_files, "damaged_files": rep.damaged_files,
                         "lost_runs": rep.lost_runs, "compacted": rep.compacted})
              if args.json else f"archive {archive_dir_of(settings.home)}: {rep.summary()}"
              + ("; cluster mode: the gateway archives the runs the archive lacks from the event stream at its "
                 "next start" if cluster else ""))
        return 1 if rep.damaged_files or rep.lost_runs else 0
    try:
        parse_window(args.since)  # a bad window is the user's error, named before any request
    except BadWindow as e:
        raise BadParams(f"--since: {e}") from None
    token = settings.token if settings else None
    async with GatewayClient(gateway_url(settings, args.gateway), token) as client:
        report = await client.get("/api/history", pipeline=args.pipeline, since=args.since, stage=args.stage)
    if args.json:
        print(json_line(report))
    else:
        render(report)
    return 0
