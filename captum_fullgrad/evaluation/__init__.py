r"""Evaluation metrics for saliency maps: pure functions of (model, inputs, targets, maps, masks).

Conventions: inputs ``(B, C, H, W)``; ``model`` an ``nn.Module`` in eval mode returning
logits ``(B, K)``; ``target`` ``(B,)`` class indices (or one int); saliency maps
``(B, H, W)`` or ``(B, 1, H, W)``, larger = more important; masks bool ``(B, H, W)`` or
``(B, 1, H, W)``. Every metric runs on the inputs' device and is deterministic for a
given seed.

Metrics, their reference, and which direction is better:

- :func:`pointing_game` (Zhang et al., ECCV 2016): a hit is better.
- :func:`relevance_mass`, :func:`relevance_rank` (Arras et al., Information Fusion
  2022): higher is better.
- :func:`pixel_perturbation` (Srinivas & Fleuret, NeurIPS 2019, sec. 5.1): lower change
  is better when removing the least salient pixels, higher when removing the most.
- :func:`road` (Rong et al., ICML 2022): lower accuracy is better for MoRF, higher for
  LeRF.
- :func:`cascading_randomisation` (Adebayo et al., NeurIPS 2018): similarity to the
  original map should fall as layers are randomised.
- :func:`infidelity_score`, :func:`sensitivity_score` (Yeh et al., NeurIPS 2019, via
  Captum): lower is better.

Controls any method should beat: :class:`UniformRandomMap`, :class:`BlurredRandomMap`,
:class:`SobelEdgeMap`. Statistics: :func:`bootstrap_ci`, :func:`trapezoid`.

The suite: each metric above is also declared as a :class:`Metric` next to its function
and registered (:func:`register_metric`, :func:`registered_metrics`); :func:`evaluate`
runs every method (and the controls) through every registered metric and returns an
:class:`EvaluationReport` (means with bootstrap CIs, JSON, Markdown, plots);
:func:`write_report` writes it to a directory. ``captum-fullgrad evaluate`` is its
command line (:mod:`captum_fullgrad.evaluation.command`); see ``docs/evaluation.md``, and
``docs/extending.md`` for adding a metric.
"""

from typing import TYPE_CHECKING, Any

# The metric modules import torch on first use, so these imports are cheap (the registry's
# declarations read without torch: ``captum-fullgrad evaluate --help``).
from captum_fullgrad.evaluation import metric as _metric
from captum_fullgrad.evaluation.captum_scores import infidelity_score, sensitivity_score
from captum_fullgrad.evaluation.localisation import pointing_game, relevance_mass, relevance_rank
from captum_fullgrad.evaluation.metric import *  # noqa: F403 - the registry's public names
from captum_fullgrad.evaluation.perturbation import PixelPerturbationResult, pixel_perturbation
from captum_fullgrad.evaluation.road import RoadResult, noisy_linear_imputation, road
from captum_fullgrad.evaluation.sanity import (
    CascadingRandomisationResult,
    cascading_randomisation,
    randomise_layer_,
    spearman_correlation,
    ssim,
)
from captum_fullgrad.evaluation.statistics import bootstrap_ci, trapezoid

if TYPE_CHECKING:  # pragma: no cover
    from captum_fullgrad.evaluation.controls import (
        BlurredRandomMap,
        SobelEdgeMap,
        UniformRandomMap,
        blurred_random_map,
        sobel_edge_map,
        uniform_random_map,
    )
    from captum_fullgrad.evaluation.suite import (
        CONTROL_NAMES,
        EvaluationReport,
        EvaluationSettings,
        MetricInfo,
        MetricValue,
        evaluate,
        write_report,
    )

# Names from modules that need torch when imported (the controls are torch modules, the
# runner imports the library), imported on first use (PEP 562).
_LAZY = {
    "BlurredRandomMap": "controls",
    "SobelEdgeMap": "controls",
    "UniformRandomMap": "controls",
    "blurred_random_map": "controls",
    "sobel_edge_map": "controls",
    "uniform_random_map": "controls",
    "CONTROL_NAMES": "suite",
    "EvaluationReport": "suite",
    "EvaluationSettings": "suite",
    "MetricInfo": "suite",
    "MetricValue": "suite",
    "evaluate": "suite",
    "write_report": "suite",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> Any:
    return sorted([*globals(), *_LAZY])


__all__ = [
    *_metric.__all__,  # Images, Metric, ..., register_metric: declared once, in metric.py
    "BlurredRandomMap",
    "CONTROL_NAMES",
    "CascadingRandomisationResult",
    "EvaluationReport",
    "EvaluationSettings",
    "MetricInfo",
    "MetricValue",
    "PixelPerturbationResult",
    "RoadResult",
    "SobelEdgeMap",
    "UniformRandomMap",
    "blurred_random_map",
    "bootstrap_ci",
    "cascading_randomisation",
    "evaluate",
    "infidelity_score",
    "noisy_linear_imputation",
    "pixel_perturbation",
    "pointing_game",
    "randomise_layer_",
    "relevance_mass",
    "relevance_rank",
    "road",
    "sensitivity_score",
    "sobel_edge_map",
    "spearman_correlation",
    "ssim",
    "trapezoid",
    "uniform_random_map",
    "write_report",
]
