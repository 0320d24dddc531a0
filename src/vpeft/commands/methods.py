"""List the registered PEFT methods with their place in the taxonomy and their characteristics.

Examples:
  vpeft methods             # table
  vpeft methods --json      # the same as JSON
  vpeft methods --options   # also each method's options and defaults
  vpeft methods --backbones # method x backbone family: works, or the part that is missing
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

HELP = "list methods, their family and characteristics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--options", action="store_true", help="include each method's options")
    p.add_argument(
        "--backbones",
        action="store_true",
        help="method x backbone family table, found by adapting a tiny model of each family",
    )


def method_options(name: str) -> dict[str, dict]:
    from vpeft.registry import get_method

    cls = get_method(name).config_cls
    cfg = cls()
    return {
        f.name: {"default": cfg.to_dict()[f.name], "help": f.metadata.get("help", "")}
        for f in fields(cls)
    }


def backbones_table(as_json: bool) -> int:
    """Print which method adapts which backbone family (and what is missing where not)."""
    from rich.console import Console
    from rich.table import Table

    from vpeft.backbones.catalog import compatibility
    from vpeft.registry import list_methods

    cells = compatibility([m.name for m in list_methods()])
    if as_json:
        print(json.dumps([c.as_dict() for c in cells], indent=2))
        return 0
    families = list(dict.fromkeys(c.family for c in cells))
    table = Table(title="vpeft methods x backbone families (yes, or the missing part)")
    for col in ("method", *families):
        table.add_column(col)
    by_method: dict[str, dict[str, str]] = {}
    for c in cells:
        text = "yes" if c.works else f"{'ERROR' if c.error else 'no'}: {c.missing}"
        by_method.setdefault(c.method, {})[c.family] = text
    for method, row in by_method.items():
        table.add_row(method, *(row[f] for f in families))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vpeft.registry import list_methods

    if args.backbones:
        return backbones_table(args.json)
    rows = [r.as_dict() for r in list_methods()]
    if args.options:
        for r in rows:
            r["options"] = method_options(r["name"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    yes = {True: "yes", False: "no"}
    table = Table(title="vpeft methods")
    for col in (
        "name",
        "family",
        "sub-family",
        "mergeable",
        "structure-preserving",
        "inference overhead",
        "memory-saving",
        "searchable",
        "requires",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["family"],
            r["subfamily"],
            yes[r["mergeable"]],
            yes[r["structure_preserving"]],
            yes[r["inference_overhead"]],
            yes[r["memory_saving"]],
            yes[r["searchable"]],
            ", ".join(r["requires"]) or "-",
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    if args.options:
        for r in rows:  # each option with its default and help (where vpeft departs from the
            console.print(f"[bold]{r['name']}[/bold]")  # paper, the help says so)
            for k, v in r["options"].items():
                console.print(f"  {k} = {v['default']!r}: {v['help']}", markup=False)
    return 0
