"""The seed paper's Table 5: images in rows, saliency methods in columns
(:func:`comparison_grid`)."""

from __future__ import annotations

import textwrap
from typing import Any, Optional, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..methods import DEFAULT_TABLE5_METHODS
from ._common import (
    MIN_FONT_PT,
    PRINT_WIDTH_IN,
    SALIENCY_CMAP,
    chars_for,
    check_alpha,
    check_images,
    check_percentile,
    class_name,
    clean_axes,
    font_scale,
    format_probability,
    labelled,
    mark_all_zero,
    short,
    to_display,
)
from .maps import AttributionMaps, MethodSpec, attribution_maps, normalize_maps
from .overlay import overlay

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

    images = check_images(images)
    percentile = check_percentile(percentile)
    alpha = check_alpha(alpha)
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
    pictures = to_display(display_images, n, images)
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
    scale = font_scale(figure_width)
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
    label_chars = chars_for(_ROW_LABEL_IN - 0.1, small)
    title_chars = chars_for(cell_size, medium)
    for row in range(n):
        ax = figure.add_subplot(grid[row, 0])
        ax.imshow(
            pictures[row],
            extent=extent,
            cmap="gray" if pictures[row].ndim == 2 else None,
            interpolation="antialiased",
        )
        clean_axes(ax)
        predicted = int(result.predictions[row])
        target = int(result.targets[row])
        lines = [] if row_labels is None else [short(str(row_labels[row]), label_chars)]
        p_text = format_probability(float(result.probabilities[row, predicted]))
        lines += labelled(class_name(categories, predicted), "", p_text, label_chars)
        if target != predicted:
            p_target = format_probability(float(result.probabilities[row, target]))
            lines += labelled(class_name(categories, target), "explains ", p_target, label_chars)
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
            clean_axes(ax)
            if not bool((values > 0).any()):
                mark_all_zero(ax, small)
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
    bar_chars = chars_for(cell_size * (columns - 1), small)
    bar.set_label("\n".join(textwrap.wrap(what, bar_chars)), fontsize=small)
    bar.set_ticks([0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=small)
    if note:
        figure.supxlabel(
            "\n".join(textwrap.wrap(note, chars_for(figure_width - 0.2, small))), fontsize=small
        )
    if title:
        figure.suptitle(
            "\n".join(textwrap.wrap(title, chars_for(figure_width - 0.2, medium + 1))),
            fontsize=medium + scale,
        )
    return figure
