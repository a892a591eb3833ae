r"""The report's figures: one per :class:`~captum_fullgrad.evaluation.metric.Plot` that the
registered metrics declare, drawn from the report's mean curves without pyplot (Agg).

Real methods get a colour each (FullGrad thicker, FullGrad variants with markers); the
controls are grey, dashed or dotted, so every figure reads the same way.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from captum_fullgrad.evaluation.metric import Plot, registered_metrics
from captum_fullgrad.evaluation.report import EvaluationReport

__all__ = ["figures"]

_GREYS = {"uniform_random": "0.55", "blurred_random": "0.35", "sobel_edges": "0.15"}
_DASHES = {"uniform_random": ":", "blurred_random": "--", "sobel_edges": "-."}


def _styles(report: EvaluationReport) -> Dict[str, Dict[str, Any]]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors  # type: ignore[attr-defined]
    styles: Dict[str, Dict[str, Any]] = {}
    real = [m for m in report.methods if not report.is_control(m)]
    for i, method in enumerate(real):
        styles[method] = {
            "color": palette[i % len(palette)],
            "linestyle": "-" if i < len(palette) else "--",
            "linewidth": 2.4 if method == "fullgrad" else 1.4,
            "marker": "o" if method.startswith("fullgrad") else None,
            "markersize": 3,
        }
    for method in report.methods:
        if report.is_control(method):
            styles[method] = {
                "color": _GREYS.get(method, "0.5"),
                "linestyle": _DASHES.get(method, ":"),
                "linewidth": 1.4,
            }
    return styles


def _panel(
    ax: Any,
    report: EvaluationReport,
    curve: str,
    styles: Dict[str, Dict[str, Any]],
    labels: Sequence[str],
    logx: bool,
) -> bool:
    """One panel: every method's ``curve``; False when no method has it."""
    xlabel, ylabel, title = labels
    drawn = False
    for method in report.methods:
        data = report.curves.get(method, {}).get(curve)
        if not data:
            continue
        ax.plot(data["x"], data["y"], label=report.labels.get(method, method), **styles[method])
        drawn = True
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return drawn


def _figure(
    report: EvaluationReport, plot: Plot, n: int, styles: Dict[str, Dict[str, Any]]
) -> Optional[Any]:
    """The figure of ``plot`` (None when none of its curves was computed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fields = dict(report.meta.get("settings", {}))
    xticks = plot.xticks(report) if plot.xticks is not None else None
    figure = Figure(figsize=(11, 4.0))
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, len(plot.panels)))
    drawn = False
    for ax, (curve, xlabel, ylabel, title, logx) in zip(axes, plot.panels):
        labels = [text.format(**fields) for text in (xlabel, ylabel, title)]
        drawn |= _panel(ax, report, curve, styles, labels, logx)
        if xticks is not None:
            ax.set_xticks(range(len(xticks)))
            ax.set_xticklabels(xticks, rotation=60, ha="right", fontsize=7)
    if not drawn:
        return None
    handles, legend = axes[0].get_legend_handles_labels()
    figure.legend(handles, legend, loc="center right", fontsize=8, frameon=False)
    figure.suptitle(plot.title.format(model=report.meta.get("model"), n=n, **fields), fontsize=11)
    bottom = 0.24 if xticks is not None else 0.14
    figure.subplots_adjust(left=0.06, right=0.80, bottom=bottom, top=0.86, wspace=0.25)
    return figure


def figures(report: EvaluationReport) -> Dict[str, Any]:
    """``{plot name: matplotlib Figure}`` for every declared plot with curves to draw."""
    styles = _styles(report)
    subsets = report.meta.get("subsets", {})
    result: Dict[str, Any] = {}
    for metric in registered_metrics():
        for plot in metric.plots:
            figure = _figure(report, plot, int(subsets.get(metric.key, 0)), styles)
            if figure is not None:
                result[plot.name] = figure
    return result
