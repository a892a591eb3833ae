"""What every figure shares: print size, colour maps, input checks, the conversion of
images for display, and the fonts and text of labels."""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

#: Colour map of every saliency map in :func:`comparison_grid` (perceptually uniform).
SALIENCY_CMAP = "inferno"


#: Diverging colour map of the signed maps in :func:`decomposition_figure`.
SIGNED_CMAP = "RdBu_r"


#: Default resolution of PNG files (PDF and SVG are vector): 200 dpi keeps a 7 in figure's
#: 7 pt labels legible in print.
DEFAULT_DPI = 200


#: A full page width in inches: figures are laid out to be legible at this width.
PRINT_WIDTH_IN = 7.0


#: The smallest font size in points, once a figure is scaled to :data:`PRINT_WIDTH_IN`.
MIN_FONT_PT = 7.0


def check_images(images: Any, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a tensor (N, C, H, W), got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be floating point (the model's input), got dtype {images.dtype}"
        )
    return images


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_percentile(percentile: float) -> float:
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, (int, float))
        or not 0 < percentile <= 100
    ):
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    return float(percentile)


def to_display(images: Any, n: int, reference: Tensor) -> List[np.ndarray]:
    """``n`` float arrays ``(H, W, 3)`` or ``(H, W)`` in [0, 1] for imshow."""
    if images is None:
        images = reference.detach().float().cpu()
        if float(images.min()) < 0.0 or float(images.max()) > 1.0:
            # Normalised model inputs: rescale each image to [0, 1] for display.
            flat = images.flatten(1)
            low = flat.min(dim=1).values.view(-1, 1, 1, 1)
            high = flat.max(dim=1).values.view(-1, 1, 1, 1)
            images = (images - low) / (high - low).clamp_min(1e-12)
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim == 4:
        channel_first = array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3)
        if channel_first or (array.shape[1] in (1, 3) and isinstance(images, Tensor)):
            array = array.transpose(0, 2, 3, 1)
    if array.ndim != 4 or array.shape[0] != n or array.shape[-1] not in (1, 3):
        raise ValueError(
            f"display images must be {n} image(s) of shape (3, H, W), (H, W, 3) or (1, H, W); "
            f"got an array of shape {array.shape}"
        )
    array = (
        array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    )
    array = np.clip(array, 0.0, 1.0)
    return [a[..., 0] if a.shape[-1] == 1 else a for a in array]


def map_2d(saliency: Any, name: str = "saliency") -> Tensor:
    """A ``(H, W)`` float64 tensor from one map ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``."""
    values = saliency if isinstance(saliency, Tensor) else torch.as_tensor(np.asarray(saliency))
    values = values.detach().cpu().double()
    while values.dim() > 2 and values.shape[0] == 1:
        values = values[0]
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(
            f"{name} must be one map of shape (H, W), (1, H, W) or (1, 1, H, W), "
            f"got shape {tuple(np.shape(saliency))}"
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return values


def signed_scale(values: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of ``|values|``, or ``max |values|`` where it is zero."""
    magnitude = values.detach().abs().double().reshape(-1)
    if magnitude.numel() == 0:
        return 0.0
    if percentile >= 100.0:
        return float(magnitude.max())
    k = max(1, int(math.ceil(percentile / 100.0 * magnitude.numel())))
    scale = float(magnitude.kthvalue(k).values)
    return scale if scale > 0 else float(magnitude.max())


def class_name(categories: Optional[Sequence[str]], index: int) -> str:
    if categories is not None and 0 <= index < len(categories):
        return str(categories[index])
    return f"class {index}"


def format_probability(p: float) -> str:
    """A probability to three significant figures: ``0.873``, ``0.0123``, ``4.56e-05``."""
    if math.isnan(p):
        return "nan"
    if p == 0.0:
        return "0"
    return f"{p:#.3g}"


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def clean_axes(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def labelled(name: str, prefix: str, probability: str, width: int) -> List[str]:
    """``prefix + name  p=probability`` on one line of ``width`` characters, or on two."""
    name = short(name, width - len(prefix))
    line = f"{prefix}{name}  p={probability}"
    return [line] if len(line) <= width else [f"{prefix}{name}", f"p={probability}"]


def mark_all_zero(ax: Any, fontsize: float) -> None:
    """Say so on a panel whose map is zero everywhere (else it is a plain dark square)."""
    ax.text(
        0.5,
        0.5,
        "all zero",
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=fontsize,
        color="black",
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.5", "lw": 0.5},
    )


def font_scale(width_in: float) -> float:
    """Factor on every font size so that text stays >= :data:`MIN_FONT_PT` once the figure is
    scaled to :data:`PRINT_WIDTH_IN` (a full page width): 1 for figures at most that wide."""
    return max(1.0, width_in / PRINT_WIDTH_IN)


def chars_for(width_in: float, fontsize: float) -> int:
    """How many characters of ``fontsize`` points fit in ``width_in`` inches (DejaVu Sans'
    average advance is about 0.6 em)."""
    return max(6, int(width_in * 72.0 / (0.6 * fontsize)))
