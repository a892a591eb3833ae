r"""The evaluation runner: :func:`evaluate` scores saliency methods with the registered metrics.

Stages, each timed in ``meta.timings_s``: the model's accuracy; the maps of every method
for the true class (``"maps"``; or maps given by the caller, e.g. read from a store);
then every registered metric (:func:`~captum_fullgrad.evaluation.metric.
registered_metrics`, in its ``order``) for every method, on the images the metric asks
for; finally the bootstrap summaries (``"bootstrap"``). The runner names no metric: what
runs, on how many images, and what it records all come from the registry.

Protocol (see ``docs/evaluation.md`` for the reasoning):

- Every map explains the **true class** of its image, the class whose object the mask
  marks; the model's accuracy on the images is recorded in the report's metadata.
- All methods are scored on the **same images** with the **same seeds**, so differences
  between methods are paired; :meth:`EvaluationReport.compare` bootstraps the per-image
  differences.
- Costly metrics run on a prefix of the images (``n_road``, ``n_infidelity``,
  ``n_sensitivity``, ``n_sanity``, ...); every reported value carries its own ``n``.
"""

from __future__ import annotations

import copy
import datetime
import platform
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from captum_fullgrad._device import model_device, synchronize
from captum_fullgrad.evaluation._common import jsonable
from captum_fullgrad.evaluation._methods import EvaluatedMethod, Methods, resolve
from captum_fullgrad.evaluation.metric import (
    Metric,
    MetricContext,
    per_image,
    registered_metrics,
)
from captum_fullgrad.evaluation.report import EvaluationReport, MetricInfo, MetricValue
from captum_fullgrad.evaluation.settings import EvaluationSettings
from captum_fullgrad.evaluation.statistics import bootstrap_ci

__all__ = ["evaluate", "select_metrics"]


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


def _stage(
    bar: _Progress, timings: Dict[str, float], key: str, label: str, methods: Sequence[Any]
) -> Iterator[Any]:
    """Each method in turn, shown under ``label`` by the progress bar; the stage's wall time
    goes to ``timings[key]`` once every method is done."""
    start = time.perf_counter()
    for method in methods:
        bar.stage(label, method.name)
        yield method
        bar.step()
    timings[key] = time.perf_counter() - start


def select_metrics(keys: Optional[Sequence[str]] = None) -> List[Metric]:
    """The registered metrics named in ``keys`` (all when None), in run order.

    Raises:
        ValueError: an unknown or repeated key, or an empty selection.
    """
    metrics = registered_metrics()
    if keys is None:
        return metrics
    known = [m.key for m in metrics]
    wanted = list(keys)
    unknown = [k for k in wanted if k not in known]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(known)}")
    repeated = sorted({k for k in wanted if wanted.count(k) > 1})
    if repeated:
        raise ValueError(f"each metric may appear once; repeated: {', '.join(repeated)}")
    if not wanted:
        raise ValueError("no metric to run")
    return [m for m in metrics if m.key in wanted]


def _subset(n_total: int, requested: Optional[int]) -> int:
    if requested is None:
        return n_total
    if isinstance(requested, bool) or int(requested) != requested or requested < 0:
        raise ValueError(f"subset sizes must be integers >= 0 or None, got {requested!r}")
    return min(int(requested), n_total)


