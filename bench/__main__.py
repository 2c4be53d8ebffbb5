"""`python -m bench [name ...]`: run every bench/bench_*.py (or the named ones) and print their figures.
`python -m bench NAME --option ...`: one bench with its own options (e.g. `gateway --only fanout`)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    split = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    picked, options = argv[:split], argv[split:]
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in picked] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)} (have: {', '.join(names)})", file=sys.stderr)
        return 2
    if options and len(wanted) != 1:
        print(f"options {' '.join(options)} need exactly one benchmark named before them", file=sys.stderr)
        return 2
    for name in wanted:
        print(f"== {name}", flush=True)
        # each bench parses its own options from sys.argv: ours are the names, not its options
        sys.argv = [f"bench/{name}.py", *options]
        importlib.import_module(f"bench.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
