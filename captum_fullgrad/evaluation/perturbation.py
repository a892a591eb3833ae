#!/usr/bin/env python3
r"""Pixel-perturbation fidelity test of Srinivas & Fleuret (2019), section 5.1.

Srinivas & Fleuret, "Full-Gradient Representation for Neural Network Visualization",
NeurIPS 2019, argue that removing the *most* salient pixels first (Samek et al. 2017)
conflates the effect of the removal with high-frequency artefacts it creates, and
propose the converse test: remove the :math:`k\%` *least* salient pixels, which should
leave the output unchanged if the map is faithful, and report the absolute fractional
output change. Both orders are implemented here.

The deterministic pixel-removal order and the input checks it shares with :mod:`.road`
live in :mod:`._common`. :data:`PIXEL_PERTURBATION` declares the test to the evaluation
suite (the metric registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

from captum_fullgrad.evaluation._lazy import nn, no_grad, torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

from captum_fullgrad.evaluation._common import (
    SeedLike,
    check_percentages,
    format_inputs,
    format_target,
    forward_logits,
    make_generator,
    maps_for,
    percent_to_count,
    removal_ranks,
)
from captum_fullgrad.evaluation.metric import (
    Metric,
    MetricContext,
    MetricOutput,
    Plot,
    Score,
    register_metric,
)
from captum_fullgrad.evaluation.statistics import trapezoid

__all__ = ["PixelPerturbationResult", "pixel_perturbation"]

#: Percentages of pixels removed by default, as on the x-axis of the paper's figure.
DEFAULT_PERCENTAGES = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# --------------------------------------------------------------------------- helpers
def _target_output(logits: Tensor, target: Tensor, output: str) -> Tensor:
    r"""The target class's logit or softmax probability, ``(N,)``."""
    if output == "logit":
        scores = logits
    elif output == "probability":
        scores = torch.softmax(logits, dim=1)
    else:
        raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")
    return scores.gather(1, target[:, None])[:, 0]


# --------------------------------------------------------------------------- metric
@dataclass(frozen=True)
class PixelPerturbationResult:
    r"""Outcome of :func:`pixel_perturbation`.

    Attributes:
        percentages (Tensor): ``(K,)`` float64, the requested percentages of pixels
                    removed (x-axis, in percent of the H*W pixels).
        n_removed (Tensor): ``(K,)`` long, pixels actually removed per percentage.
        changes (Tensor): ``(B, K)`` absolute fractional output change per example and
                    percentage.
        mean_curve (Tensor): ``(K,)`` mean of ``changes`` over examples.
        auc (float): Trapezoid area under ``mean_curve`` over ``percentages``, in units
                    of "percent of pixels x fractional change" (not normalised by the
                    width of the percentage range). Equal to ``auc_per_example.mean()``.
        auc_per_example (Tensor): ``(B,)`` trapezoid area of each example's curve; feed
                    it to :func:`~captum_fullgrad.evaluation.bootstrap_ci`.
        order (str): ``"least"`` or ``"most"``.
        output (str): ``"logit"`` or ``"probability"``.
    """

    percentages: Tensor
    n_removed: Tensor
    changes: Tensor
    mean_curve: Tensor
    auc: float
    auc_per_example: Tensor
    order: str
    output: str


