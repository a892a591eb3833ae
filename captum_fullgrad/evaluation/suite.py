r"""The evaluation suite: every saliency method against every registered metric, with CIs.

This module gathers the suite's public names; the work is split by job:

- :mod:`~captum_fullgrad.evaluation.metric`: the metric registry (:class:`Metric`,
  :func:`register_metric`); each metric is declared next to its function
  (``localisation.py``, ``perturbation.py``, ``road.py``, ``sanity.py``,
  ``captum_scores.py``).
- :mod:`~captum_fullgrad.evaluation.settings`: :class:`EvaluationSettings`.
- :mod:`~captum_fullgrad.evaluation.run`: :func:`evaluate`, the runner.
- :mod:`~captum_fullgrad.evaluation.report`: :class:`EvaluationReport`,
  :func:`write_report` and the ``results.json`` schema.
- :mod:`~captum_fullgrad.evaluation.markdown` and :mod:`~captum_fullgrad.evaluation.plots`:
  ``results.md`` and the PNG plots.

Example::

    >>> from captum_fullgrad.datasets import synthetic_shapes
    >>> from captum_fullgrad.models import load_model
    >>> from captum_fullgrad.evaluation.suite import evaluate, write_report
    >>> loaded = load_model("shapes")
    >>> images, labels, masks = synthetic_shapes(100, seed=10_000)
    >>> report = evaluate(loaded.model, loaded.transform(images), labels, masks,
    ...                   methods=["fullgrad", "gradcam"], n_sanity=10)
    >>> print(report.to_markdown())
    >>> write_report(report, "eval-out")
"""

from captum_fullgrad.evaluation._methods import MethodSpec
from captum_fullgrad.evaluation.controls import CONTROL_NAMES
from captum_fullgrad.evaluation.report import (
    EvaluationReport,
    MetricInfo,
    MetricValue,
    write_report,
)
from captum_fullgrad.evaluation.run import evaluate
from captum_fullgrad.evaluation.settings import EvaluationSettings

__all__ = [
    "CONTROL_NAMES",
    "EvaluationReport",
    "EvaluationSettings",
    "MethodSpec",
    "MetricInfo",
    "MetricValue",
    "evaluate",
    "write_report",
]
