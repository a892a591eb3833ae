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

**Layout.** One module per job, every public name importable from here:
:mod:`~captum_fullgrad.figures.maps` (computing and normalising maps),
:mod:`~captum_fullgrad.figures.overlay`, :mod:`~captum_fullgrad.figures.grid` (Table 5),
:mod:`~captum_fullgrad.figures.decomposition_plot` (Figure 1),
:mod:`~captum_fullgrad.figures.save`; ``_common`` holds what they share (print size,
colour maps, input checks, fonts and labels).
"""

from __future__ import annotations

from ..methods import DEFAULT_TABLE5_METHODS
from ._common import (
    DEFAULT_DPI,
    MIN_FONT_PT,
    PRINT_WIDTH_IN,
    SALIENCY_CMAP,
    SIGNED_CMAP,
    format_probability,
)
from .decomposition_plot import DecompositionSummary, decomposition_figure, decomposition_summary
from .grid import comparison_grid
from .maps import AttributionMaps, MethodSpec, attribution_maps, normalize_maps
from .overlay import normalize_signed_map, overlay
from .save import save_figure

__all__ = [
    "AttributionMaps",
    "DEFAULT_DPI",
    "DEFAULT_TABLE5_METHODS",
    "MIN_FONT_PT",
    "MethodSpec",
    "PRINT_WIDTH_IN",
    "SALIENCY_CMAP",
    "SIGNED_CMAP",
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