@no_grad
def pixel_perturbation(
    model: nn.Module,
    inputs: Tensor,
    target: Union[int, Sequence[int], Tensor],
    maps: Tensor,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    order: str = "least",
    output: str = "logit",
    baseline: Optional[Union[Tensor, Sequence[float]]] = None,
    seed: SeedLike = 0,
    batch_size: Optional[int] = None,
) -> PixelPerturbationResult:
    r"""Absolute fractional output change after removing the k% least (or most) salient pixels.

    Following Srinivas & Fleuret (2019), section 5.1: for each percentage :math:`k`,
    the :math:`n_k = \lfloor k\,HW/100 + 1/2 \rfloor` pixels with the lowest saliency
    (``order="least"``) or the highest (``order="most"``) are "removed", i.e. all their
    channels are set to the per-channel ``baseline`` colour, giving :math:`x'_k`, and

    .. math::
        \Delta_k(x) = \frac{\lvert f_t(x) - f_t(x'_k) \rvert}{\lvert f_t(x) \rvert},

    where :math:`f_t` is the output for the target class :math:`t`. Interpretation:

    - ``order="least"``: the removed pixels are those the map calls unimportant, so a
      faithful map yields a *small* change. **Lower is better.** This is the variant
      proposed in the paper, as it probes the map where removal artefacts matter least.
    - ``order="most"``: the removed pixels are the important ones, so a faithful map
      yields a *large* change. **Higher is better.**

    Output: ``output="logit"`` (default) uses the pre-softmax score of the target class,
    the quantity FullGrad's completeness property decomposes; ``"probability"`` uses the
    target's softmax probability, which is bounded and avoids the blow-up of the ratio
    when the target logit is close to zero. The target is the class the maps explain
    (pass the predicted class to mirror the paper, which explains the prediction).

    Removed pixels are replaced with ``baseline``, the dataset mean colour; for inputs
    standardised with the dataset mean and std this is zero, the default.

    Ties in the map are broken by a seeded uniformly random order (see
    :func:`removal_ranks`), so the result is deterministic for a given ``seed`` and a
    constant map behaves like random removal.

    Args:
        model (nn.Module): Classifier in eval mode returning logits ``(B, K)``.
        inputs (Tensor): Images ``(B, C, H, W)``; every tensor argument is moved to
                    their device.
        target (int, sequence or Tensor): Target class per example, ``(B,)``, or one int.
        maps (Tensor): Saliency maps ``(B, H, W)`` or ``(B, 1, H, W)``.
        percentages (sequence of float, optional): Percentages of pixels to remove, in
                    (0, 100], strictly increasing. Default: 0.1, 0.25, 0.5, 1, 2.5, 5, 10.
        order (str, optional): ``"least"`` or ``"most"`` salient first. Default: "least".
        output (str, optional): ``"logit"`` or ``"probability"``. Default: "logit".
        baseline (Tensor or sequence, optional): Per-channel replacement colour ``(C,)``
                    in input units. Default: zeros (the mean of standardised data).
        seed (int or torch.Generator, optional): Source of the tie-breaking order.
                    Default: 0.
        batch_size (int, optional): Maximum number of images per forward pass.
                    Default: None (one pass per percentage).

    Returns:
        PixelPerturbationResult: curves, per-example changes and areas.

    Note:
        Where :math:`f_t(x) = 0` the ratio is undefined; the denominator is clamped to
        the smallest positive normal number of the dtype, so such examples show up as
        huge (not NaN) changes. Prefer ``output="probability"`` for models whose target
        logits can be near zero.
    """
    inputs = format_inputs(inputs)
    b, c, h, w = inputs.shape
    maps = maps_for(maps, inputs)
    target = format_target(target, b, inputs.device)
    p = check_percentages(percentages, 100.0, inclusive=True)
    if baseline is None:
        fill = torch.zeros(c, dtype=inputs.dtype, device=inputs.device)
    else:
        fill = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device).flatten()
        if fill.numel() != c:
            raise ValueError(f"baseline must have one value per channel ({c}), got {fill.numel()}")
    fill = fill.view(1, c, 1, 1)

    ranks = removal_ranks(maps, order, make_generator(seed)).view(b, 1, h, w)
    counts = [percent_to_count(float(k), h * w) for k in p]

    reference = _target_output(forward_logits(model, inputs, batch_size), target, output)
    perturbed = []
    # One batched pass per percentage (K is small); the removal mask is a rank threshold.
    for n_k in counts:
        x_k = torch.where(ranks < n_k, fill, inputs)
        perturbed.append(_target_output(forward_logits(model, x_k, batch_size), target, output))
    scores = torch.stack(perturbed, dim=1)  # (B, K)
    denominator = reference.abs().clamp_min(torch.finfo(reference.dtype).tiny)[:, None]
    changes = (reference[:, None] - scores).abs() / denominator

    auc_per_example = trapezoid(changes, p.to(changes.device))
    return PixelPerturbationResult(
        percentages=p,
        n_removed=torch.tensor(counts, dtype=torch.long),
        changes=changes,
        mean_curve=changes.mean(dim=0),
        auc=float(auc_per_example.mean()),
        auc_per_example=auc_per_example,
        order=order,
        output=output,
    )


# --------------------------------------------------------------------------- suite metric
REF_SRINIVAS = (
    "Srinivas & Fleuret, 'Full-gradient representation for neural network visualization', "
    "NeurIPS 2019, sec. 5.1"
)
REF_SAMEK = (
    "Samek et al., 'Evaluating the visualization of what a deep neural network has learned', "
    "IEEE TNNLS 2017"
)
_ORDERS = ("least", "most")


def _level(k: float) -> str:
    return f"{k:g}"


