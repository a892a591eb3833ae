"""Figures: the seed paper's Table 5 (method comparison) and Figure 1 (full-Jacobian decomposition).

Everything here builds :class:`matplotlib.figure.Figure` objects directly (no
``matplotlib.pyplot``, so no global figure state is created or leaked) and renders with the
Agg / PDF backends through :func:`save_figure`.

- :func:`comparison_grid`: one row per image; columns are the image and one saliency map
  per method (default: guided backprop, integrated gradients, SmoothGrad, Grad-CAM,
  FullGrad and the bias-Jacobian-only map, as in Table 5). Each row is labelled with the
  predicted class and its softmax probability.
- :func:`overlay`: a map blended over its image (pytorch-grad-cam's ``show_cam_on_image``),
  unsigned with :data:`SALIENCY_CMAP` or signed with the diverging :data:`SIGNED_CMAP`.
- :func:`decomposition_figure`: eq. 1 for one image. The input-gradient term and every
  spatial block's channel-summed bias-Jacobian, signed, each titled with its spatial sum,
  and the line showing that these terms, plus the share of the non-spatial (e.g. Linear)
  biases, add up to the network's output ``f(x)``.

**Normalisation of the comparison grid.** Every map ``m`` (non-negative, see
:mod:`captum_fullgrad.methods`) is shown as ``clip(m / q99(m), 0, 1)``, where ``q99(m)``
is the 99th percentile of that map's own pixels (:func:`normalize_maps`); zero stays zero.
This is the usual display practice (e.g. Smilkov et al.'s SmoothGrad code clips at the
99th percentile): a handful of extreme pixels cannot flatten the rest of the map. Maps are
therefore comparable in *shape* (where a method puts its mass), not in absolute scale,
which differs between methods by orders of magnitude. All maps share one colour map.

**Print size.** Both figures are laid out for a page width (:data:`PRINT_WIDTH_IN`, 7 in)
with no text under :data:`MIN_FONT_PT` (7 pt); a figure made wider (``cell_size``) scales its
fonts with its width, so that they are still 7 pt once it is scaled to a page. PNGs are
written at :data:`DEFAULT_DPI` (200) and PDFs are vector.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ._device import synchronize
from ._io import atomic_write
from .decomposition import full_jacobian
from .methods import DEFAULT_TABLE5_METHODS, AttributionMethod, resolve_methods

__all__ = [
    "AttributionMaps",
    "DEFAULT_TABLE5_METHODS",
    "DecompositionSummary",
    "attribution_maps",
    "comparison_grid",
    "decomposition_figure",
    "decomposition_summary",
    "format_probability",
    "normalize_maps",
    "normalize_signed_map",
    "overlay",
    "save_figure",
]

MethodSpec = Union[str, AttributionMethod]

#: Colour map of every saliency map in :func:`comparison_grid` (perceptually uniform).
SALIENCY_CMAP = "inferno"
#: Diverging colour map of the signed maps in :func:`decomposition_figure`.
SIGNED_CMAP = "RdBu_r"
_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
#: Default resolution of PNG files (PDF and SVG are vector): 200 dpi keeps a 7 in figure's
#: 7 pt labels legible in print.
DEFAULT_DPI = 200
#: A full page width in inches: figures are laid out to be legible at this width.
PRINT_WIDTH_IN = 7.0
#: The smallest font size in points, once a figure is scaled to :data:`PRINT_WIDTH_IN`.
MIN_FONT_PT = 7.0


# --------------------------------------------------------------------------------------
# Computing and normalising maps
# --------------------------------------------------------------------------------------


@dataclass
class AttributionMaps:
    """Saliency maps of several methods on one batch, with the model's predictions.

    Attributes:
        maps: method name -> ``(N, 1, H, W)`` float32 maps on the CPU, in method order.
        labels: method name -> figure label.
        seconds: method name -> wall-clock seconds spent computing its maps (all batches).
        targets: ``(N,)`` the explained class of each image.
        predictions: ``(N,)`` the predicted class (argmax of the logits).
        probabilities: ``(N, K)`` softmax of the logits.
    """

    maps: "OrderedDict[str, Tensor]"
    labels: Dict[str, str]
    seconds: Dict[str, float]
    targets: Tensor
    predictions: Tensor
    probabilities: Tensor


def _resolve_methods(methods: Union[MethodSpec, Sequence[MethodSpec]]) -> List[AttributionMethod]:
    # The registry's one reader of method lists: the same names and errors as the CLI.
    return resolve_methods(methods)


def _batches(n: int, batch_size: Optional[int]) -> List[slice]:
    size = n if not batch_size else batch_size
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _check_images(images: Any, name: str = "images") -> Tensor:
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


def _resolve_targets(targets: Any, predictions: Tensor, num_classes: int) -> Tensor:
    n = predictions.shape[0]
    if targets is None:
        return predictions.clone()
    if isinstance(targets, int) and not isinstance(targets, bool):
        resolved = torch.full((n,), targets, dtype=torch.long)
    else:
        resolved = torch.as_tensor(targets).reshape(-1).to(torch.long).cpu()
        if resolved.numel() == 1 and n > 1:
            resolved = resolved.expand(n).clone()
    if resolved.numel() != n:
        raise ValueError(f"got {resolved.numel()} targets for {n} images")
    if num_classes > 0 and ((resolved < 0) | (resolved >= num_classes)).any():
        raise ValueError(
            f"targets must be class indices in [0, {num_classes - 1}], got {resolved.tolist()}"
        )
    return resolved


def _logits(model: Any, inputs: Tensor, batch_size: Optional[int]) -> Tensor:
    outputs = []
    with torch.no_grad():
        for part in _batches(inputs.shape[0], batch_size):
            output = model(inputs[part])
            if not isinstance(output, Tensor) or output.dim() != 2:
                raise ValueError("the model must return logits of shape (N, K)")
            outputs.append(output.detach().float().cpu())
    return torch.cat(outputs)


def attribution_maps(
    model: Any,
    inputs: Tensor,
    targets: Any = None,
    methods: Union[MethodSpec, Sequence[MethodSpec]] = DEFAULT_TABLE5_METHODS,
    *,
    batch_size: Optional[int] = None,
    progress: bool = False,
    description: str = "saliency maps",
) -> AttributionMaps:
    """Run several saliency methods on a batch, in chunks, and time each.

    Args:
        model: classifier in eval mode returning logits ``(N, K)``.
        inputs: ``(N, C, H, W)`` model inputs (already preprocessed), on the model's device.
        targets: classes to explain: ``None`` (the predicted classes), one int for all, or
            one per image.
        methods: method names (see :func:`~captum_fullgrad.methods.available_methods`)
            or :class:`~captum_fullgrad.methods.AttributionMethod` objects.
        batch_size: images per call of a method (``None``: all at once).
        progress: show a tqdm progress bar on stderr (one step per method and chunk).
        description: the progress bar's label (e.g. the stage of a longer run).

    Returns:
        :class:`AttributionMaps`.
    """
    inputs = _check_images(inputs, "inputs")
    resolved = _resolve_methods(methods)
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    logits = _logits(model, inputs, batch_size)
    probabilities = logits.softmax(dim=1)
    predictions = logits.argmax(dim=1)
    target_tensor = _resolve_targets(targets, predictions, logits.shape[1])
    parts = _batches(inputs.shape[0], batch_size)
    device = inputs.device

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(resolved) * len(parts),
        desc=description,
        unit="batch",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    maps: "OrderedDict[str, Tensor]" = OrderedDict()
    seconds: Dict[str, float] = {}
    try:
        for method in resolved:
            bar.set_postfix_str(method.name)
            chunks = []
            elapsed = 0.0
            for part in parts:
                synchronize(device)
                start = time.perf_counter()
                result = method(model, inputs[part], target_tensor[part].to(device))
                synchronize(device)
                elapsed += time.perf_counter() - start
                chunks.append(result.cpu())
                bar.update(1)
            maps[method.name] = torch.cat(chunks)
            seconds[method.name] = elapsed
    finally:
        bar.close()
    return AttributionMaps(
        maps=maps,
        labels={m.name: m.label for m in resolved},
        seconds=seconds,
        targets=target_tensor,
        predictions=predictions,
        probabilities=probabilities,
    )


def normalize_maps(maps: Tensor, percentile: float = 99.0) -> Tensor:
    """Scale each non-negative map to ``[0, 1]``: divide by its own ``percentile``-th
    percentile and clip at 1 (zero stays zero).

    A map whose percentile is zero (mostly zero, e.g. a sparse Grad-CAM) is divided by its
    maximum instead; an all-zero map stays zero.

    Args:
        maps: ``(N, 1, H, W)``, ``(N, H, W)`` or ``(H, W)`` non-negative maps.
        percentile: in ``(0, 100]``; 100 is plain division by the maximum.

    Returns:
        Float32 tensor of the same shape with values in ``[0, 1]``.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if maps.dim() < 2:
        raise ValueError(
            f"maps must have at least 2 dimensions (H, W), got shape {tuple(maps.shape)}"
        )
    shape = maps.shape
    flat = (
        maps.detach().float().reshape(-1, shape[-2] * shape[-1])
        if maps.dim() > 2
        else maps.detach().float().reshape(1, -1)
    )
    flat = flat.clamp(min=0)
    if flat.shape[1] <= 16_000_000:
        scale = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    else:  # torch.quantile's size limit
        k = max(1, int(math.ceil(percentile / 100.0 * flat.shape[1])))
        scale = flat.kthvalue(k, dim=1, keepdim=True).values
    peak = flat.amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, peak)
    scaled = torch.where(
        scale > 0, flat / scale.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(flat)
    )
    return scaled.clamp(0.0, 1.0).reshape(shape)


