"""``python -m captum_fullgrad.evaluation.command [options]``: ``captum-fullgrad evaluate``
on its own.

The subcommand lives in :mod:`captum_fullgrad.cli.evaluate`; this module keeps the names
and the entry point that earlier releases and the docs show: ``add_arguments(parser)``,
``add_parser(subparsers)``, ``run(args) -> int`` (through the CLI's common error and exit
path: one line on stderr and exit status 2 for bad input), :func:`main`, and the
constants.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from ..cli._common import EXIT_BAD_INPUT, EXIT_OK, PROG, run_command
from ..cli.evaluate import (
    DEFAULT_DATA_SEED,
    DESCRIPTION,
    EPILOG,
    HELP,
    MASKED_MODELS,
    add_arguments,
)
from ..cli.evaluate import run as _run

__all__ = [
    "DEFAULT_DATA_SEED",
    "DESCRIPTION",
    "EPILOG",
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "HELP",
    "MASKED_MODELS",
    "PROG",
    "add_arguments",
    "add_parser",
    "main",
    "run",
]


def run(args: argparse.Namespace) -> int:
    """Run ``captum-fullgrad evaluate`` with parsed ``args``; return the exit status
    (0, or 2 with one line on stderr for bad input; ``--threads`` applied and restored)."""
    return run_command(_run, args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``subparsers`` (from ``add_subparsers()``); its
    defaults carry ``_run=run``."""
    parser = subparsers.add_parser("evaluate", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    add_arguments(parser)
    parser.set_defaults(_run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """The subcommand on its own: the same options, outputs and errors as
    ``captum-fullgrad evaluate``."""
    from ..cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
