"""Reading image files for the command line: any PIL mode, 8 or 16 bits, as 8-bit RGB.

torchvision's decoder returns 16-bit PNGs as ``uint16`` tensors and refuses some modes, which
the models' transforms (made for ``uint8`` or ``[0, 1]`` floats) then misread. Pillow reads
every mode; :func:`read_image` turns each into a ``(3, H, W)`` ``uint8`` RGB tensor with one
documented rule per kind of pixel, and raises :class:`ImageReadError` otherwise.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageReadError", "read_image"]

# Integer modes of more than 8 bits: values are 16-bit intensities, 0..65535.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_SIXTEEN_BIT_MAX = 65535


class ImageReadError(ValueError):
    """The file is not an image Pillow can decode, or its pixel values cannot be shown."""


def read_image(path: Union[str, "os.PathLike[str]"]) -> Tensor:
    """Read an image file as a ``(3, H, W)`` ``uint8`` RGB tensor.

    Per Pillow mode:

    - 8-bit modes (``RGB``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``1``, ...): Pillow's own
      conversion to RGB; an alpha channel (``RGBA``, ``LA``, ``PA``) is dropped, as
      torchvision's ``ImageReadMode.RGB`` does.
    - 16-bit and 32-bit integer grey (``I;16``, ``I``; a 16-bit PNG): ``round(v / 257)``,
      which maps 0..65535 onto 0..255 exactly; values outside 0..65535 are refused.
    - 32-bit float grey (``F``): ``round(255 * v)`` for values in [0, 1]; others are refused.
    - animated files (GIF, APNG): the first frame. The EXIF orientation is applied, so the
      picture is upright as viewers show it.

    Raises:
        ImageReadError: not a decodable image, or pixel values outside the ranges above.
        OSError: the file cannot be opened.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.seek(0)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except UnidentifiedImageError:
        raise ImageReadError(f"{os.fspath(path)!r} is not an image file Pillow can read") from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot decode {os.fspath(path)!r}: {exc}") from None
    except OSError as exc:  # truncated files raise OSError("image file is truncated")
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ImageReadError(f"cannot decode {os.fspath(path)!r}: {exc}") from None
    mode = image.mode
    if mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT_MAX):
            raise ImageReadError(
                f"{os.fspath(path)!r}: {mode} pixel values span {values.min()}..{values.max()}, "
                f"outside the 16-bit range 0..{_SIXTEEN_BIT_MAX}"
            )
        grey = np.rint(values / 257.0).astype(np.uint8)
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (
            not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0
        ):
            raise ImageReadError(
                f"{os.fspath(path)!r}: floating-point pixels must lie in [0, 1], got "
                f"{np.nanmin(values):g}..{np.nanmax(values):g}"
            )
        grey = np.rint(values * 255.0).astype(np.uint8)
    else:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
    if grey.ndim != 2:  # pragma: no cover - every wide mode above is single-channel
        raise ImageReadError(f"{os.fspath(path)!r}: unexpected {mode} array shape {grey.shape}")
    return torch.from_numpy(np.ascontiguousarray(grey)).unsqueeze(0).expand(3, -1, -1).contiguous()
