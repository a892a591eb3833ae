#!/usr/bin/env python3
r"""Model-parameter randomisation test of Adebayo et al. (2018).

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency Maps",
NeurIPS 2018, model parameter randomisation test: an explanation that is meant to
describe *the model* must change when the model's parameters are replaced by random
ones. In the *cascading* test the layers are randomised one after another from the
output towards the input, and after each step the new map is compared with the original
one; a map that stays similar while most of the network is random is explaining the
input (e.g. its edges), not the model. The *independent* variant randomises one layer
at a time.

:data:`SANITY` declares the check to the evaluation suite (the metric registry).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from captum_fullgrad.evaluation._lazy import nn, no_grad, torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

from captum_fullgrad.evaluation._common import Explainer, format_inputs, format_maps, format_target
from captum_fullgrad.evaluation.metric import (
    Images,
    Metric,
    MetricContext,
    MetricOutput,
    Plot,
    Score,
    register_metric,
)

__all__ = [
    "CascadingRandomisationResult",
    "cascading_randomisation",
    "randomise_layer_",
    "spearman_correlation",
    "ssim",
]


def _norms() -> Tuple[type, ...]:
    """The normalisation layers, whose scales and shifts are randomised around 1 and 0."""
    return (
        nn.modules.batchnorm._BatchNorm,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.modules.instancenorm._InstanceNorm,
    )


# --------------------------------------------------------------------------- similarity
def _average_ranks(x: Tensor) -> Tensor:
    r"""Ranks ``1..N`` of each row of ``x`` ``(B, N)``, tied values sharing their mean rank.

    Vectorised: after sorting, runs of equal values get consecutive group ids, and the
    mean position of each group is obtained with two ``scatter_add`` calls over all rows
    at once (group ids are offset by ``row * N`` so rows do not mix).
    """
    b, n = x.shape
    values, order = x.sort(dim=1)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = starts.cumsum(dim=1) - 1 + torch.arange(b, device=x.device)[:, None] * n
    positions = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(b, n)
    sums = torch.zeros(b * n, dtype=torch.float64, device=x.device)
    sums.scatter_add_(0, group.flatten(), positions.flatten())
    counts = torch.zeros(b * n, dtype=torch.float64, device=x.device)
    counts.scatter_add_(0, group.flatten(), torch.ones_like(positions).flatten())
    mean_rank = (sums / counts.clamp_min(1))[group]
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman_correlation(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman rank correlation between corresponding examples of ``a`` and ``b``.

    Each example (everything after dimension 0) is flattened; :math:`\rho` is the
    Pearson correlation of the ranks, with tied values receiving the average of the
    ranks they span (as ``scipy.stats.spearmanr``):

    .. math::
        \rho(a, b) = \frac{\operatorname{cov}(\mathrm{rk}\,a, \mathrm{rk}\,b)}
        {\sigma(\mathrm{rk}\,a)\,\sigma(\mathrm{rk}\,b)}.

    Args:
        a (Tensor): ``(B, ...)``.
        b (Tensor): same shape as ``a``.

    Returns:
        Tensor: ``(B,)`` float64 in ``[-1, 1]``; NaN where either example is constant
        (the correlation is undefined, as in SciPy).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra = _average_ranks(a.detach().reshape(a.shape[0], -1))
    rb = _average_ranks(b.detach().reshape(b.shape[0], -1).to(a.device))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(dim=1) / denominator
    return torch.where(denominator > 0, rho.clamp(-1.0, 1.0), float("nan"))


def _normalise_abs(maps: Tensor, clip_percentile: float) -> Tensor:
    r"""``|maps|`` ``(B, H, W)`` clipped at their per-map percentile and scaled to ``[0, 1]``.

    This is the absolute-value grayscale rendering common in this literature (e.g. PAIR's
    ``saliency.VisualizeImageGrayscale``): clipping at the 99th percentile keeps a
    single extreme pixel from flattening the rest of the map. A constant map becomes
    all zeros.
    """
    a = maps.abs().to(torch.float64).flatten(1)
    high = torch.quantile(a, clip_percentile / 100.0, dim=1, keepdim=True)
    low = a.amin(dim=1, keepdim=True)
    span = high - low
    scaled = ((a - low) / span.clamp_min(torch.finfo(a.dtype).tiny)).clamp(0.0, 1.0)
    return torch.where(span > 0, scaled, 0.0).view_as(maps)


def ssim(a: Tensor, b: Tensor, clip_percentile: float = 99.0) -> Tensor:
    r"""Structural similarity (Wang et al. 2004) of the absolute-value renderings of two maps.

    Both maps are mapped to ``[0, 1]`` by :func:`_normalise_abs` (absolute value,
    clipped at the per-map ``clip_percentile``-th percentile, min-max scaled) and
    compared with ``skimage.metrics.structural_similarity`` with ``data_range=1`` and
    scikit-image's default 7x7 uniform window (the largest odd window that fits for
    maps smaller than 7 pixels).

    Args:
        a (Tensor): Maps ``(B, H, W)`` or ``(B, 1, H, W)``.
        b (Tensor): Maps of the same shape.
        clip_percentile (float, optional): Percentile at which ``|map|`` saturates.
                    Default: 99.

    Returns:
        Tensor: ``(B,)`` float64 (on the CPU), 1 for identical renderings.
    """
    from skimage.metrics import structural_similarity

    a2 = _normalise_abs(format_maps(a, "a"), clip_percentile).cpu().numpy()
    b2 = _normalise_abs(format_maps(b, "b"), clip_percentile).cpu().numpy()
    if a2.shape != b2.shape:
        raise ValueError(f"shapes differ: {a2.shape} vs {b2.shape}")
    side = min(a2.shape[1:])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise ValueError(f"maps of size {a2.shape[1:]} are too small for SSIM")
    # One call per map pair: SSIM is a windowed image statistic with no batched API in
    # scikit-image; B is small and each call is vectorised over pixels.
    values = [structural_similarity(x, y, data_range=1.0, win_size=win) for x, y in zip(a2, b2)]
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- randomisation
def _parametrised_layers(model: nn.Module) -> List[str]:
    r"""Names of the modules owning parameters or normalisation statistics, in definition order."""
    names = []
    for name, module in model.named_modules():
        own = any(True for _ in module.parameters(recurse=False))
        stats = isinstance(module, _norms()) and getattr(module, "running_mean", None) is not None
        if own or stats:
            names.append(name)
    return names


@no_grad
def randomise_layer_(module: nn.Module, seed: int, bias_std: float = 0.1) -> nn.Module:
    r"""Replace the parameters (not those of submodules) of ``module`` by random ones, in place.

    - Normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm): affine weight
      :math:`U(0.5, 1.5)`, affine bias :math:`\mathcal N(0, 0.1^2)`, running mean
      :math:`\mathcal N(0, 0.1^2)`, running variance :math:`U(0.5, 1.5)`. They are
      *randomised*, not reset: a reset (weight 1, bias 0, mean 0, variance 1) turns every
      BatchNorm's effective bias :math:`\beta - \gamma\mu/\sqrt{\sigma^2+\epsilon}` into
      zero, which silently removes the bias terms that FullGrad attributes and would make
      a FullGrad map look more "model dependent" than it is.
    - Modules with ``reset_parameters`` (Conv, Linear, ...): the layer's own default
      initialisation (e.g. Kaiming-uniform weights), then biases redrawn from
      :math:`\mathcal N(0, \text{bias\_std}^2)` so that they are not zero either.
    - Any other parameter: :math:`\mathcal N(0, s^2)` with :math:`s` the standard
      deviation of the current values (0.1 if undefined or zero), preserving the scale.

    Randomness comes only from ``seed``: default initialisations run on a CPU copy of
    the module with the CPU generator temporarily reseeded and then restored, so the
    caller's global random state is untouched and the values do not depend on the
    module's device.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(t: Tensor, std: float) -> Tensor:
        return (torch.randn(t.shape, generator=generator, dtype=torch.float64) * std).to(t)

    def uniform(t: Tensor, low: float, high: float) -> Tensor:
        draw = torch.rand(t.shape, generator=generator, dtype=torch.float64)
        return (low + (high - low) * draw).to(t)

    if isinstance(module, _norms()):
        # Scales drawn around 1, shifts around 0; the order fixes the draws of the generator.
        for name, kind in (
            ("weight", "scale"),
            ("bias", "normal"),
            ("running_mean", "normal"),
            ("running_var", "scale"),
        ):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_(uniform(t, 0.5, 1.5) if kind == "scale" else normal(t, bias_std))
        return module

    own: Dict[str, nn.Parameter] = dict(module.named_parameters(recurse=False))
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        clone = copy.deepcopy(module).cpu()
        state = torch.get_rng_state()
        try:
            torch.random.default_generator.manual_seed(seed)
            # The clone's own reset (``reset`` above is bound to the original module).
            reset_clone: Callable[[], Any] = getattr(clone, "reset_parameters", reset)
            reset_clone()
        finally:
            torch.set_rng_state(state)
        fresh = dict(clone.named_parameters(recurse=False))
        for name, param in own.items():
            param.copy_(fresh[name])
            if name == "bias":
                param.copy_(normal(param, bias_std))
        return module

    for param in own.values():
        std = float(param.detach().double().std()) if param.numel() > 1 else 0.0
        param.copy_(normal(param, std if std > 0 else bias_std))
    return module


