r"""The metric registry: one :class:`Metric` object per evaluation metric.

A metric is declared once, next to the function that computes it (``localisation.py``
declares the localisation metrics, ``road.py`` ROAD, ...), and registered with
:func:`register_metric`. Everything downstream loops over :func:`registered_metrics`:

- the runner (:func:`captum_fullgrad.evaluation.evaluate`) calls each metric's
  :attr:`Metric.compute` for every method, on the images the metric asks for;
- the report (``results.json``, ``results.md``) takes keys, labels, directions,
  descriptions and references from the metric's :class:`Score` declarations, extra
  Markdown sections from :attr:`Metric.markdown` and plots from :attr:`Metric.plots`;
- ``captum-fullgrad evaluate`` derives ``--KEY-n`` (images for a metric that runs on a
  prefix of the images) and ``--metrics`` (which metrics run) from the registry.

A metric yields one or more *scores* (per-image values summarised as a mean with a
bootstrap interval): the localisation metric yields ``pointing_game``,
``relevance_mass``, ... Adding a metric is one file that declares and registers a
:class:`Metric` (every module of ``captum_fullgrad.evaluation`` whose source calls
``register_metric(`` is imported when the registry is first read), plus its test; see
``docs/extending.md``. Such a module should import torch through
:mod:`~captum_fullgrad.evaluation._lazy`, as the built-in ones do: ``captum-fullgrad
evaluate --help`` reads the registry and stays quick only if that loads no torch (a test
of ``tests/test_cli.py`` checks it).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from captum_fullgrad.evaluation.report import EvaluationReport
    from captum_fullgrad.evaluation.settings import EvaluationSettings

__all__ = [
    "Images",
    "Metric",
    "MetricContext",
    "MetricOutput",
    "Plot",
    "Score",
    "get_metric",
    "register_metric",
    "registered_metrics",
    "unregister_metric",
]


@dataclass(frozen=True)
class Score:
    """One summarised quantity of a metric: a key in ``results.json`` and a report row.

    Attributes:
        key: the key in ``results.json`` (``metrics`` and ``results``).
        label: short display label (table headers, plot legends).
        higher_is_better: the direction of the score.
        description: one sentence on what it measures (``results.json`` and the
            rankings section of ``results.md``).
        reference: the paper that defines it.
        headline: shown in the overview table, the rank table, the FullGrad comparison
            and the per-score rankings of ``results.md`` (per-level scores such as
            ``pixel_perturbation_least@5`` are not).
    """

    key: str
    label: str
    higher_is_better: bool
    description: str
    reference: str
    headline: bool = True


@dataclass(frozen=True)
class Images:
    """Which images a metric needs, and how many by default.

    Attributes:
        masks: the metric reads the object masks (localisation).
        subset: the metric runs on the first ``n`` images only (it is costly); ``n`` is
            the setting ``n_<key>`` of :class:`~captum_fullgrad.evaluation.
            EvaluationSettings` and the option ``--<key>-n`` of ``captum-fullgrad
            evaluate``, 0 skips the metric. Otherwise it runs on every image.
        default: images of a subset metric in the published run (``None``: all).
        fast: the same under ``EvaluationSettings.fast()`` / ``--fast``.
    """

    masks: bool = False
    subset: bool = False
    default: Optional[int] = None
    fast: Optional[int] = None


@dataclass(frozen=True)
class Plot:
    """A figure of mean curves, one panel per curve, written as ``<name>.png``.

    Text fields are :meth:`str.format` templates over the run's metric settings
    (``results.json``'s ``meta.settings``), e.g. ``"|fractional {perturbation_output}
    change|"``; ``title`` also gets ``model`` and ``n`` (images of the metric).

    Attributes:
        name: file stem and key of :meth:`EvaluationReport.plot`'s result.
        title: the figure's title.
        caption: the figure's caption in ``results.md``.
        panels: ``(curve, x label, y label, panel title, log x axis)`` per panel;
            ``curve`` names a curve of :attr:`MetricOutput.curves`.
        xticks: names of the x positions (categorical x axis) from the report, or None.
    """

    name: str
    title: str
    caption: str
    panels: Tuple[Tuple[str, str, str, str, bool], ...]
    xticks: Optional[Callable[["EvaluationReport"], Sequence[str]]] = None


@dataclass
class MetricContext:
    """What a metric is computed from: the run's model, images and settings.

    Tensors live on the model's device. ``images``, ``labels`` and ``masks`` are *all*
    the images of the run; a metric with ``Images(subset=True)`` uses the first ``n``
    (:meth:`head`).
    """

    model: nn.Module
    images: Tensor
    labels: Tensor
    masks: Tensor
    n: int
    settings: "EvaluationSettings"
    seed: int
    batch_size: int

    def head(self, tensor: Tensor) -> Tensor:
        """The first :attr:`n` rows of ``tensor`` (the metric's images)."""
        return tensor[: self.n]


@dataclass
class MetricOutput:
    """What :attr:`Metric.compute` returns for one method.

    Attributes:
        values: score key -> per-image values ``(n,)``, for every score the metric
            declared (a score may be left out, e.g. when it does not apply).
        curves: curve name -> ``{"x": [...], "y": [...]}`` mean curves (plots and
            ``results.json``'s ``curves``).
        meta: entries for ``results.json``'s ``meta``; a dict value is merged into the
            entry the metric declared in :attr:`Metric.meta` (e.g. per-method counts),
            anything else replaces it.
    """

    values: Dict[str, Tensor]
    curves: Dict[str, Dict[str, list]] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)


#: ``compute(context, method_name, explain, maps) -> MetricOutput`` for one method:
#: ``explain(model, inputs, target)`` recomputes maps, ``maps`` are the method's maps of
#: all images ``(N, 1, H, W)``.
ComputeFn = Callable[[MetricContext, str, Callable[..., "Tensor"], "Tensor"], MetricOutput]


@dataclass(frozen=True)
class Metric:
    """An evaluation metric as the suite runs it (see the module docstring).

    Attributes:
        key: name of the metric (``subsets`` and ``timings_s`` in ``results.json``;
            ``--metrics``; ``--<key>-n`` and ``n_<key>`` for a subset metric).
        label: display name (progress bar, help texts).
        scores: the :class:`Score` objects it yields, in report order, or a function of
            the settings returning them (for scores that depend on settings, e.g. one
            per removal level).
        compute: :data:`ComputeFn`.
        group: the ``group`` of its scores in ``results.json`` (default: ``key``).
        images: which images it needs (:class:`Images`).
        recomputes_maps: it calls the method again (sanity check, sensitivity) rather
            than only reading the maps; with maps from elsewhere it still needs the
            method.
        order: position in the run and the report (ascending; ties by registration).
        meta: ``results.json`` ``meta`` entries it writes, with their value when it did
            not run.
        plots: the figures of its curves.
        markdown: extra ``results.md`` sections (lines) after the per-score rankings.
        note: an extra sentence of the ``results.md`` settings section, or None.
    """

    key: str
    label: str
    scores: Union[Tuple[Score, ...], Callable[["EvaluationSettings"], Sequence[Score]]]
    compute: ComputeFn
    group: Optional[str] = None
    images: Images = Images()
    recomputes_maps: bool = False
    order: float = 100.0
    meta: Mapping[str, Any] = field(default_factory=dict)
    plots: Tuple[Plot, ...] = ()
    markdown: Optional[Callable[["EvaluationReport"], List[str]]] = None
    note: Optional[Callable[["EvaluationReport"], Optional[str]]] = None

    def score_list(self, settings: "EvaluationSettings") -> List[Score]:
        """The scores for ``settings``, in report order."""
        scores = self.scores(settings) if callable(self.scores) else self.scores
        return list(scores)

    @property
    def group_name(self) -> str:
        return self.group or self.key

    @property
    def setting(self) -> str:
        """``n_<key>``: the settings entry with its number of images (subset metrics)."""
        return f"n_{self.key}"

    @property
    def option(self) -> str:
        """``--<key>-n``: its command-line option (subset metrics)."""
        return f"--{self.key.replace('_', '-')}-n"


_REGISTRY: Dict[str, Metric] = {}
_discovered = False


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Add ``metric`` to the registry and return it (so a module can write
    ``ROAD = register_metric(Metric(...))``).

    Raises:
        ValueError: the key is taken (unless ``replace``), is not an identifier, or a
            score key is already declared by another metric.
    """
    if not metric.key.isidentifier():
        raise ValueError(f"metric key must be an identifier, got {metric.key!r}")
    if metric.key in _REGISTRY and not replace:
        raise ValueError(f"a metric {metric.key!r} is already registered")
    if isinstance(metric.scores, tuple):
        mine = {s.key for s in metric.scores}
        for other in _REGISTRY.values():
            if other.key != metric.key and isinstance(other.scores, tuple):
                taken = mine & {s.key for s in other.scores}
                if taken:
                    raise ValueError(
                        f"score key(s) {', '.join(sorted(taken))} already belong to {other.key!r}"
                    )
    _REGISTRY[metric.key] = metric
    return metric


def unregister_metric(key: str) -> Metric:
    """Remove and return the metric ``key`` (e.g. a test's temporary metric)."""
    try:
        return _REGISTRY.pop(key)
    except KeyError:
        raise KeyError(f"no metric {key!r}; registered: {', '.join(_REGISTRY)}") from None


def _declares_metrics(module: str) -> bool:
    """Whether ``module``'s source calls :func:`register_metric` (True when the source
    cannot be read, e.g. a compiled module: it is imported to be sure)."""
    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return True
    try:
        with open(origin, encoding="utf-8") as handle:
            return "register_metric(" in handle.read()
    except OSError:
        return True


def _discover() -> None:
    """Import once every public module of the evaluation package that declares a metric
    (its source calls :func:`register_metric`), so that a metric declared in a new file
    registers itself without being imported anywhere else. The other modules (the
    runner, the report, the controls) are left alone: reading the registry imports
    neither them nor torch, which the metric modules import on first use
    (:mod:`~captum_fullgrad.evaluation._lazy`), so ``evaluate --help`` stays quick."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import captum_fullgrad.evaluation as package

    for info in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{info.name}"
        if not info.name.startswith("_") and _declares_metrics(name):
            importlib.import_module(name)


def registered_metrics() -> List[Metric]:
    """Every registered metric, in run and report order."""
    _discover()
    ranked = sorted(enumerate(_REGISTRY.values()), key=lambda item: (item[1].order, item[0]))
    return [metric for _, metric in ranked]


def get_metric(key: str) -> Metric:
    """The registered metric ``key``."""
    _discover()
    if key not in _REGISTRY:
        raise KeyError(f"no metric {key!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def per_image(values: Tensor) -> Tensor:
    """Per-image values as a float64 vector (what the report summarises)."""
    import torch

    return values.detach().to(torch.float64).reshape(-1)
