"""Benchmark methods x tasks x seeds with the VTAB-1k protocol; resumable.

Hyper-parameters (the suite's per-method grid) are chosen on train800 -> val200 only; the final
model trains on train800val200 and is evaluated once on test. Runs already finished are skipped,
so a sweep that was interrupted continues where it stopped. Tasks of the suite that are missing
under --data-root are listed, not silently dropped.

Examples:
  vpeft bench --suite quick --data-root ../shared/data/vtab1k \\
      --weights ../shared/weights/deit_tiny_patch16_224.fb_in1k.safetensors --out runs/quick
  vpeft bench --suite vtab1k --data-root /data/vtab-1k --out runs/vtab --profile
  vpeft bench --suite my_suite.yaml --data-root DIR --out runs/mine
  vpeft report runs/quick --out reports/quick
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from vpeft.bench.suites import MethodEntry, Suite, builtin_suites, load_suite
from vpeft.commands._common import check_weights_file, parse_key_values

HELP = "run a benchmark suite (methods x tasks x seeds), resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suite", required=True, help=f"built-in ({', '.join(builtin_suites())}) or a YAML file"
    )
    p.add_argument("--data-root", type=Path, required=True, help="folder with one folder per task")
    p.add_argument("--out", type=Path, required=True, help="results folder (reused to resume)")
    p.add_argument("--weights", default=None, help="local weights of the suite's model")
    p.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="run only these methods (names from the suite, or any registered method)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="override suite fields, e.g. epochs=2 img_size=112 seeds=[0,1]",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile the methods (writes OUT/profile.json for the report)",
    )


def validate_plan(suite: Suite, weights: str | None) -> None:
    """Check every run of the suite before any trains: each method name, each option and grid
    setting (through the method's own config), and the weights file. Raises on the first error,
    naming the method entry."""
    from vpeft.bench.runner import available, make_config, settings
    from vpeft.registry import make_config as method_config

    check_weights_file(weights)
    for entry in suite.methods:
        if not available(entry):
            continue
        for setting in settings(entry):
            try:
                cfg = make_config(suite, entry, Path("DATA"), Path("OUT"), suite.seeds[0], setting,
                                  weights, val=bool(entry.grid), progress=False)
                method_config(cfg.method, **cfg.method_args)
            except (KeyError, TypeError, ValueError) as e:
                what = f"grid setting {setting}" if setting else "options"
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise ValueError(f"suite {suite.name}, method {entry.label} ({what}): {msg}; "
                                 "nothing was trained") from None


def run(args: argparse.Namespace) -> int:
    from vpeft.bench.profile import ProfileSpec, profile
    from vpeft.bench.runner import available, run_suite

    suite = load_suite(args.suite)
    overrides = parse_key_values(args.set, "--set")
    if overrides:
        suite = replace(suite, **overrides)
    if args.methods:
        known = {m.name: m for m in suite.methods}
        suite = replace(suite, methods=[known.get(n, MethodEntry(n)) for n in args.methods])
    if not suite.seeds:
        raise ValueError(f"suite {suite.name} lists no seeds")
    validate_plan(suite, args.weights)
    progress = sys.stderr.isatty()
    results = run_suite(suite, args.data_root, args.out, args.weights, progress=progress)
    print(f"{len(results)} runs finished in {args.out}; next: vpeft report {args.out} --out REPORT")
    if args.profile:
        prof = args.out / "profile.json"
        if prof.exists():
            print(f"{prof} exists; not profiling again")
            return 0
        from vpeft.commands.profile import print_table, write_json

        spec = ProfileSpec(
            model=suite.model,
            weights=args.weights,
            img_size=suite.img_size,
            batch_size=min(suite.batch_size, 32),
        )
        entries = [e for e in suite.methods if available(e)]
        result = profile(spec, [(e.name, e.args) for e in entries])
        print_table(result)
        write_json(prof, result)
    return 0
