"""The seed paper's Figure 1: eq. 1's terms for one image as signed maps that add up to
``f(x)`` (:func:`decomposition_summary`, :func:`decomposition_figure`)."""

from __future__ import annotations

import math
import textwrap
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..decomposition import full_jacobian
from ._common import (
    MIN_FONT_PT,
    PRINT_WIDTH_IN,
    SIGNED_CMAP,
    chars_for,
    check_alpha,
    check_percentile,
    class_name,
    clean_axes,
    font_scale,
    format_probability,
    short,
    to_display,
)
from .overlay import show_map


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

    limit = show_map(
        ax,
        values,
        extent,
        cmap,
        picture=picture,
        alpha=alpha,
        percentile=percentile,
        signed=True,
        fontsize=fontsize,
    )
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
    alpha = check_alpha(alpha)
    percentile = check_percentile(percentile)
    from matplotlib import colormaps

    colormaps[cmap]  # KeyError naming the valid maps for an unknown name
    if summary is None:
        summary = decomposition_summary(model, image, target)
    picture = to_display(
        None
        if display_image is None
        else (display_image[None] if getattr(display_image, "ndim", 0) == 3 else display_image),
        1,
        image,
    )[0]
    height, width = image.shape[-2:]
    extent = (0, width, height, 0)
    # Panels: the image, the input term and one per block.
    layout = _PanelLayout.make(2 + len(summary.block_maps), max_columns, height / width, cell_size)
    figure, grid = layout.figure()

    def panel(index: int) -> Any:
        return figure.add_subplot(grid[index // layout.columns, index % layout.columns])

    ax = panel(0)
    ax.imshow(picture, extent=extent, cmap="gray" if picture.ndim == 2 else None)
    clean_axes(ax)
    name = class_name(categories, summary.target) if summary.target is not None else "output"
    ax.set_title(f"input x\n{short(name, layout.title_chars)}\n", fontsize=layout.medium)
    for index, (values, panel_title) in enumerate(_signed_maps(summary, layout), start=1):
        ax = panel(index)
        _signed_panel(
            ax,
            values,
            extent,
            cmap,
            picture=picture if overlay_maps else None,
            alpha=alpha,
            percentile=percentile,
            fontsize=layout.small,
        )
        ax.set_title(panel_title, fontsize=layout.medium)
    for index in range(layout.panels, layout.rows * layout.columns):
        panel(index).axis("off")
    _waterfall(figure.add_subplot(grid[layout.rows, :]), summary, layout.small, layout.medium)

    footer_chars = chars_for(layout.width - 0.2, layout.small)
    figure.supxlabel(
        _footer(summary, percentile, alpha if overlay_maps else None, footer_chars),
        fontsize=layout.small,
    )
    if title is None:
        probability = (
            ""
            if math.isnan(summary.probability)
            else f", p = {format_probability(summary.probability)}"
        )
        title = f"Full-Jacobian decomposition of f(x) = logit of '{short(name, 30)}'{probability}"
    title_chars = chars_for(layout.width - 0.2, layout.medium + layout.scale)
    figure.suptitle(
        "\n".join(textwrap.wrap(title, title_chars)), fontsize=layout.medium + layout.scale
    )
    return figure


@dataclass
class _PanelLayout:
    """Sizes of Figure 1: ``panels`` in balanced rows of at most ``max_columns``, and under
    them the running sum of the shares of f(x) in a row as tall as its labels need."""

    panels: int
    rows: int
    columns: int
    cell_size: float
    width: float
    scale: float
    small: float
    medium: float
    panel_height: float
    chart_height: float
    title_chars: int

    @classmethod
    def make(
        cls, panels: int, max_columns: int, aspect: float, cell_size: Optional[float]
    ) -> "_PanelLayout":
        rows = math.ceil(panels / max_columns)
        columns = math.ceil(panels / rows)  # balanced rows: 6 panels make 2 x 3, not 5 + 1
        if cell_size is None:
            cell_size = min(2.0, PRINT_WIDTH_IN / columns)
        if isinstance(cell_size, bool) or not isinstance(cell_size, (int, float)) or cell_size <= 0:
            raise ValueError(f"cell_size must be a positive number of inches, got {cell_size!r}")
        width = cell_size * columns
        scale = font_scale(width)
        small, medium = MIN_FONT_PT * scale, (MIN_FONT_PT + 0.5) * scale
        chart_rows = panels + 2  # input term, blocks, non-spatial, f(x)
        return cls(
            panels=panels,
            rows=rows,
            columns=columns,
            cell_size=cell_size,
            width=width,
            scale=scale,
            small=small,
            medium=medium,
            panel_height=cell_size * aspect * 0.8 + 0.45 * scale,
            chart_height=(0.135 * chart_rows + 0.55) * scale,
            title_chars=chars_for(cell_size * 0.85, medium),
        )

    def figure(self) -> Tuple[Figure, Any]:
        """The figure and its grid: the rows of panels, then the running sum's row."""
        figure = Figure(
            figsize=(
                self.width,
                self.panel_height * self.rows + self.chart_height + 1.0 * self.scale,
            ),
            layout="constrained",
        )
        FigureCanvasAgg(figure)
        grid = figure.add_gridspec(
            self.rows + 1,
            self.columns,
            height_ratios=[self.panel_height] * self.rows + [self.chart_height],
        )
        return figure, grid


def _signed_maps(summary: DecompositionSummary, layout: _PanelLayout) -> List[Tuple[Tensor, str]]:
    """The signed panels with their titles: the input term, then one per spatial block (its
    name, its own resolution and its share of f(x))."""
    shown = [(summary.input_map, f"input term ∇f·x\n\nΣ = {summary.input_term:.5g}")]
    for block, values in summary.block_maps.items():
        size = "×".join(str(s) for s in values.shape)
        shown.append(
            (
                values,
                f"{short(block, layout.title_chars)}\n{size}\nΣ = {summary.block_terms[block]:.5g}",
            )
        )
    return shown


def _footer(
    summary: DecompositionSummary, percentile: float, alpha: Optional[float], chars: int
) -> str:
    """Eq. 1 in numbers (the shares, their sum, f(x) and the gap in Captum's sign), then the
    non-spatial sources and how the maps are coloured (and blended, with ``alpha``)."""
    blocks_sum = sum(summary.block_terms.values())
    sources = ", ".join(summary.non_spatial_sources[:3]) + (
        " …" if len(summary.non_spatial_sources) > 3 else ""
    )
    relative = abs(summary.completeness_gap) / max(abs(summary.output), 1e-12)
    terms = f"{summary.input_term:.5g} + {blocks_sum:.5g} + {summary.non_spatial:.5g}"
    scale_note = "max |m|" if percentile >= 100 else f"the {percentile:g}th percentile of |m|"
    return (
        f"input term + Σ spatial blocks + non-spatial = f(x):   {terms} = {summary.total:.5g}\n"
        f"f(x) = {summary.output:.5g};  completeness gap sum − f(x) = "
        f"{summary.completeness_gap:.2e} ({relative:.1e} relative)\n"
        + "\n".join(
            textwrap.wrap(
                f"non-spatial sources: {sources or 'none'}.   Red > 0 > blue; each map has its "
                f"own symmetric colour scale ±{scale_note}"
                + (
                    f", blended over the image with alpha = {alpha:g}."
                    if alpha is not None
                    else "."
                ),
                chars,
            )
        )
    )


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
    labels = [short(n, 24) for n in names] + ["f(x)"]
    ax.set_yticks(range(len(labels)), labels, fontsize=small)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=small)
    ax.use_sticky_edges = False  # bars stick to their ends; let the margin show them whole
    ax.margins(x=0.04, y=0.02)
    ax.set_title("running sum of the terms = f(x)", fontsize=medium)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
