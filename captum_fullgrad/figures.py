"""Figures: the seed paper's Table 5 (method comparison) and Figure 1 (full-Jacobian decomposition).

Everything here builds :class:`matplotlib.figure.Figure` objects directly (no
``matplotlib.pyplot``, so no global figure state is created or leaked) and renders with the
Agg / PDF backends through :func:`save_figure`.

- :func:`comparison_grid`: one row per image; columns are the image and one saliency map
  per method (default: guided backprop, integrated gradients, SmoothGrad, Grad-CAM,
  FullGrad and the bias-Jacobian-only map, as in Table 5). Each row is labelled with the
  predicted class and its softmax probability.
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
from torch import Tensor, nn

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
    "normalize_maps",
    "save_figure",
]

MethodSpec = Union[str, AttributionMethod]

#: Colour map of every saliency map in :func:`comparison_grid` (perceptually uniform).
SALIENCY_CMAP = "inferno"
#: Diverging colour map of the signed maps in :func:`decomposition_figure`.
SIGNED_CMAP = "RdBu_r"
_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


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


def _model_device(model: Any, inputs: Tensor) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
    return inputs.device


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
        progress: show a tqdm progress bar on stderr.

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
        desc="saliency maps",
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
                _synchronize(device)
                start = time.perf_counter()
                result = method(model, inputs[part], target_tensor[part].to(device))
                _synchronize(device)
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
# Display helpers
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


def _class_name(categories: Optional[Sequence[str]], index: int) -> str:
    if categories is not None and 0 <= index < len(categories):
        return str(categories[index])
    return f"class {index}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _clean_axes(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# --------------------------------------------------------------------------------------
# Table 5: the comparison grid
# --------------------------------------------------------------------------------------


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
    cell_size: float = 1.8,
) -> Figure:
    """The seed paper's Table 5: images in rows, saliency methods in columns.

    Column 1 is the image, labelled with the predicted class and its softmax probability
    (and the explained class, when a target other than the prediction is given); the
    other columns are the maps of ``methods``, titled with their labels.

    Normalisation: every map is divided by its own 99th percentile and clipped to
    ``[0, 1]`` (:func:`normalize_maps`), then drawn with the same colour map ``cmap`` and
    the same ``[0, 1]`` colour range; a shared colour bar shows the scale. Maps are thus
    comparable in shape, not in absolute value.

    Args:
        model: classifier in eval mode returning logits ``(N, K)``.
        images: ``(N, C, H, W)`` model inputs (preprocessed), on the model's device.
        targets: classes to explain: ``None`` (each image's predicted class), one int, or
            one per image.
        methods: method names or :class:`~captum_fullgrad.methods.AttributionMethod`
            objects; default :data:`DEFAULT_TABLE5_METHODS`.
        categories: class names indexed by logit (e.g. ``LoadedModel.categories``).
        display_images: what to show in the image column: ``(N, 3, H, W)`` /
            ``(N, H, W, 3)`` tensor or array in ``[0, 1]`` (or uint8), e.g. the images
            before normalisation. ``None``: ``images`` themselves, rescaled per image to
            ``[0, 1]`` if they are outside it. Shown with the maps' extent, so both align
            even at different resolutions.
        precomputed: reuse maps from :func:`attribution_maps` instead of computing them.
        row_labels: an extra first line for each row's label (e.g. the file name).
        percentile: clipping percentile of the normalisation.
        cmap: Matplotlib colour map of every saliency map.
        batch_size: images per method call.
        progress: tqdm progress bar on stderr.
        title: optional figure title.
        cell_size: inches per panel.

    Returns:
        A :class:`matplotlib.figure.Figure` (save it with :func:`save_figure`).
    """
    images = _check_images(images)
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
    figure = Figure(
        figsize=(cell_size * columns + 0.8, cell_size * n + (0.55 if title else 0.3)),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(n, columns + 1, width_ratios=[1.0] * columns + [0.06])
    image_artist = None
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
        lines = [] if row_labels is None else [_short(str(row_labels[row]), 26)]
        p_predicted = float(result.probabilities[row, predicted])
        lines += [f"{_short(_class_name(categories, predicted), 22)}  p={p_predicted:.2f}"]
        if target != predicted:
            p_target = float(result.probabilities[row, target])
            lines.append(
                f"explains {_short(_class_name(categories, target), 14)}  p={p_target:.2f}"
            )
        ax.set_ylabel("\n".join(lines), fontsize=8)
        if row == 0:
            ax.set_title("Image\n(prediction, p)", fontsize=9)
        for column, name in enumerate(names, start=1):
            ax = figure.add_subplot(grid[row, column])
            shown = normalize_maps(result.maps[name][row], percentile)[0].numpy()
            image_artist = ax.imshow(
                shown, extent=extent, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            _clean_axes(ax)
            if row == 0:
                ax.set_title(
                    "\n".join(textwrap.wrap(result.labels.get(name, name), 14)), fontsize=9
                )
    colorbar_ax = figure.add_subplot(grid[:, columns])
    bar = figure.colorbar(image_artist, cax=colorbar_ax)
    bar.set_label(f"saliency / its {percentile:g}th percentile (clipped)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
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
        completeness_gap: ``f(x) - (input_term + sum(block_terms) + non_spatial)``.
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
        completeness_gap=out - (input_term + sum(block_terms.values()) + non_spatial),
    )


def _signed_panel(ax: Any, values: Tensor, extent: Tuple[float, ...], cmap: str) -> Any:
    array = values.float().numpy()
    limit = float(np.abs(array).max()) or 1.0
    return ax.imshow(
        array, extent=extent, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest"
    )


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
    cell_size: float = 2.0,
    title: Optional[str] = None,
) -> Figure:
    """The seed paper's Figure 1: eq. 1's terms for one image, as maps that add up to ``f(x)``.

    Panels: the image; the input-gradient term ``grad_x f * x`` summed over channels; one
    panel per spatial block (a convolution with the BatchNorm that reads it) with its
    bias-Jacobian summed over channels, at the block's own resolution, stretched over the
    image. Every panel is signed and uses the diverging colour map ``cmap`` centred at 0,
    with its own symmetric range ``[-max|m|, max|m|]`` (blocks differ in magnitude); its
    title gives its spatial sum, i.e. its share of ``f(x)``. A last panel draws the running
    sum of these shares, plus the non-spatial biases' share (e.g. Linear layers), ending at
    ``f(x)``; a footer prints ``input term + sum of blocks + non-spatial = f(x)`` with the
    completeness gap.

    Args:
        model: network in eval mode returning logits.
        image: ``(C, H, W)`` or ``(1, C, H, W)`` model input.
        target: class to decompose; ``None``: the predicted class.
        categories: class names indexed by logit.
        display_image: what to show as the image (``(3, H, W)`` or ``(H, W, 3)`` in [0, 1]);
            ``None``: the input, rescaled to [0, 1] if outside it.
        summary: reuse a :func:`decomposition_summary` of the same image.
        max_columns: panels per row at most (VGG-16-BN's 13 blocks, the image, the input
            term and the running-sum chart make 4 rows of 5).
        cmap: diverging colour map of the signed panels.
        cell_size: inches per panel.
        title: figure title (default: names the class, its probability and ``f(x)``).

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    image = _single_image(image)
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
        raise ValueError(f"max_columns must be an integer >= 2, got {max_columns!r}")
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

    # Panels: the image, the input term, one per block, then the waterfall of the shares of
    # f(x), which takes the free cells of the last row (at least two).
    panels = 2 + len(summary.block_maps)
    rows = math.ceil((panels + 2) / max_columns)
    columns = math.ceil((panels + 2) / rows)
    figure = Figure(
        figsize=(cell_size * columns, cell_size * rows * 1.12 + 1.0), layout="constrained"
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns)

    def panel(index: int) -> Any:
        ax = figure.add_subplot(grid[index // columns, index % columns])
        _clean_axes(ax)
        return ax

    ax = panel(0)
    ax.imshow(picture, extent=extent, cmap="gray" if picture.ndim == 2 else None)
    name = _class_name(categories, summary.target) if summary.target is not None else "output"
    ax.set_title(f"input x\n{_short(name, 20)}", fontsize=9)

    ax = panel(1)
    _signed_panel(ax, summary.input_map, extent, cmap)
    ax.set_title(f"input term ∇f·x\nΣ = {summary.input_term:.5g}", fontsize=9)

    for index, (block, values) in enumerate(summary.block_maps.items(), start=2):
        ax = panel(index)
        _signed_panel(ax, values, extent, cmap)
        size = "×".join(str(s) for s in values.shape)
        ax.set_title(
            f"{_short(block, 18)} ({size})\nΣ = {summary.block_terms[block]:.5g}", fontsize=9
        )

    first_free = max(0, panels - (rows - 1) * columns)
    host = figure.add_subplot(grid[rows - 1, first_free:])
    host.axis("off")
    # The chart is an inset of an empty host cell, so that its tick labels (block names)
    # stay inside the cell instead of widening a whole column of the layout.
    label_inches = 1.05
    span_inches = cell_size * (columns - first_free)
    left = min(0.45, label_inches / span_inches)
    _waterfall(host.inset_axes([left, 0.08, 0.97 - left, 0.78]), summary)

    blocks_sum = sum(summary.block_terms.values())
    sources = ", ".join(summary.non_spatial_sources[:3]) + (
        " …" if len(summary.non_spatial_sources) > 3 else ""
    )
    probability = "" if math.isnan(summary.probability) else f", p = {summary.probability:.3f}"
    relative = abs(summary.completeness_gap) / max(abs(summary.output), 1e-12)
    terms = f"{summary.input_term:.5g} + {blocks_sum:.5g} + {summary.non_spatial:.5g}"
    footer = (
        f"input term + Σ spatial blocks + non-spatial = f(x):   {terms} = {summary.total:.5g}\n"
        f"f(x) = {summary.output:.5g};  completeness gap f(x) − sum = "
        f"{summary.completeness_gap:.2e} ({relative:.1e} relative)\n"
        f"non-spatial sources: {sources or 'none'}.   "
        "Red > 0 > blue; each map has its own symmetric colour scale."
    )
    figure.supxlabel(footer, fontsize=8.5)
    if title is None:
        title = f"Full-Jacobian decomposition of f(x) = logit of '{_short(name, 30)}'{probability}"
    figure.suptitle(title, fontsize=11)
    return figure


def _waterfall(ax: Any, summary: DecompositionSummary) -> None:
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
    labels = [_short(n, 16) for n in names] + ["f(x)"]
    ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) <= 10 else 6)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.use_sticky_edges = False  # bars stick to their ends; let the margin show them whole
    ax.margins(x=0.04, y=0.04)
    ax.set_title("running sum of the terms = f(x)", fontsize=9)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def save_figure(figure: Figure, path: Union[str, "os.PathLike[str]"], *, dpi: int = 150) -> Path:
    """Write ``figure`` to ``path`` as PNG, PDF or SVG (by extension), atomically.

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