# --------------------------------------------------------------------------- the test
@dataclass(frozen=True)
class CascadingRandomisationResult:
    r"""Outcome of :func:`cascading_randomisation`.

    Step 0 re-runs the explainer on an *unmodified* copy of the model, so its
    similarities are 1 for a deterministic explainer (a useful check of the set-up);
    step :math:`i \ge 1` has the first :math:`i` layers of ``steps`` randomised
    (cascading mode) or only layer ``steps[i]`` (independent mode).

    Attributes:
        steps (list[str]): ``S + 1`` labels: ``"original"``, then the layer names.
        spearman_abs (Tensor): ``(S + 1, B)`` Spearman correlation of ``|map|`` with the
                    original ``|map|`` (the "ABS" curve of Adebayo et al.). All
                    similarities are float64 tensors on the CPU.
        spearman (Tensor): ``(S + 1, B)`` Spearman correlation of the signed maps
                    ("No ABS").
        ssim (Tensor): ``(S + 1, B)`` SSIM of the normalised absolute maps (see
                    :func:`ssim`).
        original_maps (Tensor): ``(B, H, W)`` maps of the caller's model.
        maps (Tensor or None): ``(S + 1, B, H, W)`` maps at each step if requested.
        mode (str): ``"cascading"`` or ``"independent"``.
    """

    steps: List[str]
    spearman_abs: Tensor
    spearman: Tensor
    ssim: Tensor
    original_maps: Tensor
    maps: Optional[Tensor]
    mode: str


