"""Write a Markdown report, CSV and PNG plots from a folder of benchmark results.

Reads every results.json below RESULTS_DIR (as written by `vpeft train` and `vpeft bench`) and,
when present, RESULTS_DIR/profile.json (from `vpeft profile --out`).

Example:
  vpeft report runs/bench-quick --out reports/quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Markdown/CSV report and plots from benchmark results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", type=Path, help="folder with results.json files")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")


def run(args: argparse.Namespace) -> int:
    from vpeft.bench.report import write_report

    path = write_report(args.results_dir, args.out, overwrite=args.overwrite)
    print(path.read_text())
    print(f"report written to {path}")
    return 0
