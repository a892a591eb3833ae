r"""The outcome of an evaluation: :class:`EvaluationReport` and :func:`write_report`.

The JSON schema of :meth:`EvaluationReport.to_json` and ``results.json``::

    {
      "meta": {
        "model": str,               # model name
        "n": int,                   # images evaluated (localisation, pixel perturbation)
        "seed": int,                # seed of every metric's randomness and of the controls
        "torch": str, "captum": str, "captum_fullgrad": str, "python": str,
        "device": str, "threads": int,
        "date": str,                # ISO 8601, local time, seconds
        "wall_time_s": float,       # evaluate() from start to end
        "timings_s": {stage: float},  # "maps", then one per metric that ran, "bootstrap"
        "map_seconds_per_image": {method: float},
        "accuracy": float,          # top-1 accuracy of the model on the n images
        "target": "label",          # maps explain the true class
        "subsets": {metric: n},     # images per metric (localisation, pixel_perturbation,
                                    # road, infidelity, sensitivity, sanity, ...)
        "settings": {...},          # every metric setting (percentages, samples, ...)
        "methods": {method: {"label": str, "kind": "method" | "control",
                             "parameters": {name: value}}},
        "infidelity_noise_std": float | null,  # what each metric records (Metric.meta)
        "sanity_layers": [str],     # modules randomised, in order (output first)
        "sanity_undefined": {method: int},  # Spearman values set to 0 (constant maps)
        ...                         # anything passed as evaluate(meta=...)
      },
      "metrics": {score: {"label": str, "higher_is_better": bool, "n": int,
                          "group": str, "description": str, "reference": str}},
      "results": {method: {score: {"mean": float, "low": float, "high": float,
                                   "n": int}}},
      "curves": {method: {curve: {"x": [number or str], "y": [float]}}}
    }

``low`` and ``high`` bound the 95 % percentile-bootstrap interval of the mean (2000
resamples unless ``settings.n_bootstrap`` says otherwise). Non-finite numbers are
written as ``null``. Methods and scores appear in evaluation order.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from captum_fullgrad._io import write_text
from captum_fullgrad.evaluation._common import jsonable
from captum_fullgrad.evaluation.statistics import bootstrap_ci

__all__ = ["EvaluationReport", "MetricInfo", "MetricValue", "write_report"]


def finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


@dataclass(frozen=True)
class MetricInfo:
    """What a metric measures and which way is better."""

    key: str
    label: str
    higher_is_better: bool
    n: int
    group: str
    description: str = ""
    reference: str = ""
    #: Shown in the overview, rank and per-score tables of ``results.md`` (not in JSON).
    headline: bool = True

    @property
    def direction(self) -> str:
        """``"higher is better"`` or ``"lower is better"``."""
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class MetricValue:
    """Mean of a metric over ``n`` images with its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int


