"""The ``captum-fullgrad`` command line: one module per subcommand, one error/exit path.

Layout:

- ``_common.py``: the error and exit path shared by every subcommand (:class:`CliError`,
  :func:`~captum_fullgrad.cli._common.run_command`: one-line errors, exit status 2 for bad
  input, 130 for Ctrl-C with nothing printed, 1 for internal errors) and the
  :class:`Command` declaration.
- ``_inputs.py`` (models, weights, images, method lists, devices) and ``_outputs.py``
  (output files and directories, written atomically): helpers the subcommands share.
- ``demo.py``, ``compare.py``, ``decompose.py``, ``bench.py``, ``evaluate.py``: one
  subcommand each, declared as ``COMMAND = Command(name, help, add_arguments, run, ...)``.

**Adding a subcommand** is one module and one line: write ``cli/NAME.py`` with
``add_arguments(parser)``, ``run(args) -> int`` (raise :class:`CliError` for bad input)
and ``COMMAND``, and add ``"NAME"`` to :data:`COMMAND_MODULES` (see ``docs/extending.md``).
Subcommand modules import torch and the library inside their functions: only the chosen
subcommand's options are built, so ``captum-fullgrad --help`` loads neither.

``captum-fullgrad``, ``python -m captum_fullgrad`` and ``python -m captum_fullgrad.cli``
all run :func:`main`; see ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence, Tuple

from .. import __version__
from ._common import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    CliError,
    Command,
    Parser,
    fail,
    interrupted,
    one_line,
    run_command,
)
from .demo import DEMO_GRID_DPI, DEMO_SEED, sample_photos  # the old cli.py's public names

__all__ = [
    "COMMANDS",
    "COMMAND_MODULES",
    "DEMO_GRID_DPI",
    "DEMO_SEED",
    "CliError",
    "Command",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "build_parser",
    "load_command",
    "main",
    "sample_photos",
]

#: The subcommand modules, in ``--help`` order: a name in this package or a dotted module
#: path, each exposing ``COMMAND``.
COMMAND_MODULES: Sequence[str] = ("demo", "compare", "decompose", "bench", "evaluate", "attribute")


def load_command(module: str) -> Command:
    """The :class:`Command` that ``module`` (a module of this package, or a dotted path)
    declares as ``COMMAND``."""
    name = module if "." in module else f"{__name__}.{module}"
    command = getattr(importlib.import_module(name), "COMMAND", None)
    if not isinstance(command, Command):
        raise TypeError(f"module {name!r} declares no COMMAND = Command(...)")
    return command


#: Every subcommand, in ``--help`` order (read at each call of :func:`main`).
COMMANDS: List[Command] = [load_command(m) for m in COMMAND_MODULES]


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``captum-fullgrad``, one subparser per :data:`COMMANDS` entry.

    ``only``: declare the options of that subcommand alone (what :func:`main` does, so
    that a command's options, and the imports they need, are built only when it runs);
    None declares every subcommand's options.
    """
    parser = Parser(
        prog=PROG,
        description="Full-Jacobian (FullGrad) saliency: compare methods, decompose outputs, "
        "run the demo.",
        epilog="Errors are one line on stderr; exit status 0 on success, 2 on bad input, "
        "1 on internal errors, 130 when interrupted (Ctrl-C).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (repeatable), e.g. one that registers your own saliency "
        "methods for --methods; it must be importable (set PYTHONPATH)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            epilog=command.epilog,
        )
        if only is None or only == command.name:
            command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def _split(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """The subcommand named in ``argv`` (its first word that is not a top-level option or
    the value of ``--import``) and the modules that ``--import`` names before it."""
    imports: List[str] = []
    words = iter(argv)
    for word in words:
        if word == "--import":
            imports.append(next(words, ""))
        elif word.startswith("--import="):
            imports.append(word.partition("=")[2])
        elif not word.startswith("-"):
            return word, imports
    return None, imports


def _import_modules(modules: Sequence[str]) -> None:
    for module in modules:
        if not module.strip():
            raise CliError("--import: give a module name, e.g. --import my_methods")
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's module: one line, exit 2
            raise CliError(f"--import {module}: {type(exc).__name__}: {one_line(exc)}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``captum-fullgrad`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        chosen, imports = _split(arguments)
        try:
            # Before the parser: an imported module may register methods that the chosen
            # subcommand's options mention.
            _import_modules(imports)
        except CliError as exc:
            return fail(str(exc), EXIT_BAD_INPUT)
        parser = build_parser(only=chosen or "")
        try:
            args = parser.parse_args(arguments)
        except CliError as exc:
            return fail(str(exc), EXIT_BAD_INPUT)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        return run_command(args._run, args)
    except KeyboardInterrupt:  # while building the parser or importing a subcommand
        return interrupted()
