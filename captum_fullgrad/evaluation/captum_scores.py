#!/usr/bin/env python3
r"""Captum's infidelity and max-sensitivity for single-channel saliency maps.

Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and Sensitivity of
Explanations", NeurIPS 2019, define

- *infidelity*: :math:`\mathbb E_{I}\big[(I^\top \Phi(f, x) - (f(x) - f(x - I)))^2\big]`,
  how badly the explanation :math:`\Phi` predicts the output change caused by a random
  input perturbation :math:`I` (lower is better);
- *max-sensitivity*: :math:`\max_{\lVert y - x \rVert_\infty \le r}
  \lVert \Phi(f, y) - \Phi(f, x) \rVert / \lVert \Phi(f, x) \rVert`, how much the
  explanation changes under a small input perturbation (lower is better).

Captum implements both (``captum.metrics.infidelity`` and
``captum.metrics.sensitivity_max``); the wrappers below adapt them to this package's
conventions (an explainer ``explain(model, inputs, target) -> (B, 1, H, W)`` map) and make
them deterministic for a seed, since Captum's default perturbations use the global RNG.
:data:`INFIDELITY` and :data:`SENSITIVITY` declare them to the evaluation suite (the
metric registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

from captum_fullgrad.evaluation._lazy import nn, torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

from captum_fullgrad.evaluation._common import Explainer, format_inputs, format_maps, format_target
from captum_fullgrad.evaluation.metric import (
    Images,
    Metric,
    MetricContext,
    MetricOutput,
    Score,
    register_metric,
)

__all__ = ["infidelity_score", "sensitivity_score"]


def _explain_maps(explain: Explainer, model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    r"""Maps ``(B, 1, H, W)`` computed with gradients enabled, detached."""
    with torch.enable_grad():
        maps = explain(model, inputs.detach(), target)
    return format_maps(maps)[:, None]


def infidelity_score(
    model: nn.Module,
    explain: Explainer,
    inputs: Tensor,
    target: Union[int, Sequence[int], Tensor],
    n_perturb_samples: int = 10,
    noise_std: float = 0.1,
    normalize: bool = True,
    seed: int = 0,
    max_examples_per_batch: Optional[int] = None,
    maps: Optional[Tensor] = None,
) -> Tensor:
    r"""Infidelity of Yeh et al. (2019) of single-channel maps, via ``captum.metrics.infidelity``.

    Perturbations are Gaussian, :math:`I \sim \mathcal N(0, \sigma^2 \mathbf 1)` on every
    input element (cf. Yeh et al.'s noisy-baseline perturbations), and the output is the
    target logit. Captum requires the attribution to have the input's shape, so a
    ``(B, 1, H, W)`` map :math:`s` is spread evenly over the :math:`C` channels,
    :math:`\Phi_{c,p} = s_p / C`; then :math:`I^\top\Phi = \sum_p s_p \bar I_p` with
    :math:`\bar I_p` the channel mean of the perturbation at pixel :math:`p`, i.e. the map
    is read as the sensitivity of the output to a grey-level change of each pixel.

    With ``normalize=True`` (the default) the map is rescaled by the optimal scalar
    :math:`\beta` before the error is measured (Captum's ``normalize``, following Yeh et
    al.'s code), which makes the score invariant to the arbitrary scale of saliency
    maps, such as those normalised for display; set it to False only for maps that
    carry the output's units (e.g. complete decompositions).

    Args:
        model (nn.Module): Classifier in eval mode returning logits ``(B, K)``.
        explain (Callable): ``explain(model, inputs, target) -> maps`` ``(B, H, W)`` or
                    ``(B, 1, H, W)``; called once, with gradients enabled.
        inputs (Tensor): Images ``(B, C, H, W)``.
        target (int, sequence or Tensor): Class per example ``(B,)`` or one int.
        n_perturb_samples (int, optional): Perturbations per example. Default: 10.
        noise_std (float, optional): :math:`\sigma`, in input units. Default: 0.1 (a tenth
                    of a standard deviation of standardised inputs).
        normalize (bool, optional): Optimal rescaling of the map. Default: True.
        seed (int, optional): Seed of the perturbations (drawn on the CPU). Default: 0.
        max_examples_per_batch (int, optional): Passed to Captum to bound the number of
                    perturbed images per forward pass. Default: None (all at once).
        maps (Tensor, optional): Precomputed maps for ``inputs``; ``explain`` is then not
                    called.

    Returns:
        Tensor: ``(B,)`` infidelity per example (lower is better).
    """
    inputs = format_inputs(inputs)
    b, c = inputs.shape[:2]
    target_t = format_target(target, b, inputs.device)
    if maps is None:
        maps = _explain_maps(explain, model, inputs, target_t)
    else:
        maps = format_maps(maps)[:, None]
    maps = maps.to(device=inputs.device, dtype=inputs.dtype)
    if maps.shape[-2:] != inputs.shape[-2:] or maps.shape[0] != b:
        raise ValueError(
            f"maps of shape {tuple(maps.shape)} do not match inputs {tuple(inputs.shape)}"
        )
    attributions = (maps / c).expand_as(inputs).contiguous()

    generator = torch.Generator().manual_seed(seed)

    def perturb(x: Tensor) -> Tuple[Tensor, Tensor]:
        # Called by Captum on the inputs repeated n_perturb_samples times (possibly in
        # several chunks); the generator persists across calls, so draws never repeat.
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) * noise_std
        return noise, x - noise

    from captum.metrics import infidelity

    with torch.no_grad():
        scores = infidelity(
            model,
            perturb,
            inputs,
            attributions,
            target=target_t,
            n_perturb_samples=n_perturb_samples,
            max_examples_per_batch=max_examples_per_batch,
            normalize=normalize,
        )
    return scores.reshape(b)


def sensitivity_score(
    model: nn.Module,
    explain: Explainer,
    inputs: Tensor,
    target: Union[int, Sequence[int], Tensor],
    n_perturb_samples: int = 10,
    perturb_radius: float = 0.02,
    norm_ord: str = "fro",
    seed: int = 0,
    max_examples_per_batch: Optional[int] = None,
) -> Tensor:
    r"""Max-sensitivity of Yeh et al. (2019), via ``captum.metrics.sensitivity_max``.

    .. math::
        \mathrm{SENS}_{\max}(x) = \max_{j \le n}
        \frac{\lVert \Phi(f, x + \delta_j) - \Phi(f, x) \rVert}{\lVert \Phi(f, x) \rVert},
        \qquad \delta_j \sim U\big([-r, r]^{C \times H \times W}\big),

    estimated with ``n_perturb_samples`` draws (Captum's default perturbation, but from a
    seeded generator). The map is recomputed for every perturbed input, always for the
    original ``target``. Dividing by :math:`\lVert \Phi(f, x) \rVert` (Captum's
    convention) makes the score invariant to the scale of the maps.

    Captum calls the explanation function under ``torch.no_grad()`` with a *tuple* of
    inputs and expects a tuple back; the adapter re-enables gradients and converts.

    Args:
        model (nn.Module): Classifier in eval mode.
        explain (Callable): ``explain(model, inputs, target) -> maps`` ``(B, H, W)`` or
                    ``(B, 1, H, W)``.
        inputs (Tensor): Images ``(B, C, H, W)``.
        target (int, sequence or Tensor): Class per example ``(B,)`` or one int.
        n_perturb_samples (int, optional): Perturbed inputs per example. Default: 10.
        perturb_radius (float, optional): :math:`r`, the L-infinity radius, in input units.
                    Default: 0.02 (Captum's default).
        norm_ord (str, optional): Norm of the map difference. Default: "fro".
        seed (int, optional): Seed of the perturbations (drawn on the CPU). Default: 0.
        max_examples_per_batch (int, optional): Passed to Captum. Default: None.

    Returns:
        Tensor: ``(B,)`` max-sensitivity per example (lower is better).
    """
    inputs = format_inputs(inputs)
    b = inputs.shape[0]
    target_t = format_target(target, b, inputs.device)
    generator = torch.Generator().manual_seed(seed)

    def perturb(x: Union[Tensor, Tuple[Tensor, ...]], radius: float) -> Tuple[Tensor, ...]:
        xs = x if isinstance(x, tuple) else (x,)
        return tuple(
            t
            + ((torch.rand(t.shape, generator=generator, dtype=t.dtype) * 2 - 1) * radius).to(
                t.device
            )
            for t in xs
        )

    def explanation_func(x: Union[Tensor, Tuple[Tensor, ...]], target: Tensor) -> Tuple[Tensor]:
        x0 = x[0] if isinstance(x, tuple) else x
        return (_explain_maps(explain, model, x0, target),)

    from captum.metrics import sensitivity_max

    scores = sensitivity_max(
        explanation_func,
        inputs,
        perturb_func=perturb,
        perturb_radius=perturb_radius,
        n_perturb_samples=n_perturb_samples,
        norm_ord=norm_ord,
        max_examples_per_batch=max_examples_per_batch,
        target=target_t,
    )
    return scores.reshape(b)


# --------------------------------------------------------------------------- suite metrics
REF_YEH = "Yeh et al., 'On the (in)fidelity and sensitivity of explanations', NeurIPS 2019"


def _captum_batch(n: int, samples: int, batch_size: int, per_example: Optional[int] = None) -> int:
    """``max_examples_per_batch`` for Captum's metrics: about ``batch_size * per_example``
    (default ``samples``) perturbed inputs per sub-batch, within Captum's bounds: at least
    ``n`` (every example in each sub-batch) and at most ``n * samples``."""
    per_example = samples if per_example is None else per_example
    return max(n, min(n * samples, batch_size * per_example))


def _infidelity_noise(ctx: MetricContext) -> float:
    """The perturbations' std in input units: ``infidelity_noise`` x the pixels' std over
    every image of the run."""
    return ctx.settings.infidelity_noise * float(ctx.images.std())


def _infidelity(ctx: MetricContext, name: str, explain: Any, maps: Tensor) -> MetricOutput:
    settings = ctx.settings
    noise = _infidelity_noise(ctx)
    scores = infidelity_score(
        ctx.model,
        explain,
        ctx.head(ctx.images),
        ctx.head(ctx.labels),
        n_perturb_samples=settings.infidelity_samples,
        noise_std=noise,
        normalize=True,
        seed=ctx.seed,
        max_examples_per_batch=_captum_batch(ctx.n, settings.infidelity_samples, ctx.batch_size),
        maps=ctx.head(maps),
    )
    return MetricOutput({"infidelity": scores}, meta={"infidelity_noise_std": noise})


def _infidelity_scores(settings: Any) -> Tuple[Score, ...]:
    return (
        Score(
            "infidelity",
            "Infidelity",
            False,
            "Captum infidelity: squared error of the map's prediction of the logit change "
            f"under Gaussian noise (std {settings.infidelity_noise} x the images' pixel std), "
            "after optimal rescaling",
            REF_YEH,
        ),
    )


def _sensitivity(ctx: MetricContext, name: str, explain: Any, maps: Tensor) -> MetricOutput:
    settings = ctx.settings
    scores = sensitivity_score(
        ctx.model,
        explain,
        ctx.head(ctx.images),
        ctx.head(ctx.labels),
        n_perturb_samples=settings.sensitivity_samples,
        perturb_radius=settings.sensitivity_radius,
        seed=ctx.seed,
        # Perturbed inputs per explanation call: at most batch_size (the sampling
        # methods' peak memory grows with the batch), at least n.
        max_examples_per_batch=_captum_batch(
            ctx.n, settings.sensitivity_samples, ctx.batch_size, 1
        ),
    )
    return MetricOutput({"sensitivity_max": scores})


def _sensitivity_scores(settings: Any) -> Tuple[Score, ...]:
    return (
        Score(
            "sensitivity_max",
            "Max-sensitivity",
            False,
            "Captum sensitivity_max: largest relative change of the map under uniform noise of "
            f"radius {settings.sensitivity_radius} ({settings.sensitivity_samples} draws)",
            REF_YEH,
        ),
    )


#: The suite's infidelity (Captum), from the maps already computed, on the first images.
INFIDELITY = register_metric(
    Metric(
        key="infidelity",
        label="infidelity",
        scores=_infidelity_scores,
        compute=_infidelity,
        group="captum",
        images=Images(subset=True, default=200, fast=None),
        order=50,
        meta={"infidelity_noise_std": None},
    )
)

#: The suite's max-sensitivity (Captum), on the first images: it recomputes every map once
#: per perturbation.
SENSITIVITY = register_metric(
    Metric(
        key="sensitivity",
        label="max-sensitivity",
        scores=_sensitivity_scores,
        compute=_sensitivity,
        group="captum",
        images=Images(subset=True, default=16, fast=4),
        recomputes_maps=True,
        order=60,
    )
)
