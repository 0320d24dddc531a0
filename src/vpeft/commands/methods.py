"""List the registered PEFT methods with their place in the taxonomy and their characteristics.

Examples:
  vpeft methods             # table
  vpeft methods --json      # the same as JSON
  vpeft methods --options   # also each method's options and defaults
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


def method_options(name: str) -> dict[str, dict]:
    from vpeft.registry import get_method

    cls = get_method(name).config_cls
    cfg = cls()
    return {
        f.name: {"default": cfg.to_dict()[f.name], "help": f.metadata.get("help", "")}
        for f in fields(cls)
    }


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vpeft.registry import list_methods

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
        for r in rows:
            opts = ", ".join(f"{k}={v['default']!r}" for k, v in r["options"].items())
            console.print(f"[bold]{r['name']}[/bold]: {opts}")
    return 0
