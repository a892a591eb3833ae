"""What the subcommands write: output files and directories, checked before any work.

Figures and text are written to a temporary file and moved into place, so a failed or
interrupted command never leaves a half-written output. torch and matplotlib are imported
inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._common import CliError

FIGURE_SUFFIXES = (".png", ".pdf")


def check_writable_dir(directory: Path, what: str) -> None:
    """Fail early if ``directory`` cannot be created or written, without creating it."""
    probe = directory.resolve()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CliError(
            f"cannot create {what} {str(directory)!r}: {str(probe)!r} is not a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CliError(
            f"cannot create or write {what} {str(directory)!r}: permission denied on {str(probe)!r}"
        )


def make_dir(directory: Path, what: str) -> None:
    """Create ``directory`` (and its parents) or raise :class:`CliError`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create {what} {str(directory)!r}: {exc.strerror or exc}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CliError(f"cannot write to {what} {str(directory)!r}: permission denied")


def output_directory(text: str, what: str = "--out") -> Path:
    """An output directory that is not a file and can be created (it is not created yet)."""
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"{what} {text!r} exists and is not a directory")
    check_writable_dir(out, "output directory")
    return out


def output_file(text: str) -> Path:
    """The ``--out`` figure file: ``.png`` or ``.pdf``, in a directory that can be written."""
    path = Path(text).expanduser()
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise CliError(f"--out {text!r}: the file name must end in .png or .pdf")
    if path.is_dir():
        raise CliError(f"--out {text!r} is a directory; give a file name ending in .png or .pdf")
    check_writable_dir(path.parent, "output directory")
    return path


def save(figure: Any, path: Path, dpi: int = 150) -> None:
    """Write ``figure`` to ``path`` (format from the suffix) atomically."""
    from ..figures import save_figure

    make_dir(path.parent, "output directory")
    try:
        save_figure(figure, path, dpi=dpi)
    except OSError as exc:
        raise CliError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    from .._io import write_text as write

    make_dir(path.parent, "output directory")
    try:
        write(path, text)
    except OSError as exc:
        raise CliError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
