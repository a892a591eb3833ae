r"""The evaluation suite: every saliency method against every metric, with confidence intervals.

:func:`evaluate` computes the saliency maps of every method (by default every method in
:func:`captum_fullgrad.methods.available_methods` plus three controls that any method
should beat) on a set of images with known object masks, runs the metrics of this
package on them, and returns an :class:`EvaluationReport`: for every method and metric
the mean over the images with a 95 % percentile-bootstrap confidence interval, the
number of images it was computed on, the curves behind the areas, and the per-image
values (for paired comparisons). :func:`write_report` writes it to a directory as
``results.json``, ``results.md`` and PNG plots.

Protocol (see ``docs/evaluation.md`` for the reasoning):

- Every map explains the **true class** of its image, the class whose object the mask
  marks; the model's accuracy on the images is recorded in the report's metadata.
- All methods are scored on the **same images** with the **same seeds**, so differences
  between methods are paired; :meth:`EvaluationReport.compare` bootstraps the per-image
  differences.
- Costly metrics run on a prefix of the images (``n_road``, ``n_infidelity``,
  ``n_sensitivity``, ``n_sanity``); every reported value carries its own ``n``.

Metrics (key: which way is better: what it is; reference):

- ``pointing_game`` (higher): hit rate; a hit when every maximum of the map lies on the
  object mask dilated by ``pointing_tolerance`` px. Zhang et al., ECCV 2016.
- ``pointing_game_0px`` (higher): the same without tolerance (the maxima on the mask).
- ``relevance_mass`` (higher): share of the map's mass on the object. Arras et al. 2022.
- ``relevance_rank`` (higher): share of the |mask| most salient pixels on the object.
  Arras et al. 2022.
- ``pixel_perturbation_least_area`` (lower): absolute fractional change of the true
  class's logit after replacing the k % least salient pixels by the images' mean colour,
  averaged over k (trapezoid area divided by the width of the k range). Srinivas &
  Fleuret, NeurIPS 2019, sec. 5.1. ``pixel_perturbation_least@K``: the same at k = K %.
- ``pixel_perturbation_most_area`` (higher) and ``pixel_perturbation_most@K``: the
  counterpart removing the most salient pixels first (Samek et al. 2017).
- ``road_morf_accuracy`` (lower), ``road_lerf_accuracy`` (higher): ROAD (noisy linear
  imputation, no retraining), most / least relevant pixels first; top-1 accuracy
  averaged over the removal levels. Rong et al., ICML 2022.
- ``road_morf_probability`` (lower), ``road_lerf_probability`` (higher): the same with the
  true class's softmax probability, a finer per-image signal than 0/1 accuracy.
- ``road_gap`` (higher): per image, LeRF minus MoRF probability (about 0 for an
  uninformative order).
- ``sanity_spearman_abs`` (lower): cascading model-parameter randomisation; Spearman
  correlation of |map| with the trained model's |map|, averaged over the randomisation
  steps. Adebayo et al., NeurIPS 2018. ``sanity_ssim`` (lower): the same with SSIM.
- ``infidelity`` (lower): Captum's infidelity, Gaussian perturbations, optimal rescaling.
  ``sensitivity_max`` (lower): Captum's max-sensitivity. Yeh et al., NeurIPS 2019.

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
        "timings_s": {stage: float},
        "map_seconds_per_image": {method: float},
        "accuracy": float,          # top-1 accuracy of the model on the n images
        "target": "label",          # maps explain the true class
        "subsets": {"localisation": n, "pixel_perturbation": n, "road": n,
                    "infidelity": n, "sensitivity": n, "sanity": n},
        "settings": {...},          # every metric setting (percentages, samples, ...)
        "methods": {method: {"label": str, "kind": "method" | "control",
                             "parameters": {name: value}}},
        "sanity_layers": [str],     # modules randomised, in order (output first)
        "sanity_undefined": {method: int},  # Spearman values set to 0 (constant maps)
        ...                         # anything passed as evaluate(meta=...)
      },
      "metrics": {metric: {"label": str, "higher_is_better": bool, "n": int,
                           "group": str, "description": str, "reference": str}},
      "results": {method: {metric: {"mean": float, "low": float, "high": float,
                                    "n": int}}},
      "curves": {method: {curve: {"x": [number or str], "y": [float]}}}
    }

``low`` and ``high`` bound the 95 % percentile-bootstrap interval of the mean (2000
resamples unless ``settings.n_bootstrap`` says otherwise). Non-finite numbers are
written as ``null``. Methods and metrics appear in evaluation order.

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

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from captum_fullgrad._io import write_text
from captum_fullgrad.evaluation.captum_scores import infidelity_score, sensitivity_score
from captum_fullgrad.evaluation.controls import BlurredRandomMap, SobelEdgeMap, UniformRandomMap
from captum_fullgrad.evaluation.localisation import pointing_game, relevance_mass, relevance_rank
from captum_fullgrad.evaluation.perturbation import DEFAULT_PERCENTAGES, pixel_perturbation
from captum_fullgrad.evaluation.road import DEFAULT_ROAD_PERCENTAGES, road
from captum_fullgrad.evaluation.sanity import cascading_randomisation
from captum_fullgrad.evaluation.statistics import bootstrap_ci, trapezoid

__all__ = [
    "CONTROL_NAMES",
    "EvaluationReport",
    "EvaluationSettings",
    "MetricInfo",
    "MetricValue",
    "evaluate",
    "write_report",
]

#: Names of the three control maps, in report order.
CONTROL_NAMES: Tuple[str, ...] = ("uniform_random", "blurred_random", "sobel_edges")
_CONTROL_LABELS = {
    "uniform_random": "Control: uniform random",
    "blurred_random": "Control: blurred random",
    "sobel_edges": "Control: Sobel edges",
}

MethodSpec = Union[str, Any, Tuple[str, Callable[..., Tensor]]]

_REF_POINTING = "Zhang et al., 'Top-down neural attention by excitation backprop', ECCV 2016"
_REF_ARRAS = "Arras, Osman & Samek, 'CLEVR-XAI', Information Fusion 81, 2022"
_REF_SRINIVAS = "Srinivas & Fleuret, 'Full-gradient representation for neural network visualization', NeurIPS 2019, sec. 5.1"
_REF_SAMEK = "Samek et al., 'Evaluating the visualization of what a deep neural network has learned', IEEE TNNLS 2017"
_REF_ROAD = "Rong et al., 'A consistent and efficient evaluation strategy for attribution methods', ICML 2022"
_REF_ADEBAYO = "Adebayo et al., 'Sanity checks for saliency maps', NeurIPS 2018"
_REF_YEH = "Yeh et al., 'On the (in)fidelity and sensitivity of explanations', NeurIPS 2019"


# --------------------------------------------------------------------------------------
# Settings and result containers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationSettings:
    """Every knob of :func:`evaluate` besides the methods and the images.

    Subset sizes (``n_*``) count images from the start of the image set; ``None`` means
    all images, 0 skips the metric. The defaults are those of the published run
    (``benchmarks/evaluate.sh``), :meth:`fast` gives cheap settings for tests.

    Attributes:
        pointing_tolerance: pointing-game dilation radius in pixels (3 px on 64 px images
            is Zhang et al.'s 15 px on ~300 px images).
        perturbation_percentages: k values (percent of pixels) of the pixel perturbation.
        perturbation_output: ``"logit"`` (the paper's output) or ``"probability"``.
        road_percentages: removal levels of ROAD, in percent.
        road_noise_std: std of ROAD's imputation noise, in input units (Rong et al.: 0.01).
        road_tol: relative residual at which ROAD's imputation solve stops; 1e-4 keeps
            the imputation error below 5e-4, twenty times below the imputation noise.
        road_chunk: images per imputation solve (the solve is memory bound; chunks that
            fit in the CPU cache are faster). Chunk ``i`` draws its tie-breaking order and
            noise from seed ``seed + i``, so results depend on the chunk size.
        n_road: images for ROAD.
        n_infidelity: images for the infidelity.
        infidelity_samples: Gaussian perturbations per image.
        infidelity_noise: their standard deviation, in units of the standard deviation
            of the images' pixels (0.1: a tenth of the data's spread, the scale of Yeh et
            al.'s noisy-baseline perturbations on standardised inputs).
        n_sensitivity: images for max-sensitivity (each recomputes the map
            ``sensitivity_samples`` times: costly for sampling methods).
        sensitivity_samples: perturbed inputs per image.
        sensitivity_radius: L-infinity radius of the perturbations, in input units.
        n_sanity: images for the cascading randomisation (each recomputes the map once
            per randomised layer, plus twice for the intact model).
        sanity_layers: modules to randomise, first to last; ``None``: every parametrised
            module from the output to the input.
        n_bootstrap: bootstrap resamples per confidence interval.
        confidence: coverage of the intervals.
        method_params: ``{method name: {parameter: value}}`` overrides of registered
            methods' parameters (e.g. ``{"integrated_gradients": {"n_steps": 8}}``).
    """

    pointing_tolerance: int = 3
    perturbation_percentages: Tuple[float, ...] = tuple(DEFAULT_PERCENTAGES)
    perturbation_output: str = "logit"
    road_percentages: Tuple[float, ...] = tuple(DEFAULT_ROAD_PERCENTAGES)
    road_noise_std: float = 0.01
    road_tol: float = 1e-4
    road_chunk: int = 50
    n_road: Optional[int] = 50
    n_infidelity: Optional[int] = 200
    infidelity_samples: int = 10
    infidelity_noise: float = 0.1
    n_sensitivity: Optional[int] = 16
    sensitivity_samples: int = 10
    sensitivity_radius: float = 0.02
    n_sanity: Optional[int] = 16
    sanity_layers: Optional[Tuple[str, ...]] = None
    n_bootstrap: int = 2000
    confidence: float = 0.95
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def fast(cls, **overrides: Any) -> "EvaluationSettings":
        """Cheap settings for tests and smoke runs: few samples, steps and removal levels.

        Integrated gradients with 8 steps, SmoothGrad and SmoothFullGrad with 4 samples,
        ROAD at 20/50/80 %, 4 infidelity and 3 sensitivity perturbations, 200 bootstrap
        resamples, and small subsets. ``overrides`` replace any field.
        """
        base = cls(
            perturbation_percentages=(1.0, 5.0, 10.0),
            road_percentages=(20.0, 50.0, 80.0),
            n_road=None,
            n_infidelity=None,
            infidelity_samples=4,
            n_sensitivity=4,
            sensitivity_samples=3,
            n_sanity=4,
            n_bootstrap=200,
            method_params={
                "integrated_gradients": {"n_steps": 8},
                "smoothgrad": {"nt_samples": 4},
                "smoothfullgrad": {"nt_samples": 4},
            },
        )
        return replace(base, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready copy of the settings."""
        return _jsonable(asdict(self))


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
            if metric in r and _finite(r[metric].mean)
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
        return _jsonable(
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
        return _markdown(self)

    def plot(
        self, out_dir: Union[str, "os.PathLike[str]", None] = None, dpi: int = 90
    ) -> Dict[str, Any]:
        """Curves of the pixel perturbation, ROAD and the sanity check.

        Returns ``{name: matplotlib Figure}`` for the curves present (``"pixel_perturbation"``,
        ``"road"``, ``"sanity"``), built without pyplot (Agg canvas). With ``out_dir``,
        each is also written there as ``<name>.png``.
        """
        figures = _plots(self)
        if out_dir is not None:
            from captum_fullgrad.figures import save_figure

            for name, figure in figures.items():
                save_figure(figure, Path(out_dir) / f"{name}.png", dpi=dpi)
        return figures


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def _control(name: str, seed: int) -> Callable[..., Tensor]:
    if name == "uniform_random":
        return UniformRandomMap(seed=seed)
    if name == "blurred_random":
        return BlurredRandomMap(seed=seed)
    if name == "sobel_edges":
        return SobelEdgeMap()
    raise ValueError(f"unknown control {name!r}; controls: {', '.join(CONTROL_NAMES)}")


@dataclass
class _Method:
    name: str
    label: str
    fn: Callable[..., Tensor]
    kind: str
    parameters: Dict[str, Any]


def _resolve_methods(
    methods: Union[None, Sequence[MethodSpec], Mapping[str, Callable[..., Tensor]]],
    method_params: Mapping[str, Mapping[str, Any]],
    controls: bool,
    seed: int,
) -> List[_Method]:
    from captum_fullgrad.methods import AttributionMethod, available_methods, get_method

    if methods is None:
        specs: List[Any] = list(available_methods())
    elif isinstance(methods, Mapping):
        specs = list(methods.items())
    elif isinstance(methods, (str, AttributionMethod)):
        specs = [methods]
    else:
        specs = list(methods)
    resolved: List[_Method] = []
    for spec in specs:
        if isinstance(spec, str):
            key = spec.strip().lower().replace("-", "_")
            if key in CONTROL_NAMES:
                resolved.append(
                    _Method(key, _CONTROL_LABELS[key], _control(key, seed), "control", {})
                )
                continue
            method = get_method(key, **dict(method_params.get(key, {})))
        elif isinstance(spec, AttributionMethod):
            method = spec
            if spec.name in method_params:
                method = spec.configure(**dict(method_params[spec.name]))
        elif (
            isinstance(spec, tuple)
            and len(spec) == 2
            and isinstance(spec[0], str)
            and callable(spec[1])
        ):
            resolved.append(_Method(spec[0], spec[0], spec[1], "method", {}))
            continue
        else:
            raise TypeError(
                "methods must be names, AttributionMethod objects or (name, callable) pairs, "
                f"got {spec!r}"
            )
        resolved.append(
            _Method(method.name, method.label, method, "method", dict(method.parameters))
        )
    unknown = sorted(set(method_params) - set(available_methods()))
    if unknown:
        raise ValueError(
            f"method_params names unknown methods: {', '.join(unknown)}; "
            f"registered methods: {', '.join(available_methods())}"
        )
    if controls:
        present = {m.name for m in resolved}
        for name in CONTROL_NAMES:
            if name not in present:
                resolved.append(
                    _Method(name, _CONTROL_LABELS[name], _control(name, seed), "control", {})
                )
    names = [m.name for m in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each method may appear once; repeated: {', '.join(repeated)}")
    if not resolved:
        raise ValueError("no method to evaluate")
    return resolved


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def _subset(n_total: int, requested: Optional[int]) -> int:
    if requested is None:
        return n_total
    if isinstance(requested, bool) or int(requested) != requested or requested < 0:
        raise ValueError(f"subset sizes must be integers >= 0 or None, got {requested!r}")
    return min(int(requested), n_total)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return fallback


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Progress:
    """A tqdm bar on stderr over (stage, method) steps; a no-op when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, desc="evaluate", unit="step", file=sys.stderr, disable=not enabled
        )

    def stage(self, stage: str, method: str) -> None:
        self.bar.set_postfix_str(f"{stage}: {method}", refresh=True)

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    masks: Tensor,
    methods: Union[None, Sequence[MethodSpec], Mapping[str, Callable[..., Tensor]]] = None,
    n_sanity: Optional[int] = None,
    batch_size: int = 50,
    seed: int = 0,
    progress: bool = True,
    *,
    n_road: Optional[int] = None,
    n_infidelity: Optional[int] = None,
    n_sensitivity: Optional[int] = None,
    settings: Optional[EvaluationSettings] = None,
    controls: bool = True,
    model_name: str = "model",
    meta: Optional[Mapping[str, Any]] = None,
) -> EvaluationReport:
    """Score saliency methods with every metric of the package; means with bootstrap CIs.

    Args:
        model: classifier in eval mode returning logits ``(N, K)``; its device is used
            for everything (images, labels and masks are moved there).
        images: ``(N, C, H, W)`` model inputs (already preprocessed).
        labels: ``(N,)`` true classes; every map explains its image's true class.
        masks: ``(N, H, W)`` bool masks of the class-deciding object.
        methods: what to evaluate: ``None`` for every registered method
            (:func:`~captum_fullgrad.methods.available_methods`), or a sequence of
            method names, :class:`~captum_fullgrad.methods.AttributionMethod` objects,
            ``(name, callable)`` pairs or control names (:data:`CONTROL_NAMES`), or a
            mapping ``name -> callable``. Callables follow the registry's convention
            ``fn(model, inputs, target) -> (B, 1, H, W)`` non-negative maps.
        n_sanity: images for the cascading-randomisation sanity check (default:
            ``settings.n_sanity``); 0 skips it.
        batch_size: images per method call and per forward pass.
        seed: seed of the controls, of every metric's randomness (tie-breaking, noise,
            randomised weights) and of the bootstrap.
        progress: a tqdm progress bar on stderr.
        n_road, n_infidelity, n_sensitivity: subset sizes overriding ``settings``
            (``None``: keep the settings' value).
        settings: :class:`EvaluationSettings` (default: the published run's).
        controls: append the three controls (:data:`CONTROL_NAMES`) unless listed.
        model_name: recorded in the metadata.
        meta: extra metadata to record (e.g. the data seed).

    Returns:
        :class:`EvaluationReport`.
    """
    started = time.perf_counter()
    settings = settings or EvaluationSettings()
    overrides = {
        key: value
        for key, value in (
            ("n_sanity", n_sanity),
            ("n_road", n_road),
            ("n_infidelity", n_infidelity),
            ("n_sensitivity", n_sensitivity),
        )
        if value is not None
    }
    settings = replace(settings, **overrides)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a (N, C, H, W) tensor with N >= 1, got {getattr(images, 'shape', images)}"
        )
    n, _, h, w = images.shape
    labels = torch.as_tensor(labels).reshape(-1).long()
    masks = torch.as_tensor(masks)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if masks.shape != (n, h, w):
        raise ValueError(f"masks must have shape ({n}, {h}, {w}), got {tuple(masks.shape)}")
    masks = masks.bool()
    if not bool(masks.flatten(1).any(1).all()):
        raise ValueError("every mask must mark at least one pixel")
    resolved = _resolve_methods(methods, settings.method_params, controls, seed)

    device = _model_device(model, images.device)
    images = images.detach().to(device).float()
    labels = labels.to(device)
    masks = masks.to(device)
    subsets = {
        "localisation": n,
        "pixel_perturbation": n,
        "road": _subset(n, settings.n_road),
        "infidelity": _subset(n, settings.n_infidelity),
        "sensitivity": _subset(n, settings.n_sensitivity),
        "sanity": _subset(n, settings.n_sanity),
    }
    stages = ["maps", "localisation", "pixel_perturbation"]
    stages += [s for s in ("road", "infidelity", "sensitivity", "sanity") if subsets[s] > 0]
    bar = _Progress(len(stages) * len(resolved), progress)
    timings: Dict[str, float] = {stage: 0.0 for stage in stages}

    per_example: Dict[str, Dict[str, np.ndarray]] = {m.name: {} for m in resolved}
    curves: Dict[str, Dict[str, Dict[str, list]]] = {m.name: {} for m in resolved}
    metric_infos: "OrderedDict[str, MetricInfo]" = OrderedDict()
    map_seconds: Dict[str, float] = {}
    infidelity_noise_abs: Optional[float] = None
    sanity_undefined: Dict[str, int] = {}
    sanity_layers: List[str] = []

    def record(method: str, info: MetricInfo, values: Tensor) -> None:
        metric_infos.setdefault(info.key, info)
        per_example[method][info.key] = values.detach().double().cpu().numpy().reshape(-1)

    try:
        # 0. Accuracy of the model on the images.
        with torch.no_grad():
            logits = torch.cat([model(images[i : i + batch_size]) for i in range(0, n, batch_size)])
        accuracy = float((logits.argmax(1) == labels).float().mean())

        # 1. Maps of every method, for the true class.
        maps: Dict[str, Tensor] = {}
        for method in resolved:
            bar.stage("maps", method.name)
            chunks = []
            _synchronize(device)
            start = time.perf_counter()
            for i in range(0, n, batch_size):
                with torch.enable_grad():
                    chunk = method.fn(model, images[i : i + batch_size], labels[i : i + batch_size])
                chunks.append(_as_map(chunk, method.name))
            _synchronize(device)
            elapsed = time.perf_counter() - start
            maps[method.name] = torch.cat(chunks)
            map_seconds[method.name] = elapsed / n
            timings["maps"] += elapsed
            bar.step()

        # 2. Localisation.
        for method in _stage(bar, timings, "localisation", "localisation", resolved):
            m = maps[method.name]
            record(
                method.name,
                _info("pointing_game", n, settings),
                pointing_game(m, masks, settings.pointing_tolerance).float(),
            )
            record(
                method.name,
                _info("pointing_game_0px", n, settings),
                pointing_game(m, masks, 0).float(),
            )
            record(method.name, _info("relevance_mass", n, settings), relevance_mass(m, masks))
            record(method.name, _info("relevance_rank", n, settings), relevance_rank(m, masks))

        # 3. Pixel perturbation, least and most salient first.
        fill = images.mean(dim=(0, 2, 3))  # the images' mean colour
        percentages = tuple(float(k) for k in settings.perturbation_percentages)
        width = percentages[-1] - percentages[0] if len(percentages) > 1 else 1.0
        for method in _stage(bar, timings, "pixel_perturbation", "pixel perturbation", resolved):
            for order in ("least", "most"):
                result = pixel_perturbation(
                    model,
                    images,
                    labels,
                    maps[method.name],
                    percentages=percentages,
                    order=order,
                    output=settings.perturbation_output,
                    baseline=fill,
                    seed=seed,
                    batch_size=batch_size,
                )
                area = (
                    result.auc_per_example / width if len(percentages) > 1 else result.changes[:, 0]
                )
                record(method.name, _info(f"pixel_perturbation_{order}_area", n, settings), area)
                for j, k in enumerate(percentages):
                    record(
                        method.name,
                        _info(f"pixel_perturbation_{order}@{_fmt_k(k)}", n, settings),
                        result.changes[:, j],
                    )
                curves[method.name][f"pixel_perturbation_{order}"] = {
                    "x": list(percentages),
                    "y": result.mean_curve.double().cpu().tolist(),
                }

        # 4. ROAD, MoRF and LeRF.
        n_road_images = subsets["road"]
        if n_road_images:
            road_percentages = tuple(float(k) for k in settings.road_percentages)
            road_width = (
                road_percentages[-1] - road_percentages[0] if len(road_percentages) > 1 else 1.0
            )
            chunk = max(1, int(settings.road_chunk))
            for method in _stage(bar, timings, "road", "ROAD", resolved):
                probabilities = {}
                for order in ("morf", "lerf"):
                    correct, probs = [], []
                    for index, first in enumerate(range(0, n_road_images, chunk)):
                        sl = slice(first, min(first + chunk, n_road_images))
                        part = road(
                            model,
                            images[sl],
                            labels[sl],
                            maps[method.name][sl],
                            percentages=road_percentages,
                            order=order,
                            noise_std=settings.road_noise_std,
                            seed=seed + index,
                            batch_size=batch_size,
                            tol=settings.road_tol,
                        )
                        correct.append(part.correct.double())
                        probs.append(part.probabilities.double())
                    correct_t, probs_t = torch.cat(correct), torch.cat(probs)
                    if len(road_percentages) > 1:
                        x = torch.tensor(
                            road_percentages, dtype=torch.float64, device=correct_t.device
                        )
                        acc = trapezoid(correct_t, x) / road_width
                        prob = trapezoid(probs_t, x) / road_width
                    else:
                        acc, prob = correct_t[:, 0], probs_t[:, 0]
                    probabilities[order] = prob
                    record(
                        method.name, _info(f"road_{order}_accuracy", n_road_images, settings), acc
                    )
                    record(
                        method.name,
                        _info(f"road_{order}_probability", n_road_images, settings),
                        prob,
                    )
                    curves[method.name][f"road_{order}_accuracy"] = {
                        "x": list(road_percentages),
                        "y": correct_t.mean(0).cpu().tolist(),
                    }
                    curves[method.name][f"road_{order}_probability"] = {
                        "x": list(road_percentages),
                        "y": probs_t.mean(0).cpu().tolist(),
                    }
                record(
                    method.name,
                    _info("road_gap", n_road_images, settings),
                    probabilities["lerf"] - probabilities["morf"],
                )

        # 5. Infidelity, from the maps already computed.
        n_inf = subsets["infidelity"]
        if n_inf:
            sl = slice(0, n_inf)
            noise = settings.infidelity_noise * float(images.std())
            infidelity_noise_abs = noise
            for method in _stage(bar, timings, "infidelity", "infidelity", resolved):
                scores = infidelity_score(
                    model,
                    method.fn,
                    images[sl],
                    labels[sl],
                    n_perturb_samples=settings.infidelity_samples,
                    noise_std=noise,
                    normalize=True,
                    seed=seed,
                    max_examples_per_batch=_captum_batch(
                        n_inf, settings.infidelity_samples, batch_size
                    ),
                    maps=maps[method.name][sl],
                )
                record(method.name, _info("infidelity", n_inf, settings), scores)

        # 6. Max-sensitivity: the map is recomputed for every perturbed input.
        n_sens = subsets["sensitivity"]
        if n_sens:
            sl = slice(0, n_sens)
            for method in _stage(bar, timings, "sensitivity", "sensitivity", resolved):
                scores = sensitivity_score(
                    model,
                    method.fn,
                    images[sl],
                    labels[sl],
                    n_perturb_samples=settings.sensitivity_samples,
                    perturb_radius=settings.sensitivity_radius,
                    seed=seed,
                    # Perturbed inputs per explanation call: at most batch_size (the
                    # sampling methods' peak memory grows with the batch), at least n_sens.
                    max_examples_per_batch=_captum_batch(
                        n_sens, settings.sensitivity_samples, batch_size, 1
                    ),
                )
                record(method.name, _info("sensitivity_max", n_sens, settings), scores)

        # 7. Sanity check: cascading randomisation, output layer first.
        n_san = subsets["sanity"]
        if n_san:
            sl = slice(0, n_san)
            layers = list(settings.sanity_layers) if settings.sanity_layers else None
            for method in _stage(bar, timings, "sanity", "sanity check", resolved):
                result = cascading_randomisation(
                    model, method.fn, images[sl], labels[sl], seed=seed, layers=layers
                )
                sanity_layers = list(result.steps[1:])
                rho = result.spearman_abs.clone()
                undefined = torch.isnan(rho)
                sanity_undefined[method.name] = int(undefined[1:].sum())
                rho[undefined] = 0.0  # a constant map has no rank order left: no correlation
                record(method.name, _info("sanity_spearman_abs", n_san, settings), rho[1:].mean(0))
                record(method.name, _info("sanity_ssim", n_san, settings), result.ssim[1:].mean(0))
                steps = list(range(len(result.steps)))
                curves[method.name]["sanity_spearman_abs"] = {"x": steps, "y": rho.mean(1).tolist()}
                curves[method.name]["sanity_ssim"] = {"x": steps, "y": result.ssim.mean(1).tolist()}
    finally:
        bar.close()

    # Summaries with bootstrap confidence intervals.
    start = time.perf_counter()
    ordered_infos = OrderedDict(
        sorted(metric_infos.items(), key=lambda item: _metric_order(item[0]))
    )
    results: "OrderedDict[str, OrderedDict[str, MetricValue]]" = OrderedDict()
    for method in resolved:
        row: "OrderedDict[str, MetricValue]" = OrderedDict()
        for key in ordered_infos:
            values = per_example[method.name].get(key)
            if values is None:
                continue
            row[key] = _summary(values, settings, seed)
        results[method.name] = row
    timings["bootstrap"] = time.perf_counter() - start

    import captum

    from captum_fullgrad import __version__

    wall = time.perf_counter() - started
    metadata: Dict[str, Any] = {
        "model": model_name,
        "n": n,
        "seed": seed,
        "torch": torch.__version__,
        "captum": captum.__version__,
        "captum_fullgrad": __version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_time_s": wall,
        "timings_s": timings,
        "map_seconds_per_image": map_seconds,
        "accuracy": accuracy,
        "target": "label",
        "batch_size": batch_size,
        "image_size": [h, w],
        "subsets": subsets,
        "settings": settings.to_dict(),
        "methods": {
            m.name: {"label": m.label, "kind": m.kind, "parameters": _jsonable(m.parameters)}
            for m in resolved
        },
        "infidelity_noise_std": infidelity_noise_abs,
        "sanity_layers": sanity_layers,
        "sanity_undefined": sanity_undefined,
    }
    metadata.update(dict(meta or {}))
    return EvaluationReport(
        meta=metadata,
        metrics=ordered_infos,
        results=results,
        per_example=per_example,
        curves=curves,
        labels={m.name: m.label for m in resolved},
    )


def _stage(
    bar: Any, timings: Dict[str, float], key: str, label: str, methods: Sequence[Any]
) -> Iterator[Any]:
    """Each method in turn, shown under ``label`` by the progress bar; the stage's wall time
    goes to ``timings[key]`` once every method is done."""
    start = time.perf_counter()
    for method in methods:
        bar.stage(label, method.name)
        yield method
        bar.step()
    timings[key] = time.perf_counter() - start


def _captum_batch(n: int, samples: int, batch_size: int, per_example: Optional[int] = None) -> int:
    """``max_examples_per_batch`` for Captum's metrics: about ``batch_size * per_example``
    (default ``samples``) perturbed inputs per sub-batch, within Captum's bounds: at least
    ``n`` (every example in each sub-batch) and at most ``n * samples``."""
    per_example = samples if per_example is None else per_example
    return max(n, min(n * samples, batch_size * per_example))


def _as_map(maps: Tensor, name: str) -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"method {name!r} returned {type(maps).__name__}, not a tensor")
    maps = maps.detach()
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"method {name!r} must return (B, 1, H, W) maps, got {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"method {name!r} returned NaN or infinite values")
    return maps.float()


def _summary(values: np.ndarray, settings: EvaluationSettings, seed: int) -> MetricValue:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return MetricValue(float("nan"), float("nan"), float("nan"), 0)
    mean, low, high = bootstrap_ci(
        finite, n_resamples=settings.n_bootstrap, confidence=settings.confidence, seed=seed
    )
    return MetricValue(mean, low, high, int(finite.size))


# --------------------------------------------------------------------------------------
# Metric catalogue
# --------------------------------------------------------------------------------------

_BASE_METRICS: Tuple[Tuple[str, str, bool, str, str, str], ...] = (
    (
        "pointing_game",
        "Pointing game",
        True,
        "localisation",
        "hit rate: every maximum of the map lies on the object mask dilated by {tol} px",
        _REF_POINTING,
    ),
    (
        "pointing_game_0px",
        "Pointing game (0 px)",
        True,
        "localisation",
        "hit rate with no tolerance: every maximum of the map lies on the object mask itself",
        _REF_POINTING,
    ),
    (
        "relevance_mass",
        "Relevance mass",
        True,
        "localisation",
        "share of the map's total mass inside the object mask",
        _REF_ARRAS,
    ),
    (
        "relevance_rank",
        "Relevance rank",
        True,
        "localisation",
        "share of the |mask| most salient pixels inside the object mask",
        _REF_ARRAS,
    ),
    (
        "pixel_perturbation_least_area",
        "Pixel pert., least first (area)",
        False,
        "pixel_perturbation",
        "absolute fractional change of the true class's {output} after replacing the k % least salient pixels by the mean colour, averaged over k = {ks} % (trapezoid area / width)",
        _REF_SRINIVAS,
    ),
    (
        "pixel_perturbation_most_area",
        "Pixel pert., most first (area)",
        True,
        "pixel_perturbation",
        "the same, removing the k % most salient pixels first",
        _REF_SAMEK,
    ),
    (
        "road_morf_accuracy",
        "ROAD MoRF accuracy",
        False,
        "road",
        "top-1 accuracy after imputing the most relevant pixels first, averaged over {road} % removed",
        _REF_ROAD,
    ),
    (
        "road_lerf_accuracy",
        "ROAD LeRF accuracy",
        True,
        "road",
        "top-1 accuracy after imputing the least relevant pixels first, averaged over {road} % removed",
        _REF_ROAD,
    ),
    (
        "road_morf_probability",
        "ROAD MoRF probability",
        False,
        "road",
        "true-class softmax probability, most relevant imputed first, averaged over the removal levels",
        _REF_ROAD,
    ),
    (
        "road_lerf_probability",
        "ROAD LeRF probability",
        True,
        "road",
        "true-class softmax probability, least relevant imputed first, averaged over the removal levels",
        _REF_ROAD,
    ),
    (
        "road_gap",
        "ROAD LeRF − MoRF",
        True,
        "road",
        "per-image LeRF minus MoRF probability (about 0 for an uninformative order)",
        _REF_ROAD,
    ),
    (
        "sanity_spearman_abs",
        "Sanity: Spearman (abs.)",
        False,
        "sanity",
        "Spearman correlation of |map| with the trained model's |map|, averaged over the cascading randomisation steps (output layer first)",
        _REF_ADEBAYO,
    ),
    (
        "sanity_ssim",
        "Sanity: SSIM",
        False,
        "sanity",
        "SSIM of the normalised |map| with the trained model's, averaged over the randomisation steps",
        _REF_ADEBAYO,
    ),
    (
        "infidelity",
        "Infidelity",
        False,
        "captum",
        "Captum infidelity: squared error of the map's prediction of the logit change under Gaussian noise (std {noise} x the images' pixel std), after optimal rescaling",
        _REF_YEH,
    ),
    (
        "sensitivity_max",
        "Max-sensitivity",
        False,
        "captum",
        "Captum sensitivity_max: largest relative change of the map under uniform noise of radius {radius} ({samples} draws)",
        _REF_YEH,
    ),
)
_BASE_INDEX = {row[0]: i for i, row in enumerate(_BASE_METRICS)}


def _fmt_k(k: float) -> str:
    return f"{k:g}"


def _metric_order(key: str) -> Tuple[int, float]:
    if key in _BASE_INDEX:
        return (2 * _BASE_INDEX[key], 0.0)
    base, _, k = key.partition("@")
    area = f"{base}_area"
    return (2 * _BASE_INDEX.get(area, len(_BASE_METRICS)) + 1, float(k) if k else 0.0)


def _info(key: str, n: int, settings: EvaluationSettings) -> MetricInfo:
    fields = {
        "tol": settings.pointing_tolerance,
        "output": settings.perturbation_output,
        "ks": ", ".join(_fmt_k(k) for k in settings.perturbation_percentages),
        "road": ", ".join(_fmt_k(k) for k in settings.road_percentages),
        "noise": settings.infidelity_noise,
        "radius": settings.sensitivity_radius,
        "samples": settings.sensitivity_samples,
    }
    if key in _BASE_INDEX:
        _, label, higher, group, description, reference = _BASE_METRICS[_BASE_INDEX[key]]
        return MetricInfo(key, label, higher, n, group, description.format(**fields), reference)
    base, _, k = key.partition("@")
    order = base.rsplit("_", 1)[-1]
    higher = order == "most"
    return MetricInfo(
        key,
        f"Pixel pert., {order} first, k = {k} %",
        higher,
        n,
        "pixel_perturbation",
        f"absolute fractional change of the true class's {settings.perturbation_output} after replacing the {k} % {order} salient pixels",
        _REF_SRINIVAS if order == "least" else _REF_SAMEK,
    )


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------

#: Metrics of the overview table, in column order.
HEADLINE_METRICS: Tuple[str, ...] = tuple(row[0] for row in _BASE_METRICS)


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def _fmt(value: float, digits: int = 3) -> str:
    if not _finite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e4 or magnitude < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _method_cell(report: EvaluationReport, method: str) -> str:
    label = _cell(report.labels.get(method, method))
    return f"{label} (`{method}`)" if label != method else f"`{method}`"


def _verdict(report: EvaluationReport, metric: str, subject: str) -> Optional[Tuple[str, str, str]]:
    """(opponent, difference text, verdict) of ``subject`` on ``metric`` (paired bootstrap)."""
    info = report.metrics[metric]
    if metric not in report.results.get(subject, {}):
        return None
    best = report.best(metric)
    opponent = report.best(metric, exclude=(subject,)) if best == subject else best
    if opponent is None:
        return None
    diff = report.compare(subject, opponent, metric)
    better = diff.low > 0 if info.higher_is_better else diff.high < 0
    worse = diff.high < 0 if info.higher_is_better else diff.low > 0
    if best == subject:
        verdict = "**best** (significantly)" if better else "best, but not significantly"
    elif worse:
        verdict = "**loses** (significantly)"
    else:
        verdict = "loses, not significantly"
    text = f"{_fmt(diff.mean)} [{_fmt(diff.low)}, {_fmt(diff.high)}]"
    return opponent, text, verdict


def _markdown(report: EvaluationReport) -> str:
    meta = report.meta
    lines: List[str] = []
    add = lines.append
    add(f"# Saliency evaluation: model `{meta.get('model')}`")
    add("")
    add(
        f"Generated {meta.get('date')} in {meta.get('wall_time_s', 0.0):.0f} s on {meta.get('device')} "
        f"({meta.get('threads')} threads; torch {meta.get('torch')}, captum {meta.get('captum')}, "
        f"captum-fullgrad {meta.get('captum_fullgrad')}). {meta.get('n')} images"
        + (f" (data seed {meta['data_seed']})" if "data_seed" in meta else "")
        + f", metric seed {meta.get('seed')}; the model's top-1 accuracy on them: "
        f"{100 * meta.get('accuracy', float('nan')):.1f} %. Every map explains the image's true class."
    )
    add("")
    add(
        "Values are means over images with 95 % percentile-bootstrap confidence intervals; "
        "↑ higher is better, ↓ lower is better; **bold** is the best mean. `n` is the number "
        "of images each metric was computed on (costly metrics use the first n images). "
        "Rows marked † do not beat the best control on that metric."
    )
    add("")

    headline = [key for key in HEADLINE_METRICS if key in report.metrics]
    best = {key: report.best(key) for key in headline}
    best_control = {
        key: report.best(key, exclude=[m for m in report.methods if not report.is_control(m)])
        for key in headline
    }

    add("## Overview")
    add("")
    header = ["method"] + [
        f"{report.metrics[k].label} {report.metrics[k].arrow} (n={report.metrics[k].n})"
        for k in headline
    ]
    add("| " + " | ".join(header) + " |")
    add("|" + "---|" * len(header))
    for method in report.methods:
        cells = [_method_cell(report, method)]
        for key in headline:
            value = report.results[method].get(key)
            if value is None:
                cells.append("")
                continue
            text = _fmt(value.mean)
            cells.append(f"**{text}**" if method == best[key] else text)
        add("| " + " | ".join(cells) + " |")
    add("")

    # Mean rank over the headline metrics (controls included).
    add("### Rank per metric")
    add("")
    add("1 = best; ties share a rank. The last column is the mean rank over these metrics.")
    add("")
    rank_of: Dict[str, Dict[str, int]] = {m: {} for m in report.methods}
    for key in headline:
        for method, _, rank in report.ranking(key):
            rank_of[method][key] = rank
    header = (
        ["method"]
        + [f"{report.metrics[k].label} {report.metrics[k].arrow}" for k in headline]
        + ["mean rank"]
    )
    add("| " + " | ".join(header) + " |")
    add("|" + "---|" * len(header))
    order = sorted(
        report.methods,
        key=lambda m: np.mean(list(rank_of[m].values())) if rank_of[m] else float("inf"),
    )
    for method in order:
        ranks = rank_of[method]
        cells = [_method_cell(report, method)]
        for key in headline:
            rank = ranks.get(key)
            cells.append("" if rank is None else (f"**{rank}**" if rank == 1 else str(rank)))
        cells.append(f"{np.mean(list(ranks.values())):.1f}" if ranks else "")
        add("| " + " | ".join(cells) + " |")
    add("")

    for subject in ("fullgrad",):
        if subject not in report.results:
            continue
        add(f"## Where `{subject}` wins and loses")
        add("")
        add(
            f"Paired comparison on the same images: `{subject}` minus the best other method "
            f"(or, where `{subject}` is best, minus the runner-up), mean difference and 95 % "
            "bootstrap interval of the per-image differences."
        )
        add("")
        add(
            f"| metric | direction | n | `{subject}` | rank | best other | its value | difference [95 % CI] | verdict |"
        )
        add("|---|---|---|---|---|---|---|---|---|")
        for key in headline:
            outcome = _verdict(report, key, subject)
            if outcome is None:
                continue
            opponent, text, verdict = outcome
            info = report.metrics[key]
            rank = rank_of[subject].get(key, "")
            add(
                f"| {info.label} | {info.direction} | {info.n} | {_fmt(report.results[subject][key].mean)} | "
                f"{rank}/{len(report.ranking(key))} | `{opponent}` | {_fmt(report.results[opponent][key].mean)} | {text} | {verdict} |"
            )
        add("")

    add("## Rankings per metric")
    add("")
    for key in headline:
        info = report.metrics[key]
        add(f"### {info.label}: {info.direction} (n = {info.n})")
        add("")
        add(f"{info.description[0].upper() + info.description[1:]}. Reference: {info.reference}.")
        add("")
        add("| rank | method | mean | 95 % CI |")
        add("|---|---|---|---|")
        control = best_control.get(key)
        control_mean = report.results[control][key].mean if control else None
        for method, value, rank in report.ranking(key):
            name = _method_cell(report, method)
            mean = _fmt(value.mean)
            if method == best[key]:
                name, mean = f"**{name}**", f"**{mean}**"
            dagger = ""
            if control_mean is not None and not report.is_control(method):
                beats = (
                    value.mean > control_mean
                    if info.higher_is_better
                    else value.mean < control_mean
                )
                dagger = "" if beats else " †"
            add(f"| {rank} | {name}{dagger} | {mean} | [{_fmt(value.low)}, {_fmt(value.high)}] |")
        add("")

    for order, direction in (("least", "lower is better"), ("most", "higher is better")):
        keys = [k for k in report.metrics if k.startswith(f"pixel_perturbation_{order}@")]
        if not keys:
            continue
        n_pp = report.metrics[keys[0]].n
        add(f"## Pixel perturbation per k, {order} salient first: {direction} (n = {n_pp})")
        add("")
        add(
            f"Mean absolute fractional change of the true class's {meta.get('settings', {}).get('perturbation_output', 'logit')} "
            f"after replacing the k % {order} salient pixels by the images' mean colour; **bold** is the best per k."
        )
        add("")
        header = ["method"] + [f"k = {k.partition('@')[2]} %" for k in keys]
        add("| " + " | ".join(header) + " |")
        add("|" + "---|" * len(header))
        best_k = {k: report.best(k) for k in keys}
        for method in report.methods:
            cells = [_method_cell(report, method)]
            for k in keys:
                value = report.results[method].get(k)
                text = "" if value is None else _fmt(value.mean, 4)
                cells.append(f"**{text}**" if method == best_k[k] else text)
            add("| " + " | ".join(cells) + " |")
        add("")

    add("## Plots")
    add("")
    for name, caption in (
        (
            "pixel_perturbation",
            "Pixel perturbation curves (left: least salient removed first, lower is better; right: most salient first, higher is better)",
        ),
        (
            "road",
            "ROAD accuracy curves (left: MoRF, lower is better; right: LeRF, higher is better)",
        ),
        (
            "sanity",
            "Cascading randomisation (similarity to the trained model's map; lower is better once layers are randomised)",
        ),
    ):
        if any(name.split("_")[0] in curve for m in report.curves.values() for curve in m):
            add(f"![{caption}]({name}.png)")
            add("")
            add(f"*{caption}.*")
            add("")

    add("## Settings")
    add("")
    subsets = meta.get("subsets", {})
    add(
        "Images per metric: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in subsets.items())
        + "."
    )
    add("")
    settings = meta.get("settings", {})
    shown = {k: v for k, v in settings.items() if k != "method_params" and not k.startswith("n_")}
    add("Metric settings: " + ", ".join(f"`{k}` = {v}" for k, v in shown.items()) + ".")
    add("")
    if meta.get("sanity_layers"):
        add(
            "Sanity check: layers randomised in this order (cascading, output first): "
            + ", ".join(f"`{x}`" for x in meta["sanity_layers"])
            + "."
        )
        undefined = {m: c for m, c in meta.get("sanity_undefined", {}).items() if c}
        if undefined:
            lines[-1] += (
                " Spearman correlations that were undefined (a constant map) were counted as 0: "
                + ", ".join(f"`{m}` {c}" for m, c in undefined.items())
                + "."
            )
        add("")
    add("| method | kind | parameters | seconds per image (maps) |")
    add("|---|---|---|---|")
    for method in report.methods:
        info = meta.get("methods", {}).get(method, {})
        params = (
            ", ".join(f"{k}={v}" for k, v in info.get("parameters", {}).items() if v is not None)
            or "-"
        )
        seconds = meta.get("map_seconds_per_image", {}).get(method)
        add(
            f"| `{method}` | {info.get('kind', '')} | {params} | {'' if seconds is None else f'{seconds:.4f}'} |"
        )
    add("")
    timings = meta.get("timings_s", {})
    if timings:
        add(
            "Wall time per stage: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in timings.items())
            + "."
        )
        add("")
    if meta.get("command"):
        add("Command:")
        add("")
        add("```")
        add(str(meta["command"]))
        add("```")
        add("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _styles(report: EvaluationReport) -> Dict[str, Dict[str, Any]]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    styles: Dict[str, Dict[str, Any]] = {}
    real = [m for m in report.methods if not report.is_control(m)]
    greys = {"uniform_random": "0.55", "blurred_random": "0.35", "sobel_edges": "0.15"}
    dashes = {"uniform_random": ":", "blurred_random": "--", "sobel_edges": "-."}
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
                "color": greys.get(method, "0.5"),
                "linestyle": dashes.get(method, ":"),
                "linewidth": 1.4,
            }
    return styles


def _panel(
    ax: Any,
    report: EvaluationReport,
    curve: str,
    styles: Dict[str, Dict[str, Any]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> bool:
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
    report: EvaluationReport,
    panels: Sequence[Tuple[str, str, str, str, bool]],
    styles: Dict[str, Dict[str, Any]],
    suptitle: str,
    xticks: Optional[Sequence[str]] = None,
) -> Optional[Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels))
    drawn = False
    for ax, (curve, xlabel, ylabel, title, logx) in zip(np.atleast_1d(axes), panels):
        drawn |= _panel(ax, report, curve, styles, xlabel, ylabel, title, logx)
        if xticks is not None:
            ax.set_xticks(range(len(xticks)))
            ax.set_xticklabels(xticks, rotation=60, ha="right", fontsize=7)
    if not drawn:
        return None
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.suptitle(suptitle, fontsize=11)
    figure.subplots_adjust(
        left=0.06, right=0.80, bottom=0.24 if xticks is not None else 0.14, top=0.86, wspace=0.25
    )
    return figure


def _plots(report: EvaluationReport) -> Dict[str, Any]:
    styles = _styles(report)
    model = report.meta.get("model")
    figures: Dict[str, Any] = {}
    n_pp = (
        report.metrics["pixel_perturbation_least_area"].n
        if "pixel_perturbation_least_area" in report.metrics
        else 0
    )
    output = report.meta.get("settings", {}).get("perturbation_output", "logit")
    figure = _figure(
        report,
        [
            (
                "pixel_perturbation_least",
                "% pixels removed (least salient first)",
                f"|fractional {output} change|",
                "Least salient first (lower is better)",
                True,
            ),
            (
                "pixel_perturbation_most",
                "% pixels removed (most salient first)",
                f"|fractional {output} change|",
                "Most salient first (higher is better)",
                True,
            ),
        ],
        styles,
        f"Pixel perturbation, {model}, n = {n_pp}",
    )
    if figure is not None:
        figures["pixel_perturbation"] = figure
    if "road_morf_accuracy" in report.metrics:
        figure = _figure(
            report,
            [
                (
                    "road_morf_accuracy",
                    "% pixels imputed (most relevant first)",
                    "accuracy",
                    "MoRF (lower is better)",
                    False,
                ),
                (
                    "road_lerf_accuracy",
                    "% pixels imputed (least relevant first)",
                    "accuracy",
                    "LeRF (higher is better)",
                    False,
                ),
            ],
            styles,
            f"ROAD (noisy linear imputation), {model}, n = {report.metrics['road_morf_accuracy'].n}",
        )
        if figure is not None:
            figures["road"] = figure
    if "sanity_spearman_abs" in report.metrics:
        steps = ["original"] + list(report.meta.get("sanity_layers", []))
        figure = _figure(
            report,
            [
                (
                    "sanity_spearman_abs",
                    "randomised up to (cascading, output first)",
                    "Spearman of |map|",
                    "Rank correlation (lower is better)",
                    False,
                ),
                (
                    "sanity_ssim",
                    "randomised up to (cascading, output first)",
                    "SSIM",
                    "SSIM (lower is better)",
                    False,
                ),
            ],
            styles,
            f"Cascading randomisation, {model}, n = {report.metrics['sanity_spearman_abs'].n}",
            xticks=steps,
        )
        if figure is not None:
            figures["sanity"] = figure
    return figures


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    write_text(path, text)


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
    _write_text(path, report.to_json())
    written.append(path)
    path = out / "results.md"
    _write_text(path, report.to_markdown())
    written.append(path)
    for name in report.plot(out, dpi=dpi):
        written.append(out / f"{name}.png")
    return written


def _jsonable(value: Any) -> Any:
    """A JSON-ready copy: tuples become lists, non-finite floats None, others their repr."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    if isinstance(value, nn.Module):
        return type(value).__name__
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)
