"""``python -m benchmarks.suite [--quick | --smoke] [--tables A,B,C,D]``: the merge-quality benchmark.

Builds the tasks and the model zoo (cached under ``--cache``), pushes them to
a local Hub-compatible server on loopback, merges by repo id and dataset id
through hfmerge's public API, and writes ``RESULTS.md`` and its plots to
``--out`` (default ``benchmarks/``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.suite.run import TABLES, run_suite

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="smaller tasks and models: under 10 minutes on a 2-core CPU")
    size.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="the CI test's size: every table and file, numbers too small to mean anything")
    parser.add_argument("--tables", default=",".join(TABLES),
                        help=f"which tables to run, comma-separated (default: {','.join(TABLES)})")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for RESULTS.md and its plots (default: benchmarks/, or "
                             "benchmarks/out/<mode>/ for --quick and --smoke)")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "out" / "cache",
                        help="built datasets and trained models, kept between runs")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds of the merges' random parts (default: 3, or 1 with --smoke)")
    args = parser.parse_args(argv)
    mode = args.mode or "full"
    tables = [t.strip().upper() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}; choose from {', '.join(TABLES)}")
    out = args.out or (ROOT / "benchmarks" if mode == "full" else ROOT / "benchmarks" / "out" / mode)
    return run_suite(mode, tables, out=out, cache=args.cache, seeds=args.seeds,
                     command=" ".join(["python -m benchmarks.suite", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