def _check_inputs(
    images: Tensor, labels: Any, masks: Any, batch_size: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Images ``(N, C, H, W)``, labels ``(N,)`` long and masks ``(N, H, W)`` bool, checked."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = getattr(images, "shape", images)
        raise ValueError(f"images must be a (N, C, H, W) tensor with N >= 1, got {shape}")
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
    return images, labels, masks


def _as_map(maps: Tensor, name: str, shape: Tuple[int, ...]) -> Tensor:
    """A method's maps as float ``(B, 1, H, W)``, checked against the images' ``shape``."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"method {name!r} returned {type(maps).__name__}, not a tensor")
    maps = maps.detach()
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"method {name!r} must return (B, 1, H, W) maps, got {tuple(maps.shape)}")
    if tuple(maps.shape[0:1]) + tuple(maps.shape[2:]) != shape:
        raise ValueError(f"maps of {name!r} have shape {tuple(maps.shape)}, images {shape}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"method {name!r} returned NaN or infinite values")
    return maps.float()


def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    n = images.shape[0]
    with torch.no_grad():
        logits = torch.cat([model(images[i : i + batch_size]) for i in range(0, n, batch_size)])
    return float((logits.argmax(1) == labels).float().mean())


def _compute_maps(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    methods: Sequence[EvaluatedMethod],
    given: Mapping[str, Tensor],
    batch_size: int,
    bar: _Progress,
    timings: Dict[str, float],
) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
    """Every method's maps of every image ``(N, 1, H, W)`` (``given`` ones as they are) and
    the seconds per image of those computed here."""
    device, n = images.device, images.shape[0]
    shape = (n,) + tuple(images.shape[2:])
    maps: Dict[str, Tensor] = {}
    seconds: Dict[str, float] = {}
    for method in methods:
        bar.stage("maps", method.name)
        if method.name in given:
            maps[method.name] = _as_map(given[method.name], method.name, shape).to(device)
            bar.step()
            continue
        chunks = []
        synchronize(device)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            with torch.enable_grad():
                chunk = method.fn(model, images[i : i + batch_size], labels[i : i + batch_size])
            chunks.append(_as_map(chunk, method.name, (chunk.shape[0],) + shape[1:]))
        synchronize(device)
        elapsed = time.perf_counter() - start
        maps[method.name] = torch.cat(chunks)
        seconds[method.name] = elapsed / n
        timings["maps"] += elapsed
        bar.step()
    return maps, seconds


class _Results:
    """What the metrics record while they run: per-image values, curves, metadata."""

    def __init__(self, methods: Sequence[EvaluatedMethod], metrics: Sequence[Metric]) -> None:
        self.per_example: Dict[str, Dict[str, np.ndarray]] = {m.name: {} for m in methods}
        self.curves: Dict[str, Dict[str, Dict[str, list]]] = {m.name: {} for m in methods}
        self.meta: Dict[str, Any] = {}
        for metric in metrics:
            self.meta.update(copy.deepcopy(dict(metric.meta)))

    def record(self, metric: Metric, method: str, output: Any) -> None:
        for key, values in output.values.items():
            self.per_example[method][key] = per_image(values).cpu().numpy()
        self.curves[method].update(output.curves)
        for key, value in output.meta.items():
            if isinstance(value, dict) and isinstance(self.meta.get(key), dict):
                self.meta[key].update(value)
            else:
                self.meta[key] = value


def _run_metrics(
    context: Dict[str, Any],
    metrics: Sequence[Metric],
    subsets: Mapping[str, int],
    methods: Sequence[EvaluatedMethod],
    maps: Mapping[str, Tensor],
    bar: _Progress,
    timings: Dict[str, float],
) -> _Results:
    """Every metric that has images, for every method, in run order."""
    results = _Results(methods, metrics)
    for metric in metrics:
        if subsets[metric.key] == 0:
            continue
        ctx = MetricContext(n=subsets[metric.key], **context)
        for method in _stage(bar, timings, metric.key, metric.label, methods):
            output = metric.compute(ctx, method.name, method.fn, maps[method.name])
            results.record(metric, method.name, output)
    return results


def _infos(
    metrics: Sequence[Metric],
    settings: EvaluationSettings,
    subsets: Mapping[str, int],
    recorded: Mapping[str, Mapping[str, np.ndarray]],
) -> "OrderedDict[str, MetricInfo]":
    """The scores that were computed, in report order."""
    present = {key for values in recorded.values() for key in values}
    infos: "OrderedDict[str, MetricInfo]" = OrderedDict()
    for metric in metrics:
        for score in metric.score_list(settings):
            if score.key in present:
                infos[score.key] = MetricInfo(
                    score.key,
                    score.label,
                    score.higher_is_better,
                    subsets[metric.key],
                    metric.group_name,
                    score.description,
                    score.reference,
                    headline=score.headline,
                )
    return infos


def _summary(values: np.ndarray, settings: EvaluationSettings, seed: int) -> MetricValue:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return MetricValue(float("nan"), float("nan"), float("nan"), 0)
    mean, low, high = bootstrap_ci(
        finite, n_resamples=settings.n_bootstrap, confidence=settings.confidence, seed=seed
    )
    return MetricValue(mean, low, high, int(finite.size))


def _summaries(
    infos: Mapping[str, MetricInfo],
    methods: Sequence[EvaluatedMethod],
    recorded: Mapping[str, Mapping[str, np.ndarray]],
    settings: EvaluationSettings,
    seed: int,
) -> "OrderedDict[str, OrderedDict[str, MetricValue]]":
    results: "OrderedDict[str, OrderedDict[str, MetricValue]]" = OrderedDict()
    for method in methods:
        row: "OrderedDict[str, MetricValue]" = OrderedDict()
        for key in infos:
            values = recorded[method.name].get(key)
            if values is not None:
                row[key] = _summary(values, settings, seed)
        results[method.name] = row
    return results


def _check_given(maps: Mapping[str, Tensor], methods: Sequence[EvaluatedMethod]) -> None:
    unknown = sorted(set(maps) - {m.name for m in methods})
    if unknown:
        raise ValueError(f"maps given for methods not evaluated: {', '.join(unknown)}")


def _given_meta(maps: Mapping[str, Tensor], ran: Sequence[Metric]) -> Dict[str, Any]:
    """``meta.maps_given`` (methods whose maps the caller gave) and ``meta.maps_recomputed_by``
    (the metrics that ran which call the methods again), when maps were given."""
    if not maps:
        return {}
    return {
        "maps_given": list(maps),
        "maps_recomputed_by": [m.key for m in ran if m.recomputes_maps],
    }


def _method_meta(methods: Sequence[EvaluatedMethod]) -> Dict[str, Any]:
    """``meta.methods``: label, kind and parameters of every evaluated method."""
    return {
        m.name: {"label": m.label, "kind": m.kind, "parameters": jsonable(m.parameters)}
        for m in methods
    }


def _environment(device: torch.device) -> Dict[str, Any]:
    import captum

    from captum_fullgrad import __version__

    return {
        "torch": torch.__version__,
        "captum": captum.__version__,
        "captum_fullgrad": __version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _settings(settings: Optional[EvaluationSettings], counts: Mapping[str, Any]) -> Any:
    """``settings`` (default: the published run's) with the keyword image counts applied."""
    settings = settings or EvaluationSettings()
    given = {key: value for key, value in counts.items() if value is not None}
    return settings.with_images(given) if given else settings


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    masks: Tensor,
    methods: Methods = None,
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
    metrics: Optional[Sequence[str]] = None,
    maps: Optional[Mapping[str, Tensor]] = None,
) -> EvaluationReport:
    """Score saliency methods with every registered metric; means with bootstrap CIs.

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
            (``None``: keep the settings' value); any metric's via
            :meth:`EvaluationSettings.with_images`.
        settings: :class:`EvaluationSettings` (default: the published run's).
        controls: append the three controls (:data:`CONTROL_NAMES`) unless listed.
        model_name: recorded in the metadata.
        meta: extra metadata to record (e.g. the data seed).
        metrics: keys of the registered metrics to run (default: all of them).
        maps: precomputed maps ``(N, 1, H, W)`` or ``(N, H, W)`` by method name (e.g.
            read from a store), used instead of calling those methods for the maps
            stage; metrics that recompute maps (``Metric.recomputes_maps``: the sanity
            check, max-sensitivity) still call the method.

    Returns:
        :class:`EvaluationReport`.
    """
    started = time.perf_counter()
    settings = _settings(
        settings,
        {
            "sanity": n_sanity,
            "road": n_road,
            "infidelity": n_infidelity,
            "sensitivity": n_sensitivity,
        },
    )
    images, labels, masks = _check_inputs(images, labels, masks, batch_size)
    resolved = resolve(methods, settings.method_params, controls, seed)
    _check_given(maps or {}, resolved)
    selected = select_metrics(metrics)
    device = model_device(model, images.device)
    images = images.detach().to(device).float()
    labels, masks = labels.to(device), masks.to(device)
    n = images.shape[0]
    subsets = {m.key: _subset(n, settings.images(m.key)) for m in selected}
    ran = [m for m in selected if subsets[m.key] > 0]
    bar = _Progress((1 + len(ran)) * len(resolved), progress)
    timings: Dict[str, float] = {"maps": 0.0, **{m.key: 0.0 for m in ran}}
    context = dict(
        model=model,
        images=images,
        labels=labels,
        masks=masks,
        settings=settings,
        seed=seed,
        batch_size=batch_size,
    )
    try:
        accuracy = _accuracy(model, images, labels, batch_size)
        all_maps, map_seconds = _compute_maps(
            model, images, labels, resolved, maps or {}, batch_size, bar, timings
        )
        recorded = _run_metrics(context, selected, subsets, resolved, all_maps, bar, timings)
    finally:
        bar.close()

    start = time.perf_counter()
    infos = _infos(selected, settings, subsets, recorded.per_example)
    results = _summaries(infos, resolved, recorded.per_example, settings, seed)
    timings["bootstrap"] = time.perf_counter() - start
    metadata: Dict[str, Any] = {
        "model": model_name,
        "n": n,
        "seed": seed,
        **_environment(device),
        "wall_time_s": time.perf_counter() - started,
        "timings_s": timings,
        "map_seconds_per_image": map_seconds,
        "accuracy": accuracy,
        "target": "label",
        "batch_size": batch_size,
        "image_size": list(images.shape[2:]),
        "subsets": subsets,
        "settings": settings.to_dict(),
        "methods": _method_meta(resolved),
        **_given_meta(maps or {}, ran),
        **recorded.meta,
    }
    metadata.update(dict(meta or {}))
    return EvaluationReport(
        meta=metadata,
        metrics=infos,
        results=results,
        per_example=recorded.per_example,
        curves=recorded.curves,
        labels={m.name: m.label for m in resolved},
    )