@dataclass
class EvaluationReport:
    """The outcome of :func:`evaluate`.

    Attributes:
        meta: run metadata (see the module docstring for the keys).
        metrics: metric key -> :class:`MetricInfo`, in report order.
        results: method -> metric key -> :class:`MetricValue`.
        per_example: method -> metric key -> ``(n,)`` float64 per-image values (the same
            images, in the same order, for every method), for paired comparisons.
        curves: method -> curve name -> ``{"x": [...], "y": [...]}`` (mean curves of the
            pixel perturbation, ROAD and the sanity check).
        labels: method -> display label.
    """

    meta: Dict[str, Any]
    metrics: "OrderedDict[str, MetricInfo]"
    results: "OrderedDict[str, OrderedDict[str, MetricValue]]"
    per_example: Dict[str, Dict[str, np.ndarray]]
    curves: Dict[str, Dict[str, Dict[str, list]]]
    labels: Dict[str, str]

    # ---------------------------------------------------------------- queries
    @property
    def methods(self) -> List[str]:
        """Method names, in evaluation order (controls last)."""
        return list(self.results)

    def is_control(self, method: str) -> bool:
        return self.meta.get("methods", {}).get(method, {}).get("kind") == "control"

    def ranking(self, metric: str) -> List[Tuple[str, MetricValue, int]]:
        """``(method, value, rank)`` from best to worst; tied means share a rank."""
        info = self.metrics[metric]
        rows = [
            (m, r[metric])
            for m, r in self.results.items()
            if metric in r and finite(r[metric].mean)
        ]
        sign = -1.0 if info.higher_is_better else 1.0
        rows.sort(key=lambda item: sign * item[1].mean)
        ranked: List[Tuple[str, MetricValue, int]] = []
        for position, (method, value) in enumerate(rows):
            if ranked and value.mean == ranked[-1][1].mean:
                rank = ranked[-1][2]
            else:
                rank = position + 1
            ranked.append((method, value, rank))
        return ranked

    def best(self, metric: str, exclude: Sequence[str] = ()) -> Optional[str]:
        """The method with the best mean on ``metric`` (None if no method has it)."""
        for method, _, _ in self.ranking(metric):
            if method not in exclude:
                return method
        return None

    def compare(self, a: str, b: str, metric: str) -> MetricValue:
        """Paired comparison: mean of ``a - b`` per image with its bootstrap interval.

        Both methods were scored on the same images, so the interval of the per-image
        difference is much tighter than the two intervals of the means suggest.
        """
        diff = self.per_example[a][metric] - self.per_example[b][metric]
        seed = int(self.meta.get("seed", 0))
        settings = self.meta.get("settings", {})
        mean, low, high = bootstrap_ci(
            diff,
            n_resamples=int(settings.get("n_bootstrap", 2000)),
            confidence=float(settings.get("confidence", 0.95)),
            seed=seed,
        )
        return MetricValue(mean, low, high, int(diff.shape[0]))

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> Dict[str, Any]:
        """The JSON document (see the module docstring for the schema)."""
        return jsonable(
            {
                "meta": self.meta,
                "metrics": {
                    key: {
                        "label": info.label,
                        "higher_is_better": info.higher_is_better,
                        "n": info.n,
                        "group": info.group,
                        "description": info.description,
                        "reference": info.reference,
                    }
                    for key, info in self.metrics.items()
                },
                "results": {
                    method: {key: asdict(value) for key, value in values.items()}
                    for method, values in self.results.items()
                },
                "curves": self.curves,
            }
        )

    def to_json(self, indent: Optional[int] = 2) -> str:
        """The report as JSON text (non-finite numbers become ``null``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    def to_markdown(self) -> str:
        """The report as a Markdown document: overview, FullGrad's standing, rankings."""
        from captum_fullgrad.evaluation.markdown import markdown

        return markdown(self)

    def plot(
        self, out_dir: Union[str, "os.PathLike[str]", None] = None, dpi: int = 90
    ) -> Dict[str, Any]:
        """The metrics' curves: the plots the registered metrics declare.

        Returns ``{name: matplotlib Figure}`` for the curves present (for the built-in
        metrics ``"pixel_perturbation"``, ``"road"``, ``"sanity"``), built without pyplot
        (Agg canvas). With ``out_dir``,
        each is also written there as ``<name>.png``.
        """
        from captum_fullgrad.evaluation.plots import figures as make_figures

        figures = make_figures(self)
        if out_dir is not None:
            from captum_fullgrad.figures import save_figure

            for name, figure in figures.items():
                save_figure(figure, Path(out_dir) / f"{name}.png", dpi=dpi)
        return figures


def write_report(
    report: EvaluationReport, out_dir: Union[str, "os.PathLike[str]"], dpi: int = 90
) -> List[Path]:
    """Write ``results.json``, ``results.md`` and the plots (PNG) to ``out_dir``.

    Each file is written to a temporary file and moved into place, so none is ever left
    half-written. ``results.json`` follows the schema in the module docstring:
    ``{"meta": {...}, "metrics": {...}, "results": {method: {metric: {"mean", "low",
    "high", "n"}}}, "curves": {...}}``.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "results.json"
    write_text(path, report.to_json())
    written.append(path)
    path = out / "results.md"
    write_text(path, report.to_markdown())
    written.append(path)
    for name in report.plot(out, dpi=dpi):
        written.append(out / f"{name}.png")
    return written
