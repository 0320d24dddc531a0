"""Subcommands of the ``vpeft`` CLI, one module each (see :mod:`vpeft.cli`)."""
