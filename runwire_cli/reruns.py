"""`runwire rerun`, `runwire backfill` and `runwire backfills`: re-run a run, fill a schedule's slots in a
window, and see how the backfills are going (through the gateway's API, like every other command)."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from shared.backfill import (
    MAX_PARALLEL_LIMIT,
    POLICIES,
    check_max_parallel,
    check_policy,
)
from shared.ids import check_run_id
from shared.replies import BackfillList, BackfillResult, RerunResult

from .client import GatewayClient
from .render import json_line, print_table

PROGRESS_COLUMNS = ["backfill_id", "schedule", "policy", "total", "pending", "queued", "running", "success",
                    "failure", "cancelled", "done"]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    rerun = sub.add_parser("rerun", parents=[common], help="a new run of a run's pipeline and parameters")
    rerun.add_argument("run_id")
    rerun.add_argument("--from-failed", action="store_true",
                       help="start at the first failed stage (earlier stages must declare outputs, present now)")
    bf = sub.add_parser("backfill", parents=[common], help="runs for a schedule's slots in a window")
    bf.add_argument("schedule")
    bf.add_argument("--from", dest="start", required=True, metavar="T",
                    help="first slot time (ISO 8601: 2026-11-22, 2026-11-22T06:00 in the schedule's zone, or with Z)")
    bf.add_argument("--to", dest="end", required=True, metavar="T", help="last slot time (inclusive)")
    bf.add_argument("--policy", default="missing", choices=POLICIES,
                    help="missing: slots without a run; failed: also those whose run failed or was cancelled; all")
    bf.add_argument("--max-parallel", type=int, default=1, metavar="N",
                    help=f"at most N of its runs queued or running at once (1..{MAX_PARALLEL_LIMIT}; default 1)")
    bf.add_argument("--dry-run", action="store_true", help="list what would run and why; create nothing")
    lst = sub.add_parser("backfills", parents=[common], help="backfills and their progress, newest first")
    lst.add_argument("--limit", type=int, default=20)


async def run(client: GatewayClient, args: argparse.Namespace) -> int:
    match args.command:
        case "rerun":
            return await _rerun(client, args)
        case "backfill":
            return await _backfill(client, args)
        case _:
            page = await client.get("/api/backfills", into=BackfillList, limit=args.limit)
            if args.json:
                for b in page.backfills:
                    print(json_line(b))
            else:
                print_table([msgspec.structs.asdict(b) for b in page.backfills], PROGRESS_COLUMNS)
            return 0


async def _rerun(client: GatewayClient, args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    result = await client.post(f"/api/runs/{args.run_id}/rerun", {"from_failed": args.from_failed}, into=RerunResult)
    if args.json:
        print(json_line(result))
        return 0
    how = f" from stage {result.from_stage}" if result.from_stage else ""
    skipped = f" (skipping {', '.join(result.skipped_stages)}: outputs present)" if result.skipped_stages else ""
    print(f"run {result.run_id} {result.status}: re-run of {result.rerun_of}{how}{skipped}")
    return 0


async def _backfill(client: GatewayClient, args: argparse.Namespace) -> int:
    body = {"from": args.start, "to": args.end, "policy": check_policy(args.policy),
            "max_parallel": check_max_parallel(args.max_parallel), "dry_run": args.dry_run}
    result = await client.post(f"/api/schedules/{args.schedule}/backfill", body, into=BackfillResult)
    if args.json:
        print(json_line(result))
        return 0
    print_table([msgspec.structs.asdict(s) for s in result.slots], ["slot", "action", "run_id", "reason"])
    runs = sum(s.action == "run" for s in result.slots)
    if result.dry_run:
        print(f"dry run: {runs} of {len(result.slots)} slots would run (policy {result.policy}); nothing created")
    elif result.progress is None:
        print(f"nothing to run: none of the {len(result.slots)} slots needs a run (policy {result.policy})")
    else:
        p = result.progress
        print(f"backfill {p.backfill_id}: {p.total} runs for schedule {p.schedule}, at most {p.max_parallel} at once; "
              "see `runwire backfills`")
    return 0