def _perturbation_scores(settings: Any) -> List[Score]:
    output = settings.perturbation_output
    ks = ", ".join(_level(k) for k in settings.perturbation_percentages)
    areas = {
        "least": Score(
            "pixel_perturbation_least_area",
            "Pixel pert., least first (area)",
            False,
            f"absolute fractional change of the true class's {output} after replacing the k % "
            f"least salient pixels by the mean colour, averaged over k = {ks} % "
            "(trapezoid area / width)",
            REF_SRINIVAS,
        ),
        "most": Score(
            "pixel_perturbation_most_area",
            "Pixel pert., most first (area)",
            True,
            "the same, removing the k % most salient pixels first",
            REF_SAMEK,
        ),
    }
    scores = []
    for order in _ORDERS:
        scores.append(areas[order])
        for k in map(_level, settings.perturbation_percentages):
            scores.append(
                Score(
                    f"pixel_perturbation_{order}@{k}",
                    f"Pixel pert., {order} first, k = {k} %",
                    order == "most",
                    f"absolute fractional change of the true class's {output} after replacing "
                    f"the {k} % {order} salient pixels",
                    REF_SRINIVAS if order == "least" else REF_SAMEK,
                    headline=False,
                )
            )
    return scores


def _perturbation(ctx: MetricContext, name: str, explain: Any, maps: Tensor) -> MetricOutput:
    settings = ctx.settings
    fill = ctx.images.mean(dim=(0, 2, 3))  # the images' mean colour
    percentages = tuple(float(k) for k in settings.perturbation_percentages)
    width = percentages[-1] - percentages[0] if len(percentages) > 1 else 1.0
    output = MetricOutput({})
    for order in _ORDERS:
        result = pixel_perturbation(
            ctx.model,
            ctx.images,
            ctx.labels,
            maps,
            percentages=percentages,
            order=order,
            output=settings.perturbation_output,
            baseline=fill,
            seed=ctx.seed,
            batch_size=ctx.batch_size,
        )
        area = result.auc_per_example / width if len(percentages) > 1 else result.changes[:, 0]
        output.values[f"pixel_perturbation_{order}_area"] = area
        for j, k in enumerate(percentages):
            output.values[f"pixel_perturbation_{order}@{_level(k)}"] = result.changes[:, j]
        output.curves[f"pixel_perturbation_{order}"] = {
            "x": list(percentages),
            "y": result.mean_curve.double().cpu().tolist(),
        }
    return output


def _perturbation_tables(report: Any) -> List[str]:
    """``results.md``: one table per removal order, the change at every k."""
    from captum_fullgrad.evaluation.markdown import fmt, method_cell

    lines: List[str] = []
    output = report.meta.get("settings", {}).get("perturbation_output", "logit")
    for order, direction in zip(_ORDERS, ("lower is better", "higher is better")):
        keys = [k for k in report.metrics if k.startswith(f"pixel_perturbation_{order}@")]
        if not keys:
            continue
        n = report.metrics[keys[0]].n
        lines += [
            f"## Pixel perturbation per k, {order} salient first: {direction} (n = {n})",
            "",
            f"Mean absolute fractional change of the true class's {output} after replacing the "
            f"k % {order} salient pixels by the images' mean colour; **bold** is the best per k.",
            "",
        ]
        header = ["method"] + [f"k = {k.partition('@')[2]} %" for k in keys]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        best = {k: report.best(k) for k in keys}
        for method in report.methods:
            cells = [method_cell(report, method)]
            for k in keys:
                value = report.results[method].get(k)
                text = "" if value is None else fmt(value.mean, 4)
                cells.append(f"**{text}**" if method == best[k] else text)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


#: The suite's pixel-perturbation metric: least and most salient pixels first.
PIXEL_PERTURBATION = register_metric(
    Metric(
        key="pixel_perturbation",
        label="pixel perturbation",
        scores=_perturbation_scores,
        compute=_perturbation,
        order=20,
        plots=(
            Plot(
                name="pixel_perturbation",
                title="Pixel perturbation, {model}, n = {n}",
                caption="Pixel perturbation curves (left: least salient removed first, lower is "
                "better; right: most salient first, higher is better)",
                panels=(
                    (
                        "pixel_perturbation_least",
                        "% pixels removed (least salient first)",
                        "|fractional {perturbation_output} change|",
                        "Least salient first (lower is better)",
                        True,
                    ),
                    (
                        "pixel_perturbation_most",
                        "% pixels removed (most salient first)",
                        "|fractional {perturbation_output} change|",
                        "Most salient first (higher is better)",
                        True,
                    ),
                ),
            ),
        ),
        markdown=_perturbation_tables,
    )
)
