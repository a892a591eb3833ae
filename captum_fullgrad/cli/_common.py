"""The one error and exit path of every subcommand, and the :class:`Command` declaration.

A subcommand's ``run(args)`` reports bad input by raising :class:`CliError` (or converts a
library exception with :func:`bad_input`); :func:`run_command` turns that into one line
``captum-fullgrad: error: ...`` on stderr and exit status 2, Ctrl-C into exit status 130
with nothing printed, and any other exception into one line and exit status 1 (the
traceback too when ``CAPTUM_FULLGRAD_DEBUG=1``). It also applies ``--threads`` and
restores torch's thread count afterwards. Nothing here imports torch unless ``--threads``
is given, so ``--help`` stays fast.

Code outside the command line that runs a subcommand-like function (for example
``python -m captum_fullgrad.evaluation.command``) goes through the same path::

    from captum_fullgrad.cli._common import CliError, run_command

    def run(args):            # raises CliError("...") on bad input
        ...
    sys.exit(run_command(run, args))
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Tuple, Type

PROG = "captum-fullgrad"
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
#: What shells report for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
#: Set to 1 to print the traceback of unexpected errors.
DEBUG_ENV_VAR = "CAPTUM_FULLGRAD_DEBUG"


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, parser builder and implementation.

    ``add_arguments(parser)`` declares the options; ``run(args) -> int`` does the work and
    returns the exit status (raising :class:`CliError` for bad input). A subcommand module
    exposes one as ``COMMAND`` and is listed in ``captum_fullgrad.cli.COMMAND_MODULES``.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    epilog: str = ""


def one_line(text: Any) -> str:
    """``text`` with every run of white space (newlines included) turned into one space."""
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`CliError` (one line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


def fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
    """Print ``captum-fullgrad: error: <message>`` as one line on stderr; return ``status``."""
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    return status


@contextlib.contextmanager
def bad_input(*types: Type[BaseException], prefix: str = "", limit: int = 500) -> Iterator[None]:
    """Turn the exceptions ``types`` (default ``ValueError``) raised inside the block into
    :class:`CliError`, their message prefixed with ``prefix`` (e.g. ``"--methods: "``)."""
    caught: Tuple[Type[BaseException], ...] = types or (ValueError,)
    try:
        yield
    except caught as exc:
        raise CliError(prefix + one_line(exc)[:limit]) from None


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``run(args)`` through the common error and exit path; return the exit status."""
    threads = getattr(args, "threads", None)
    previous = None
    try:
        if threads:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
        return int(run(args))
    except CliError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return interrupted()
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if os.environ.get(DEBUG_ENV_VAR, "").strip() not in ("", "0"):
            traceback.print_exc()
        return fail(
            f"internal error: {type(exc).__name__}: {exc} "
            f"(set {DEBUG_ENV_VAR}=1 for the traceback)",
            EXIT_INTERNAL,
        )
    finally:
        if previous is not None:
            import torch

            torch.set_num_threads(previous)


def interrupted() -> int:
    """Ctrl-C: no traceback and no message (the terminal shows ``^C``), exit status 130."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    return EXIT_INTERRUPTED
