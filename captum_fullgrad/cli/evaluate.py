"""``captum-fullgrad evaluate``: the evaluation suite on generated scenes with object masks.

A thin module for now: the options and the run live in
:mod:`captum_fullgrad.evaluation.command` (``add_arguments`` and ``run``), imported only
when this subcommand is chosen, so ``captum-fullgrad --help`` does not load the suite.
"""

from __future__ import annotations

import argparse

from ._common import Command

#: One line for ``captum-fullgrad --help`` (the full description comes with the options).
HELP = (
    "score every saliency method (and three controls) with localisation, perturbation, "
    "ROAD, sanity and Captum metrics"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation import command

    parser.description = command.DESCRIPTION
    parser.epilog = command.EPILOG
    command.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import command

    return command.run(args)


COMMAND = Command("evaluate", HELP, add_arguments, run)
