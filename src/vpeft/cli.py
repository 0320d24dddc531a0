"""The ``vpeft`` command line: a thin layer that parses arguments and calls the library.

Each subcommand is a module in :mod:`vpeft.commands` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; they are discovered, so a new command is one new file. Command modules are
light at import time (torch and timm are imported inside ``run``), and only the chosen command's
flags are built, so ``vpeft --help`` and ``vpeft train --help`` answer at once.

A user error, whichever command meets it, is reported here as one line on stderr with exit code 2:
what the library raises for bad input (``ValueError`` and its subclasses such as
``CheckpointError``, ``KeyError``, ``TypeError``), and ``OSError`` (missing files, a read-only or
full file system). ``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType

import vpeft.commands

USER_ERRORS = (KeyError, ValueError, TypeError, OSError)


def _commands() -> dict[str, ModuleType]:
    """Command name -> module, in name order."""
    mods = {}
    for info in sorted(pkgutil.iter_modules(vpeft.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            mod = importlib.import_module(f"vpeft.commands.{info.name}")
            mods[getattr(mod, "NAME", info.name)] = mod
    return mods


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``only`` the flags of that one command alone (the
    others are listed with their help line, but their flags, and what they import, are skipped;
    ``only=""`` skips every command's flags)."""
    parser = argparse.ArgumentParser(
        prog="vpeft",
        description="Parameter-efficient fine-tuning of pre-trained vision models.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in _commands().items():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if only is None or only == name:
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def error_line(error: BaseException) -> str:
    """One line that says what went wrong, from any user error.

    A DataLoader worker re-raises its error with the worker's whole traceback as the message;
    only the original error's last line is kept. Messages listing several problems are joined.
    """
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    elif isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Original Traceback" in text and lines:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        lines = [rest if sep and head.replace(".", "").isidentifier() else last]
    if not lines:
        return type(error).__name__
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # no command named (`vpeft --help`): only the list of commands, no command's flags
    args = build_parser(only=_chosen(argv) or "").parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"vpeft {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