# --------------------------------------------------------------------------------------
# Display helpers and overlays
# --------------------------------------------------------------------------------------


def _to_display(images: Any, n: int, reference: Tensor) -> List[np.ndarray]:
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


def _map_2d(saliency: Any, name: str = "saliency") -> Tensor:
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


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_percentile(percentile: float) -> float:
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, (int, float))
        or not 0 < percentile <= 100
    ):
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    return float(percentile)


def normalize_signed_map(values: Tensor, percentile: float = 100.0) -> Tensor:
    """Scale a signed map to ``[-1, 1]``: divide by the ``percentile``-th percentile of its
    absolute values (its maximum where that is zero) and clip; zero stays zero.

    Args:
        values: a map of any shape (normalised as a whole).
        percentile: in ``(0, 100]``; 100 is division by ``max |m|``.

    Returns:
        Float64 tensor of the same shape in ``[-1, 1]`` (all zeros for an all-zero map).
    """
    percentile = _check_percentile(percentile)
    values = values.detach().double()
    scale = _signed_scale(values, percentile)
    if scale == 0.0:
        return torch.zeros_like(values)
    return (values / scale).clamp(-1.0, 1.0)


def _signed_scale(values: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of ``|values|``, or ``max |values|`` where it is zero."""
    magnitude = values.detach().abs().double().reshape(-1)
    if magnitude.numel() == 0:
        return 0.0
    if percentile >= 100.0:
        return float(magnitude.max())
    k = max(1, int(math.ceil(percentile / 100.0 * magnitude.numel())))
    scale = float(magnitude.kthvalue(k).values)
    return scale if scale > 0 else float(magnitude.max())


def overlay(
    image: Any,
    saliency: Any,
    *,
    alpha: float = 0.5,
    cmap: Optional[str] = None,
    percentile: float = 99.0,
    signed: Optional[bool] = None,
) -> np.ndarray:
    """Blend a saliency map over its image (pytorch-grad-cam's ``show_cam_on_image``).

    The map is normalised to a colour index ``v`` and coloured with ``cmap``; every pixel is
    then ``(1 - alpha) * image + alpha * cmap(v)``:

    - a non-negative map (``signed=False``): ``v = clip(m / q(m), 0, 1)``, with ``q`` the
      ``percentile``-th percentile of the map (:func:`normalize_maps`; the maximum where
      that is zero); default colour map :data:`SALIENCY_CMAP`.
    - a signed map (``signed=True``, e.g. a term of eq. 1): ``u = clip(m / q(|m|), -1, 1)``
      and ``v = (u + 1) / 2``, so that zero falls in the middle of the diverging default
      colour map :data:`SIGNED_CMAP` (white for ``RdBu_r``) and the sign is kept.

    A map of another size than the image (e.g. a block's bias-Jacobian at its own
    resolution) is resized to the image with bilinear interpolation first.

    Args:
        image: ``(3, H, W)`` / ``(1, H, W)`` tensor or ``(H, W, 3)`` / ``(H, W)`` array, floats
            in [0, 1] or uint8; a grey image is drawn as grey RGB.
        saliency: one map ``(h, w)``, ``(1, h, w)`` or ``(1, 1, h, w)``.
        alpha: weight of the coloured map, in [0, 1] (0: the image alone).
        cmap: Matplotlib colour map name (default by ``signed``, see above).
        percentile: normalisation percentile, in (0, 100].
        signed: treat the map as signed; ``None``: signed exactly when it has a negative value.

    Returns:
        ``(H, W, 3)`` float32 array in [0, 1] (``imshow`` it, or multiply by 255 for a PNG).
    """
    from matplotlib import colormaps

    alpha = _check_alpha(alpha)
    percentile = _check_percentile(percentile)
    if isinstance(image, Tensor):
        picture = image.detach().cpu()
        if picture.dim() == 3 and picture.shape[0] in (1, 3):
            picture = picture.permute(1, 2, 0)
        array = picture.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(
            "image must be (3, H, W), (1, H, W), (H, W, 3) or (H, W), "
            f"got shape {tuple(np.shape(image))}"
        )
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array
    array = np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    values = _map_2d(saliency)
    height, width = array.shape[:2]
    if tuple(values.shape) != (height, width):
        values = torch.nn.functional.interpolate(
            values[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
    if signed is None:
        signed = bool((values < 0).any())
    if signed:
        index = (normalize_signed_map(values, percentile) + 1.0) / 2.0
        colour_map = colormaps[cmap or SIGNED_CMAP]
    else:
        if bool((values < 0).any()):
            raise ValueError("the map has negative values: pass signed=True (or None) to show them")
        index = normalize_maps(values, percentile).double()
        colour_map = colormaps[cmap or SALIENCY_CMAP]
    colours = colour_map(index.numpy())[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * array + alpha * colours, 0.0, 1.0).astype(np.float32)


def _class_name(categories: Optional[Sequence[str]], index: int) -> str:
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


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def _clean_axes(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _labelled(name: str, prefix: str, probability: str, width: int) -> List[str]:
    """``prefix + name  p=probability`` on one line of ``width`` characters, or on two."""
    name = _short(name, width - len(prefix))
    line = f"{prefix}{name}  p={probability}"
    return [line] if len(line) <= width else [f"{prefix}{name}", f"p={probability}"]


def _mark_all_zero(ax: Any, fontsize: float) -> None:
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


def _font_scale(width_in: float) -> float:
    """Factor on every font size so that text stays >= :data:`MIN_FONT_PT` once the figure is
    scaled to :data:`PRINT_WIDTH_IN` (a full page width): 1 for figures at most that wide."""
    return max(1.0, width_in / PRINT_WIDTH_IN)


def _chars_for(width_in: float, fontsize: float) -> int:
    """How many characters of ``fontsize`` points fit in ``width_in`` inches (DejaVu Sans'
    average advance is about 0.6 em)."""
    return max(6, int(width_in * 72.0 / (0.6 * fontsize)))


# --------------------------------------------------------------------------------------
# Table 5: the comparison grid
# --------------------------------------------------------------------------------------

# Inches of the row-label column and of the margins around the panels of the grid.
_ROW_LABEL_IN = 1.35
_GRID_MARGIN_IN = 0.2


def comparison_grid(
    model: Any,
    images: Tensor,
    targets: Any = None,
    methods: Union[MethodSpec, Sequence[MethodSpec]] = DEFAULT_TABLE5_METHODS,
    categories: Optional[Sequence[str]] = None,
    display_images: Any = None,
    *,
    precomputed: Optional[AttributionMaps] = None,
    row_labels: Optional[Sequence[str]] = None,
    percentile: float = 99.0,
    cmap: str = SALIENCY_CMAP,
    batch_size: Optional[int] = None,
    progress: bool = False,
    title: Optional[str] = None,
    cell_size: Optional[float] = None,
    overlay_maps: bool = False,
    alpha: float = 0.5,
    note: Optional[str] = None,
) -> Figure:
    """The seed paper's Table 5: images in rows, saliency methods in columns.

    Column 1 is the image, labelled on its left with the predicted class and its softmax
    probability to three significant figures (and the explained class, when a target other
    than the prediction is given); the other columns are the maps of ``methods``, titled
    with their labels. A map that is zero everywhere (e.g. a zero-initialised head) is
    marked "all zero" rather than left as a plain dark square.

    Normalisation: every map is divided by its own ``percentile``-th percentile and
    clipped to ``[0, 1]`` (:func:`normalize_maps`), then drawn with the same colour map
    ``cmap``; one horizontal colour bar under the maps says so. With ``overlay_maps`` the
    maps are blended over their image instead (:func:`overlay`, weight ``alpha``).

    Print size: by default the figure is at most :data:`PRINT_WIDTH_IN` (7 in, a page
    width) wide and no text is smaller than :data:`MIN_FONT_PT` (7 pt); with a larger
    ``cell_size`` the figure grows and every font grows with it, so that labels are still
    7 pt once the figure is scaled down to a page width.

    Args:
        model: classifier in eval mode returning logits ``(N, K)``.
        images: ``(N, C, H, W)`` model inputs (already preprocessed).
        targets: classes to explain: ``None`` (predicted), one int, or one per image.
        methods: method names or :class:`~captum_fullgrad.methods.AttributionMethod`
            objects, one column each (default: Table 5's six).
        categories: class names indexed by logit, for the row labels.
        display_images: what to show in column 1: ``(N, 3, H, W)`` or ``(N, H, W, 3)``
            floats in [0, 1] or uint8, e.g. the un-normalised pictures. ``None``: the inputs,
            rescaled per image to [0, 1] if outside it.
        precomputed: reuse an :class:`AttributionMaps` of the same images (``methods``,
            ``targets`` and ``batch_size`` are then ignored).
        row_labels: one extra label per row (e.g. file names), shown above the prediction.
        percentile: clipping percentile of the normalisation, in (0, 100].
        cmap: Matplotlib colour map of every saliency map.
        batch_size: images per method call.
        progress: tqdm progress bar on stderr.
        title: optional figure title.
        cell_size: inches per panel (default: the largest up to 1.8 in that keeps the figure
            within 7 in).
        overlay_maps: blend each map over its image instead of drawing the bare map.
        alpha: weight of the map in an overlay, in [0, 1].
        note: an optional line under the colour bar (e.g. the methods' parameters).

    Returns:
        A :class:`matplotlib.figure.Figure` (save it with :func:`save_figure`).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    images = _check_images(images)
    percentile = _check_percentile(percentile)
    alpha = _check_alpha(alpha)
    colour_map = colormaps[cmap]  # KeyError naming the valid maps for an unknown name
    result = precomputed
    if result is None:
        result = attribution_maps(
            model, images, targets, methods, batch_size=batch_size, progress=progress
        )
    names = list(result.maps)
    n = images.shape[0]
    for name in names:
        if result.maps[name].shape[0] != n:
            raise ValueError(
                f"precomputed maps of {name!r} are for {result.maps[name].shape[0]} images, not {n}"
            )
    pictures = _to_display(display_images, n, images)
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"got {len(row_labels)} row labels for {n} images")
    height, width = images.shape[-2:]
    extent = (0, width, height, 0)

    columns = 1 + len(names)
    if cell_size is None:
        cell_size = min(1.8, (PRINT_WIDTH_IN - _ROW_LABEL_IN - _GRID_MARGIN_IN) / columns)
    if isinstance(cell_size, bool) or not isinstance(cell_size, (int, float)) or cell_size <= 0:
        raise ValueError(f"cell_size must be a positive number of inches, got {cell_size!r}")
    figure_width = _ROW_LABEL_IN + _GRID_MARGIN_IN + cell_size * columns
    scale = _font_scale(figure_width)
    small, medium = MIN_FONT_PT * scale, (MIN_FONT_PT + 0.5) * scale
    header = 0.45 * scale + (0.3 * scale if title else 0.0)
    footer = 0.55 * scale + (0.2 * scale if note else 0.0)
    figure = Figure(
        figsize=(figure_width, cell_size * n * (height / width) + header + footer),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    bar_height = 0.12 * scale
    grid = figure.add_gridspec(
        n + 1, columns, height_ratios=[cell_size * height / width] * n + [bar_height]
    )
    label_chars = _chars_for(_ROW_LABEL_IN - 0.1, small)
    title_chars = _chars_for(cell_size, medium)
    for row in range(n):
        ax = figure.add_subplot(grid[row, 0])
        ax.imshow(
            pictures[row],
            extent=extent,
            cmap="gray" if pictures[row].ndim == 2 else None,
            interpolation="antialiased",
        )
        _clean_axes(ax)
        predicted = int(result.predictions[row])
        target = int(result.targets[row])
        lines = [] if row_labels is None else [_short(str(row_labels[row]), label_chars)]
        p_text = format_probability(float(result.probabilities[row, predicted]))
        lines += _labelled(_class_name(categories, predicted), "", p_text, label_chars)
        if target != predicted:
            p_target = format_probability(float(result.probabilities[row, target]))
            lines += _labelled(_class_name(categories, target), "explains ", p_target, label_chars)
        ax.set_ylabel("\n".join(lines), fontsize=small, rotation=0, ha="right", va="center")
        if row == 0:
            ax.set_title("Image", fontsize=medium)
        for column, name in enumerate(names, start=1):
            ax = figure.add_subplot(grid[row, column])
            values = result.maps[name][row]
            if overlay_maps:
                shown = overlay(
                    pictures[row],
                    values,
                    alpha=alpha,
                    cmap=cmap,
                    percentile=percentile,
                    signed=False,
                )
                ax.imshow(shown, extent=extent, interpolation="nearest")
            else:
                shown = normalize_maps(values, percentile)[0].numpy()
                ax.imshow(
                    shown, extent=extent, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest"
                )
            _clean_axes(ax)
            if not bool((values > 0).any()):
                _mark_all_zero(ax, small)
            if row == 0:
                label = result.labels.get(name, name)
                ax.set_title(
                    "\n".join(
                        textwrap.wrap(
                            label, title_chars, break_on_hyphens=False, break_long_words=False
                        )
                    )
                    or name,
                    fontsize=medium,
                )
    colorbar_ax = figure.add_subplot(grid[n, 1:])
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colour_map)
    bar = figure.colorbar(mappable, cax=colorbar_ax, orientation="horizontal")
    what = f"saliency / its {percentile:g}th percentile, clipped to [0, 1]"
    if overlay_maps:
        what += f"; blended over the image with alpha = {alpha:g}"
    bar_chars = _chars_for(cell_size * (columns - 1), small)
    bar.set_label("\n".join(textwrap.wrap(what, bar_chars)), fontsize=small)
    bar.set_ticks([0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=small)
    if note:
        figure.supxlabel(
            "\n".join(textwrap.wrap(note, _chars_for(figure_width - 0.2, small))), fontsize=small
        )
    if title:
        figure.suptitle(
            "\n".join(textwrap.wrap(title, _chars_for(figure_width - 0.2, medium + 1))),
            fontsize=medium + scale,
        )
    return figure


# --------------------------------------------------------------------------------------
# Figure 1: the decomposition
# --------------------------------------------------------------------------------------


@dataclass
class DecompositionSummary:
    """Eq. 1 for one image, reduced to what :func:`decomposition_figure` draws.

    Attributes:
        output: ``f(x)``, the explained logit.
        target: the explained class.
        probability: its softmax probability (``nan`` for a single-output model).
        input_term: ``<grad_x f, x>``.
        input_map: ``(H, W)`` channel-summed ``grad_x f * x`` (signed).
        block_terms: spatial block name -> its share of ``f(x)`` (sum of its bias-Jacobians).
        block_maps: spatial block name -> ``(h, w)`` channel-summed bias-Jacobian (signed).
        non_spatial: share of ``f(x)`` from non-spatial bias sources (e.g. Linear biases).
        non_spatial_sources: their names.
        completeness_gap: eq. 1's gap in Captum's sign (that of
            :attr:`FullGradient.attribute`'s convergence delta):
            ``(input_term + sum(block_terms) + non_spatial) - f(x)``.
    """

    output: float
    target: Optional[int]
    probability: float
    input_term: float
    input_map: Tensor
    block_terms: "OrderedDict[str, float]"
    block_maps: "OrderedDict[str, Tensor]"
    non_spatial: float
    non_spatial_sources: List[str]
    completeness_gap: float

    @property
    def total(self) -> float:
        """``input_term + sum(block_terms) + non_spatial``: eq. 1's right-hand side."""
        return self.input_term + sum(self.block_terms.values()) + self.non_spatial


def _single_image(image: Tensor) -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(
            f"image must be a tensor (C, H, W) or (1, C, H, W), got {type(image).__name__}"
        )
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(
            f"image must have shape (C, H, W) or (1, C, H, W), got {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise TypeError(
            f"image must be floating point (the model's input), got dtype {image.dtype}"
        )
    return image


def decomposition_summary(
    model: Any, image: Tensor, target: Optional[int] = None
) -> DecompositionSummary:
    """Decompose ``model``'s output on one image with :func:`~captum_fullgrad.full_jacobian`.

    Args:
        model: network in eval mode returning ``(1, K)`` logits (or ``(1,)``).
        image: ``(C, H, W)`` or ``(1, C, H, W)`` model input.
        target: class to decompose; ``None``: the predicted class.
    """
    image = _single_image(image)
    with torch.no_grad():
        output = model(image)
    probability = float("nan")
    if isinstance(output, Tensor) and output.dim() == 2 and output.shape[1] > 1:
        probabilities = output.detach().float().softmax(dim=1)[0]
        if target is None:
            target = int(probabilities.argmax())
        if not 0 <= int(target) < output.shape[1]:
            raise ValueError(
                f"target must be a class index in [0, {output.shape[1] - 1}], got {target}"
            )
        target = int(target)
        probability = float(probabilities[target])
    fj = full_jacobian(model, image, target=target)
    block_maps: "OrderedDict[str, Tensor]" = OrderedDict(
        (name, m[0].detach().double().cpu()) for name, m in fj.spatial_maps().items()
    )
    block_terms = OrderedDict((name, float(m.sum())) for name, m in block_maps.items())
    non_spatial_sources = [name for name, source in fj.sources.items() if not source.spatial]
    input_term = float(fj.input_term[0])
    non_spatial = float(fj.non_spatial_term()[0])
    out = float(fj.output[0])
    return DecompositionSummary(
        output=out,
        target=target,
        probability=probability,
        input_term=input_term,
        input_map=(fj.input_jacobian * fj.inputs)[0].sum(0).detach().double().cpu(),
        block_terms=block_terms,
        block_maps=block_maps,
        non_spatial=non_spatial,
        non_spatial_sources=non_spatial_sources,
        # Captum's sign, as FullGradient's delta: what the terms claim minus f(x).
        completeness_gap=(input_term + sum(block_terms.values()) + non_spatial) - out,
    )


def _signed_panel(
    ax: Any,
    values: Tensor,
    extent: Tuple[float, ...],
    cmap: str,
    *,
    picture: Optional[np.ndarray],
    alpha: float,
    percentile: float,
    fontsize: float,
) -> None:
    """A signed map with its symmetric colour bar, centred at 0; "all zero" when it is."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import FormatStrFormatter

    limit = _signed_scale(values, percentile)
    zero = limit == 0.0
    limit = limit or 1.0
    if picture is None:
        ax.imshow(
            values.float().numpy(),
            extent=extent,
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            interpolation="nearest",
        )
    else:
        blended = overlay(
            picture, values, alpha=alpha, cmap=cmap, percentile=percentile, signed=True
        )
        ax.imshow(blended, extent=extent, interpolation="nearest")
    _clean_axes(ax)
    if zero:
        _mark_all_zero(ax, fontsize)
    mappable = ScalarMappable(norm=Normalize(-limit, limit), cmap=cmap)
    bar = ax.figure.colorbar(mappable, ax=ax, fraction=0.07, pad=0.03, aspect=15)
    bar.set_ticks([-limit, 0.0, limit])
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    bar.ax.tick_params(labelsize=fontsize, length=2, pad=1)


def decomposition_figure(
    model: Any,
    image: Tensor,
    target: Optional[int] = None,
    *,
    categories: Optional[Sequence[str]] = None,
    display_image: Any = None,
    summary: Optional[DecompositionSummary] = None,
    max_columns: int = 5,
    cmap: str = SIGNED_CMAP,
    cell_size: Optional[float] = None,
    title: Optional[str] = None,
    overlay_maps: bool = False,
    alpha: float = 0.5,
    percentile: float = 100.0,
) -> Figure:
    """The seed paper's Figure 1: eq. 1's terms for one image, as maps that add up to ``f(x)``.

    Panels: the image; the input-gradient term ``grad_x f * x`` summed over channels; one
    panel per spatial block (a convolution with the BatchNorm that reads it) with its
    bias-Jacobian summed over channels, at the block's own resolution, stretched over the
    image. Every panel is signed and uses the diverging colour map ``cmap`` centred at 0,
    with its own symmetric range ``[-s, s]``, ``s`` the ``percentile``-th percentile of
    ``|m|`` (100: ``max |m|``; blocks differ in magnitude), shown by the panel's own colour
    bar; an all-zero panel is marked. Each title gives the panel's spatial sum, i.e. its
    share of ``f(x)``. A last row draws the running sum of these shares, plus the
    non-spatial biases' share (e.g. Linear layers), ending at ``f(x)``; a footer prints
    ``input term + sum of blocks + non-spatial = f(x)`` with the completeness gap.

    Print size: by default 7 in wide (a page width) with no text under 7 pt; a larger
    ``cell_size`` scales every font with the width.

    Args:
        model: network in eval mode returning logits.
        image: ``(C, H, W)`` or ``(1, C, H, W)`` model input.
        target: class to decompose; ``None``: the predicted class.
        categories: class names indexed by logit.
        display_image: what to show as the image (``(3, H, W)`` or ``(H, W, 3)`` in [0, 1]);
            ``None``: the input, rescaled to [0, 1] if outside it.
        summary: reuse a :func:`decomposition_summary` of the same image.
        max_columns: panels per row at most.
        cmap: diverging colour map of the signed panels.
        cell_size: inches per panel (default: 7 in divided by the number of columns, at most 2).
        title: figure title (default: names the class, its probability and ``f(x)``).
        overlay_maps: blend every signed map over the image (:func:`overlay`) instead of
            drawing it bare.
        alpha: weight of the map in an overlay, in [0, 1].
        percentile: colour-scale percentile of ``|m|`` per panel, in (0, 100].

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    image = _single_image(image)
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
        raise ValueError(f"max_columns must be an integer >= 2, got {max_columns!r}")
    alpha = _check_alpha(alpha)
    percentile = _check_percentile(percentile)
    from matplotlib import colormaps

    colormaps[cmap]  # KeyError naming the valid maps for an unknown name
    if summary is None:
        summary = decomposition_summary(model, image, target)
    picture = _to_display(
        None
        if display_image is None
        else (display_image[None] if getattr(display_image, "ndim", 0) == 3 else display_image),
        1,
        image,
    )[0]
    height, width = image.shape[-2:]
    extent = (0, width, height, 0)

    # Panels: the image, the input term and one per block; the running sum of the shares
    # of f(x) has a row of its own, as tall as its labels need.
    panels = 2 + len(summary.block_maps)
    rows = math.ceil(panels / max_columns)
    columns = math.ceil(panels / rows)  # balanced rows: 6 panels make 2 x 3, not 5 + 1
    if cell_size is None:
        cell_size = min(2.0, PRINT_WIDTH_IN / columns)
    if isinstance(cell_size, bool) or not isinstance(cell_size, (int, float)) or cell_size <= 0:
        raise ValueError(f"cell_size must be a positive number of inches, got {cell_size!r}")
    figure_width = cell_size * columns
    scale = _font_scale(figure_width)
    small, medium = MIN_FONT_PT * scale, (MIN_FONT_PT + 0.5) * scale
    chart_rows = panels + 2  # input term, blocks, non-spatial, f(x)
    chart_height = (0.135 * chart_rows + 0.55) * scale
    panel_height = cell_size * (height / width) * 0.8 + 0.45 * scale
    figure = Figure(
        figsize=(figure_width, panel_height * rows + chart_height + 1.0 * scale),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        rows + 1, columns, height_ratios=[panel_height] * rows + [chart_height]
    )
    title_chars = _chars_for(cell_size * 0.85, medium)
    shown = picture if overlay_maps else None

    def panel(index: int) -> Any:
        return figure.add_subplot(grid[index // columns, index % columns])

    ax = panel(0)
    ax.imshow(picture, extent=extent, cmap="gray" if picture.ndim == 2 else None)
    _clean_axes(ax)
    name = _class_name(categories, summary.target) if summary.target is not None else "output"
    ax.set_title(f"input x\n{_short(name, title_chars)}\n", fontsize=medium)

    ax = panel(1)
    _signed_panel(
        ax,
        summary.input_map,
        extent,
        cmap,
        picture=shown,
        alpha=alpha,
        percentile=percentile,
        fontsize=small,
    )
    ax.set_title(f"input term ∇f·x\n\nΣ = {summary.input_term:.5g}", fontsize=medium)

    for index, (block, values) in enumerate(summary.block_maps.items(), start=2):
        ax = panel(index)
        _signed_panel(
            ax,
            values,
            extent,
            cmap,
            picture=shown,
            alpha=alpha,
            percentile=percentile,
            fontsize=small,
        )
        size = "×".join(str(s) for s in values.shape)
        ax.set_title(
            f"{_short(block, title_chars)}\n{size}\nΣ = {summary.block_terms[block]:.5g}",
            fontsize=medium,
        )
    for index in range(panels, rows * columns):
        panel(index).axis("off")

    _waterfall(figure.add_subplot(grid[rows, :]), summary, small, medium)

    blocks_sum = sum(summary.block_terms.values())
    sources = ", ".join(summary.non_spatial_sources[:3]) + (
        " …" if len(summary.non_spatial_sources) > 3 else ""
    )
    probability = (
        ""
        if math.isnan(summary.probability)
        else f", p = {format_probability(summary.probability)}"
    )
    relative = abs(summary.completeness_gap) / max(abs(summary.output), 1e-12)
    terms = f"{summary.input_term:.5g} + {blocks_sum:.5g} + {summary.non_spatial:.5g}"
    scale_note = "max |m|" if percentile >= 100 else f"the {percentile:g}th percentile of |m|"
    footer = (
        f"input term + Σ spatial blocks + non-spatial = f(x):   {terms} = {summary.total:.5g}\n"
        f"f(x) = {summary.output:.5g};  completeness gap sum − f(x) = "
        f"{summary.completeness_gap:.2e} ({relative:.1e} relative)\n"
        + "\n".join(
            textwrap.wrap(
                f"non-spatial sources: {sources or 'none'}.   Red > 0 > blue; each map has its "
                f"own symmetric colour scale ±{scale_note}"
                + (f", blended over the image with alpha = {alpha:g}." if overlay_maps else "."),
                _chars_for(figure_width - 0.2, small),
            )
        )
    )
    figure.supxlabel(footer, fontsize=small)
    if title is None:
        title = f"Full-Jacobian decomposition of f(x) = logit of '{_short(name, 30)}'{probability}"
    figure.suptitle(
        "\n".join(textwrap.wrap(title, _chars_for(figure_width - 0.2, medium + scale))),
        fontsize=medium + scale,
    )
    return figure


def _waterfall(ax: Any, summary: DecompositionSummary, small: float, medium: float) -> None:
    """Horizontal waterfall: each term of eq. 1 as a bar from the running total, then f(x)."""
    names = ["input term"] + list(summary.block_terms) + ["non-spatial"]
    values = [summary.input_term] + list(summary.block_terms.values()) + [summary.non_spatial]
    running = 0.0
    for row, value in enumerate(values):
        ax.barh(row, value, left=running, color="#c0392b" if value >= 0 else "#2e6da4", height=0.7)
        running += value
    ax.barh(len(values), summary.output, color="0.35", height=0.7)
    ax.axvline(0.0, color="0.6", linewidth=0.6)
    ax.axvline(summary.output, color="0.35", linewidth=0.6, linestyle=":")
    labels = [_short(n, 24) for n in names] + ["f(x)"]
    ax.set_yticks(range(len(labels)), labels, fontsize=small)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=small)
    ax.use_sticky_edges = False  # bars stick to their ends; let the margin show them whole
    ax.margins(x=0.04, y=0.02)
    ax.set_title("running sum of the terms = f(x)", fontsize=medium)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


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
