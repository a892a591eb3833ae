"""Argument types and options shared by the command-line subcommands.

torch is imported only where a device is resolved, so that building a parser (and
``captum-fullgrad --help``) does not load it.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def device_spec(text: str) -> str:
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text.strip().lower()) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text.strip().lower()


def method_parameter(text: str) -> str:
    """``METHOD.PARAMETER=VALUE`` (``--param``), checked for its shape only: the method
    registry checks the method, the parameter and the value."""
    if re.fullmatch(r"[A-Za-z][\w-]*\.\w+=.*", text.strip()) is None:
        raise argparse.ArgumentTypeError(
            f"expected METHOD.PARAMETER=VALUE, e.g. integrated_gradients.n_steps=20, got {text!r}"
        )
    return text.strip()


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--no-progress`` and ``--threads``, the same for every subcommand."""
    parser.add_argument(
        "--device",
        type=device_spec,
        default="auto",
        help="where to run: auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
        "(default: auto)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice)",
    )


def resolve_device(spec: str) -> "torch.device":
    """``auto`` (CUDA when available, else CPU) or an explicit device that exists here.

    Raises ``ValueError`` naming the problem (the subcommands turn it into exit status 2).
    """
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise ValueError(f"--device {spec}: MPS is not available on this machine")
    return device
