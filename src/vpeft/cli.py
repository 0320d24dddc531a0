"""The ``vpeft`` command line: a thin layer that parses arguments and calls the library.

Each subcommand is a module in :mod:`vpeft.commands` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; they are discovered, so a new command is one new file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import vpeft.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vpeft",
        description="Parameter-efficient fine-tuning of pre-trained vision models.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(vpeft.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"vpeft.commands.{info.name}")
        name = getattr(mod, "NAME", info.name)
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except (KeyError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        # user errors: one clear line, no traceback (use --verbose for one)
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vpeft {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
