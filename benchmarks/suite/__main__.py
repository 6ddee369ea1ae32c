"""python -m benchmarks.suite: hfmerge's merge-quality benchmark, offline.

Builds the tasks and the model zoo (cached under --cache), pushes them to a
local Hub-compatible server on loopback, merges by repo id and dataset id
through hfmerge's public API, and writes RESULTS.md and its plots to --out
(default benchmarks/). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.suite.run import TABLES, run_suite

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite", description=__doc__.split("\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tables:\n"
               "  A  gating and its baselines, N = 3, 6, 12 task ViTs (vit-gating-merge Tables 3-5)\n"
               "  B  layer-wise merging of UDA SegFormers (layerwise-uda-merge Tables 2-4)\n"
               "  C  CLAFusion and OTFusion of MLPs, VGGs and ResNets (clafusion Table 1)\n"
               "  D  parameter fusion of task models with disjoint labels (parameter-fusion Tables I-IV)\n\n"
               "The full run takes up to an hour on a 2-core CPU, less once the cache holds the\n"
               "datasets and models. A run of some tables, or one with a failed table, writes\n"
               "RESULTS.partial.md, so a complete RESULTS.md is never replaced by part of one.")
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
                        help="built datasets and trained models, kept between runs (default: benchmarks/out/cache)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="how many seeds (0, 1, …, N-1) the merges' random parts are repeated over "
                             "(default: 3, or 1 with --quick and --smoke)")
    args = parser.parse_args(argv)
    mode = args.mode or "full"
    tables = list(dict.fromkeys(t.strip().upper() for t in args.tables.split(",") if t.strip()))
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}; choose from {', '.join(TABLES)}")
    if not tables:
        parser.error(f"--tables names no table; choose from {', '.join(TABLES)}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, not {args.seeds}")
    out = args.out or (ROOT / "benchmarks" if mode == "full" else ROOT / "benchmarks" / "out" / mode)
    for flag, folder in (("--out", out), ("--cache", args.cache)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"{flag} {folder}: cannot make that folder ({error.strerror or error}); choose another path")
        if not os.access(folder, os.W_OK):
            parser.error(f"{flag} {folder}: the folder is not writable; choose another path")
    return run_suite(mode, tables, out=out, cache=args.cache, seeds=args.seeds,
                     command=" ".join(["python -m benchmarks.suite", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