def _explain(explain: Explainer, model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    # Attribution methods differentiate the model, whatever the caller's grad mode.
    with torch.enable_grad():
        maps = explain(model, inputs, target)
    return format_maps(maps).detach()


def cascading_randomisation(
    model: nn.Module,
    explain: Explainer,
    inputs: Tensor,
    target: Union[int, Sequence[int], Tensor],
    seed: int = 0,
    layers: Optional[Sequence[str]] = None,
    mode: str = "cascading",
    return_maps: bool = False,
    clip_percentile: float = 99.0,
) -> CascadingRandomisationResult:
    r"""Cascading model-parameter randomisation test of Adebayo et al. (2018).

    Let :math:`s^{(0)}` be the map of the trained model and :math:`s^{(i)}` the map once
    layers :math:`\ell_1, \dots, \ell_i` have been randomised (cascading mode, from the
    output towards the input). For every step and example we report the Spearman rank
    correlation of :math:`|s^{(i)}|` and :math:`|s^{(0)}|` (and of the signed maps) and
    the SSIM of their normalised absolute renderings. A method that passes the check
    shows similarities that fall as soon as the top layers are random; similarities
    that stay high show a map that does not depend on the learned parameters.

    Layers: by default every module that owns parameters (or normalisation running
    statistics), in *reverse order of definition* (``model.named_modules()``), which is
    output-to-input for sequentially defined networks; pass ``layers`` explicitly (in
    the order they are to be randomised) when the definition order differs from the
    forward order. Each layer is randomised by :func:`randomise_layer_` with a seed
    derived from ``seed`` and its position, so the whole test is deterministic.

    The caller's ``model`` is never modified: the test runs on a deep copy.

    Args:
        model (nn.Module): Trained classifier in eval mode.
        explain (Callable): ``explain(model, inputs, target) -> maps`` of shape
                    ``(B, H, W)`` or ``(B, 1, H, W)``; called with gradients enabled.
                    Channel pooling of multi-channel attributions is the explainer's job.
        inputs (Tensor): Images ``(B, C, H, W)``.
        target (int, sequence or Tensor): Class per example ``(B,)`` or one int; the same
                    target is explained at every step, so that a change of the map is
                    not a change of the explained class.
        seed (int, optional): Seed of the randomisation. Default: 0.
        layers (sequence of str, optional): Module names to randomise, first to last.
                    Default: all parametrised modules, last defined first.
        mode (str, optional): ``"cascading"`` (cumulative, the default) or
                    ``"independent"`` (one layer at a time on a fresh copy).
        return_maps (bool, optional): Keep the maps of every step. Default: False.
        clip_percentile (float, optional): Saturation percentile of the SSIM rendering.
                    Default: 99.

    Returns:
        CascadingRandomisationResult: similarities per step and example.
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    inputs = format_inputs(inputs)
    target = format_target(target, inputs.shape[0], inputs.device)
    available = _parametrised_layers(model)
    if layers is None:
        layer_names = list(reversed(available))
    else:
        layer_names = list(layers)
        unknown = [name for name in layer_names if name not in set(available)]
        if unknown:
            raise ValueError(f"no parametrised module named {unknown}; available: {available}")
    if not layer_names:
        raise ValueError("the model has no parametrised layer to randomise")
    layer_seeds = torch.randint(
        0, 2**62, (len(layer_names),), generator=torch.Generator().manual_seed(seed)
    ).tolist()

    original = _explain(explain, model, inputs, target)
    working = copy.deepcopy(model)
    step_maps = [_explain(explain, working, inputs, target)]
    for name, layer_seed in zip(layer_names, layer_seeds):
        if mode == "independent":
            working = copy.deepcopy(model)
        randomise_layer_(working.get_submodule(name), layer_seed)
        step_maps.append(_explain(explain, working, inputs, target))
    del working

    stacked = torch.stack(step_maps)  # (S + 1, B, H, W)
    s1, b = stacked.shape[:2]
    flat = stacked.reshape(s1 * b, -1)
    reference = original.reshape(1, b, -1).expand(s1, b, -1).reshape(s1 * b, -1)
    spearman_abs = spearman_correlation(flat.abs(), reference.abs()).view(s1, b)
    spearman_signed = spearman_correlation(flat, reference).view(s1, b)
    ssim_values = ssim(
        stacked.reshape(s1 * b, *stacked.shape[2:]),
        original.expand(s1, *original.shape).reshape(s1 * b, *original.shape[1:]),
        clip_percentile=clip_percentile,
    ).view(s1, b)
    return CascadingRandomisationResult(
        steps=["original"] + layer_names,
        spearman_abs=spearman_abs.cpu(),
        spearman=spearman_signed.cpu(),
        ssim=ssim_values,
        original_maps=original,
        maps=stacked if return_maps else None,
        mode=mode,
    )


# --------------------------------------------------------------------------- suite metric
REF_ADEBAYO = "Adebayo et al., 'Sanity checks for saliency maps', NeurIPS 2018"


def _sanity(ctx: MetricContext, name: str, explain: Any, maps: Tensor) -> MetricOutput:
    layers = list(ctx.settings.sanity_layers) if ctx.settings.sanity_layers else None
    result = cascading_randomisation(
        ctx.model, explain, ctx.head(ctx.images), ctx.head(ctx.labels), seed=ctx.seed, layers=layers
    )
    rho = result.spearman_abs.clone()
    undefined = torch.isnan(rho)
    rho[undefined] = 0.0  # a constant map has no rank order left: no correlation
    steps = list(range(len(result.steps)))
    return MetricOutput(
        values={"sanity_spearman_abs": rho[1:].mean(0), "sanity_ssim": result.ssim[1:].mean(0)},
        curves={
            "sanity_spearman_abs": {"x": steps, "y": rho.mean(1).tolist()},
            "sanity_ssim": {"x": steps, "y": result.ssim.mean(1).tolist()},
        },
        meta={
            "sanity_layers": list(result.steps[1:]),
            "sanity_undefined": {name: int(undefined[1:].sum())},
        },
    )


def _sanity_note(report: Any) -> Optional[str]:
    """``results.md``: the layers in the order they were randomised."""
    meta = report.meta
    if not meta.get("sanity_layers"):
        return None
    note = (
        "Sanity check: layers randomised in this order (cascading, output first): "
        + ", ".join(f"`{x}`" for x in meta["sanity_layers"])
        + "."
    )
    undefined = {m: c for m, c in meta.get("sanity_undefined", {}).items() if c}
    if undefined:
        note += (
            " Spearman correlations that were undefined (a constant map) were counted as 0: "
            + ", ".join(f"`{m}` {c}" for m, c in undefined.items())
            + "."
        )
    return note


#: The suite's sanity check: cascading randomisation, output layer first, on the first
#: images (it recomputes every map once per randomised layer).
SANITY = register_metric(
    Metric(
        key="sanity",
        label="sanity check (cascading randomisation)",
        scores=(
            Score(
                "sanity_spearman_abs",
                "Sanity: Spearman (abs.)",
                False,
                "Spearman correlation of |map| with the trained model's |map|, averaged over "
                "the cascading randomisation steps (output layer first)",
                REF_ADEBAYO,
            ),
            Score(
                "sanity_ssim",
                "Sanity: SSIM",
                False,
                "SSIM of the normalised |map| with the trained model's, averaged over the "
                "randomisation steps",
                REF_ADEBAYO,
            ),
        ),
        compute=_sanity,
        images=Images(subset=True, default=16, fast=4),
        recomputes_maps=True,
        order=40,
        meta={"sanity_layers": [], "sanity_undefined": {}},
        plots=(
            Plot(
                name="sanity",
                title="Cascading randomisation, {model}, n = {n}",
                caption="Cascading randomisation (similarity to the trained model's map; lower "
                "is better once layers are randomised)",
                panels=(
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
                ),
                xticks=lambda report: ["original"] + list(report.meta.get("sanity_layers", [])),
            ),
        ),
        note=_sanity_note,
    )
)
