r""":class:`EvaluationSettings`: every knob of the evaluation suite besides methods and images.

The number of images of each costly metric is declared once, on the metric
(:class:`~captum_fullgrad.evaluation.metric.Images`); the settings hold the run's values
(``n_<metric key>``) and read their defaults from there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from captum_fullgrad.evaluation._common import jsonable
from captum_fullgrad.evaluation.captum_scores import INFIDELITY, SENSITIVITY
from captum_fullgrad.evaluation.metric import get_metric, registered_metrics
from captum_fullgrad.evaluation.perturbation import DEFAULT_PERCENTAGES
from captum_fullgrad.evaluation.road import DEFAULT_ROAD_PERCENTAGES, ROAD
from captum_fullgrad.evaluation.sanity import SANITY

__all__ = ["EvaluationSettings"]


@dataclass(frozen=True)
class EvaluationSettings:
    """Every knob of :func:`~captum_fullgrad.evaluation.evaluate` besides the methods and
    the images.

    Subset sizes (``n_*``) count images from the start of the image set; ``None`` means
    all images, 0 skips the metric. Their defaults are those the metrics declare for the
    published run (``benchmarks/evaluate.sh``); :meth:`fast` gives cheap settings for
    tests.

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
        n_images: images of registered subset metrics that have no ``n_<key>`` field
            above (metrics added after these settings were written), by metric key;
            missing keys take the metric's default. :meth:`images` reads any metric's.
    """

    pointing_tolerance: int = 3
    perturbation_percentages: Tuple[float, ...] = tuple(DEFAULT_PERCENTAGES)
    perturbation_output: str = "logit"
    road_percentages: Tuple[float, ...] = tuple(DEFAULT_ROAD_PERCENTAGES)
    road_noise_std: float = 0.01
    road_tol: float = 1e-4
    road_chunk: int = 50
    n_road: Optional[int] = ROAD.images.default
    n_infidelity: Optional[int] = INFIDELITY.images.default
    infidelity_samples: int = 10
    infidelity_noise: float = 0.1
    n_sensitivity: Optional[int] = SENSITIVITY.images.default
    sensitivity_samples: int = 10
    sensitivity_radius: float = 0.02
    n_sanity: Optional[int] = SANITY.images.default
    sanity_layers: Optional[Tuple[str, ...]] = None
    n_bootstrap: int = 2000
    confidence: float = 0.95
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    n_images: Mapping[str, Optional[int]] = field(default_factory=dict)

    @classmethod
    def fast(cls, **overrides: Any) -> "EvaluationSettings":
        """Cheap settings for tests and smoke runs: few samples, steps and removal levels.

        Every registered method with its cheap parameters (``MethodTraits.fast_params``:
        integrated gradients with 8 steps, SmoothGrad and SmoothFullGrad with 4 samples),
        ROAD at 20/50/80 %, 4 infidelity and 3 sensitivity perturbations, 200 bootstrap
        resamples, and the subsets the metrics declare for fast runs. ``overrides``
        replace any field.
        """
        base = cls(
            perturbation_percentages=(1.0, 5.0, 10.0),
            road_percentages=(20.0, 50.0, 80.0),
            infidelity_samples=4,
            sensitivity_samples=3,
            n_bootstrap=200,
            method_params=_fast_method_params(),
        )
        fast = {m.key: m.images.fast for m in registered_metrics() if m.images.subset}
        return replace(base.with_images(fast), **overrides)

    def images(self, key: str) -> Optional[int]:
        """Images requested for the metric ``key`` (``None``: all; 0: skip it)."""
        if key in _SUBSET_FIELDS:
            return getattr(self, f"n_{key}")
        metric = get_metric(key)
        if not metric.images.subset:
            return None
        return self.n_images.get(key, metric.images.default)

    def with_images(self, counts: Mapping[str, Optional[int]]) -> "EvaluationSettings":
        """A copy with the images of the metrics in ``counts`` (metric key -> n) replaced."""
        named: Dict[str, Any] = {f"n_{k}": v for k, v in counts.items() if k in _SUBSET_FIELDS}
        others = {k: v for k, v in counts.items() if k not in _SUBSET_FIELDS}
        for key in others:
            if not get_metric(key).images.subset:
                raise ValueError(f"metric {key!r} runs on every image; it takes no image count")
        return replace(self, n_images={**self.n_images, **others}, **named)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready copy of the settings; every subset metric's size is ``n_<key>``."""
        values = asdict(self)
        values.pop("n_images")
        for metric in registered_metrics():
            if metric.images.subset and metric.key not in _SUBSET_FIELDS:
                values[metric.setting] = self.images(metric.key)
        return jsonable(values)


def _fast_method_params() -> Dict[str, Dict[str, Any]]:
    """``{method: fast parameters}`` of every registered method that declares some."""
    from captum_fullgrad.methods import available_methods, get_method

    fast = {name: dict(get_method(name).traits.fast_params) for name in available_methods()}
    return {name: params for name, params in fast.items() if params}


#: Metric keys whose image count has a field of its own (``n_<key>``).
_SUBSET_FIELDS = frozenset(
    f.name[2:]
    for f in fields(EvaluationSettings)
    if f.name.startswith("n_") and f.name not in ("n_images", "n_bootstrap")
)
