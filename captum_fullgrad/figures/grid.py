"""The seed paper's Table 5: images in rows, saliency methods in columns
(:func:`comparison_grid`)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
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
    short,
    to_display,
)
from .maps import AttributionMaps, MethodSpec, attribution_maps
from .overlay import show_map

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

    images = check_images(images)
    percentile = check_percentile(percentile)
    alpha = check_alpha(alpha)
    colour_map = colormaps[cmap]  # KeyError naming the valid maps for an unknown name
    result = precomputed
    if result is None:
        result = attribution_maps(
            model, images, targets, methods, batch_size=batch_size, progress=progress
        )
    n = images.shape[0]
    _check_map_counts(result, n)
    pictures = to_display(display_images, n, images)
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"got {len(row_labels)} row labels for {n} images")
    names = list(result.maps)
    height, width = images.shape[-2:]
    extent = (0, width, height, 0)
    layout = _GridLayout.make(n, 1 + len(names), height / width, cell_size, title, note)
    figure, grid = layout.figure()
    for row in range(n):
        ax = figure.add_subplot(grid[row, 0])
        _image_cell(ax, pictures[row], extent, result, row, categories, row_labels, layout)
        for column, name in enumerate(names, start=1):
            ax = figure.add_subplot(grid[row, column])
            picture = pictures[row] if overlay_maps else None
            show_map(
                ax,
                result.maps[name][row],
                extent,
                cmap,
                picture=picture,
                alpha=alpha,
                percentile=percentile,
                signed=False,
                fontsize=layout.small,
            )
            if row == 0:
                label = result.labels.get(name, name)
                ax.set_title(_column_title(label, name, layout), fontsize=layout.medium)
    _colour_bar(figure, grid, n, colour_map, percentile, alpha if overlay_maps else None, layout)
    if note:
        figure.supxlabel(
            "\n".join(textwrap.wrap(note, chars_for(layout.width - 0.2, layout.small))),
            fontsize=layout.small,
        )
    if title:
        figure.suptitle(
            "\n".join(textwrap.wrap(title, chars_for(layout.width - 0.2, layout.medium + 1))),
            fontsize=layout.medium + layout.scale,
        )
    return figure


def _check_map_counts(result: AttributionMaps, n: int) -> None:
    for name, maps in result.maps.items():
        if maps.shape[0] != n:
            raise ValueError(
                f"precomputed maps of {name!r} are for {maps.shape[0]} images, not {n}"
            )


@dataclass
class _GridLayout:
    """Sizes of a grid of ``rows`` images by ``columns`` panels (the image and the maps):
    inches, font sizes and how many characters fit in a label."""

    rows: int
    columns: int
    aspect: float  # image height / width
    cell_size: float
    width: float
    scale: float
    small: float
    medium: float
    header: float
    footer: float
    label_chars: int
    title_chars: int

    @classmethod
    def make(
        cls,
        rows: int,
        columns: int,
        aspect: float,
        cell_size: Optional[float],
        title: Optional[str],
        note: Optional[str],
    ) -> "_GridLayout":
        if cell_size is None:
            cell_size = min(1.8, (PRINT_WIDTH_IN - _ROW_LABEL_IN - _GRID_MARGIN_IN) / columns)
        if isinstance(cell_size, bool) or not isinstance(cell_size, (int, float)) or cell_size <= 0:
            raise ValueError(f"cell_size must be a positive number of inches, got {cell_size!r}")
        width = _ROW_LABEL_IN + _GRID_MARGIN_IN + cell_size * columns
        scale = font_scale(width)
        small, medium = MIN_FONT_PT * scale, (MIN_FONT_PT + 0.5) * scale
        return cls(
            rows=rows,
            columns=columns,
            aspect=aspect,
            cell_size=cell_size,
            width=width,
            scale=scale,
            small=small,
            medium=medium,
            header=0.45 * scale + (0.3 * scale if title else 0.0),
            footer=0.55 * scale + (0.2 * scale if note else 0.0),
            label_chars=chars_for(_ROW_LABEL_IN - 0.1, small),
            title_chars=chars_for(cell_size, medium),
        )

    def figure(self) -> Tuple[Figure, Any]:
        """The figure and its grid: a row of panels per image, then the colour bar's row."""
        figure = Figure(
            figsize=(
                self.width,
                self.cell_size * self.rows * self.aspect + self.header + self.footer,
            ),
            layout="constrained",
        )
        FigureCanvasAgg(figure)
        bar_height = 0.12 * self.scale
        grid = figure.add_gridspec(
            self.rows + 1,
            self.columns,
            height_ratios=[self.cell_size * self.aspect] * self.rows + [bar_height],
        )
        return figure, grid


def _image_cell(
    ax: Any,
    picture: np.ndarray,
    extent: Tuple[float, ...],
    result: AttributionMaps,
    row: int,
    categories: Optional[Sequence[str]],
    row_labels: Optional[Sequence[str]],
    layout: _GridLayout,
) -> None:
    """Column 1: the image, labelled on its left with the prediction (and the explained
    class when it differs), and the optional row label above them."""
    ax.imshow(
        picture,
        extent=extent,
        cmap="gray" if picture.ndim == 2 else None,
        interpolation="antialiased",
    )
    clean_axes(ax)
    predicted = int(result.predictions[row])
    target = int(result.targets[row])
    chars = layout.label_chars
    lines = [] if row_labels is None else [short(str(row_labels[row]), chars)]
    p_text = format_probability(float(result.probabilities[row, predicted]))
    lines += labelled(class_name(categories, predicted), "", p_text, chars)
    if target != predicted:
        p_target = format_probability(float(result.probabilities[row, target]))
        lines += labelled(class_name(categories, target), "explains ", p_target, chars)
    ax.set_ylabel("\n".join(lines), fontsize=layout.small, rotation=0, ha="right", va="center")
    if row == 0:
        ax.set_title("Image", fontsize=layout.medium)


def _column_title(label: str, name: str, layout: _GridLayout) -> str:
    """A method's label wrapped to its column (whole words only); its name if empty."""
    wrapped = textwrap.wrap(
        label, layout.title_chars, break_on_hyphens=False, break_long_words=False
    )
    return "\n".join(wrapped) or name


def _colour_bar(
    figure: Figure,
    grid: Any,
    row: int,
    colour_map: Any,
    percentile: float,
    alpha: Optional[float],
    layout: _GridLayout,
) -> None:
    """The horizontal colour bar under the maps, saying how they were normalised (and
    blended, with ``alpha``, when they are overlays)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colour_map)
    bar = figure.colorbar(mappable, cax=figure.add_subplot(grid[row, 1:]), orientation="horizontal")
    what = f"saliency / its {percentile:g}th percentile, clipped to [0, 1]"
    if alpha is not None:
        what += f"; blended over the image with alpha = {alpha:g}"
    bar_chars = chars_for(layout.cell_size * (layout.columns - 1), layout.small)
    bar.set_label("\n".join(textwrap.wrap(what, bar_chars)), fontsize=layout.small)
    bar.set_ticks([0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=layout.small)
