"""Writing a figure to PNG, PDF or SVG, atomically (:func:`save_figure`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

from matplotlib.figure import Figure

from .._io import atomic_write
from ._common import DEFAULT_DPI

_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def save_figure(
    figure: Figure, path: Union[str, "os.PathLike[str]"], *, dpi: int = DEFAULT_DPI
) -> Path:
    """Write ``figure`` to ``path`` as PNG, PDF or SVG (by extension), atomically.

    ``dpi`` sets the PNG's resolution (default :data:`DEFAULT_DPI`, 200); PDF and SVG are
    vector files whose text stays text.

    The figure is written to a temporary file in the same directory and moved into place
    with :func:`os.replace`, so ``path`` is either the complete new file or untouched,
    never a partial file. Missing parent directories are created.

    Raises:
        ValueError: the extension is not ``.png``, ``.pdf`` or ``.svg``.
        OSError: the directory cannot be created or written.
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {str(path)!r}: use a .png, .pdf or .svg file name"
        )
    atomic_write(
        path,
        lambda handle: figure.savefig(handle, format=fmt, dpi=dpi, metadata=_metadata(fmt)),
        binary=True,
    )
    return path


def _metadata(fmt: str) -> Dict[str, Any]:
    if fmt == "png":
        return {"Software": "captum-fullgrad"}
    if fmt == "pdf":
        return {"Creator": "captum-fullgrad", "CreationDate": None}
    return {}
