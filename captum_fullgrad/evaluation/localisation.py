#!/usr/bin/env python3
r"""Localisation metrics: does a saliency map point at the annotated object?

All functions take saliency maps of shape ``(B, H, W)`` or ``(B, 1, H, W)`` (larger =
more important) and binary object masks of the same spatial size, ``(B, H, W)`` or
``(B, 1, H, W)`` (bool, or 0/1 numbers), and return one score per example. They only
read the maps, so they run on whatever device the maps live on.

- :func:`pointing_game`: Zhang et al., "Top-down Neural Attention by Excitation
  Backprop", ECCV 2016 / IJCV 2018.
- :func:`relevance_mass` and :func:`relevance_rank`: Arras, Osman & Samek,
  "CLEVR-XAI: A benchmark dataset for the ground truth evaluation of neural network
  explanations", Information Fusion 81 (2022).

:data:`LOCALISATION` declares them to the evaluation suite (the metric registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Tuple

from captum_fullgrad.evaluation._lazy import F, torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

from captum_fullgrad.evaluation._common import format_maps
from captum_fullgrad.evaluation.metric import (
    Images,
    Metric,
    MetricContext,
    MetricOutput,
    Score,
    register_metric,
)

__all__ = ["pointing_game", "relevance_mass", "relevance_rank"]


def _format_masks(masks: Tensor, maps: Tensor) -> Tensor:
    r"""Return masks as a bool ``(B, H, W)`` tensor on ``maps``' device, matching ``maps``."""
    masks = torch.as_tensor(masks)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} do not match maps of shape"
            f" {tuple(maps.shape)} (after removing a singleton channel dimension);"
            " resize the maps to the mask resolution first"
        )
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must be boolean or contain only 0 and 1")
        masks = masks != 0
    return masks.to(maps.device)


def _disk_dilate(masks: Tensor, radius: int) -> Tensor:
    r"""Dilate bool masks ``(B, H, W)`` by a Euclidean disk of ``radius`` pixels.

    A pixel belongs to the result iff some mask pixel lies within Euclidean distance
    ``radius`` of it. Implemented as one convolution with the disk's indicator: the
    convolution counts mask pixels inside the disk, which are small integers and hence
    exact in floating point.
    """
    if radius == 0:
        return masks
    offsets = torch.arange(-radius, radius + 1, device=masks.device)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2
    kernel = disk.to(torch.float32)[None, None]
    counts = F.conv2d(masks[:, None].to(torch.float32), kernel, padding=radius)
    return counts[:, 0] > 0.5


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 3) -> Tensor:
    r"""Pointing game of Zhang et al. (2016): is the map's maximum on the object?

    A hit is scored when the maximum of the saliency map lies inside the object mask
    dilated by ``tolerance`` pixels (Euclidean distance):

    .. math::
        \mathrm{hit}(s, M) = \big[\,\forall p \in \arg\max_q s_q :\;
        \min_{m \in M} \lVert p - m \rVert_2 \le \tau \,\big].

    Ties: *every* pixel that attains the maximum must lie in the dilated mask. Zhang et
    al. take "the maximum point" as if it were unique; with ties, picking the first
    maximum in raster order would make a constant map score a hit whenever the object
    touches the top-left corner, and counting any maximal pixel would make it score a hit
    on every image. Under the all-maxima rule a constant (uninformative) map hits only
    if the dilated mask covers the whole image. Ties are exact floating-point equality.

    Tolerance: Zhang et al. use 15 pixels on PASCAL VOC / COCO images, whose sides are
    roughly 300-500 pixels, i.e. about 3-5 % of the image side. Our images are 64 pixels
    wide, so the default is 3 pixels (4.7 % of the side); pass ``tolerance=15`` to
    reproduce the original setting on full-resolution images.

    Args:
        maps (Tensor): Saliency maps ``(B, H, W)`` or ``(B, 1, H, W)``.
        masks (Tensor): Object masks ``(B, H, W)`` or ``(B, 1, H, W)``, bool or 0/1.
                    Every mask must be non-empty.
        tolerance (int, optional): Dilation radius in pixels, >= 0. Default: 3.

    Returns:
        Tensor: ``(B,)`` bool, ``True`` for a hit. The pointing-game accuracy of a set of
        images is the mean of the hits (Zhang et al. average it per category first).

    Raises:
        ValueError: on an empty mask (the pointing game is undefined without an object;
                    Zhang et al. only score images that contain the category).
    """
    if tolerance < 0 or int(tolerance) != tolerance:
        raise ValueError(f"tolerance must be a non-negative integer, got {tolerance}")
    maps = format_maps(maps)
    masks = _format_masks(masks, maps)
    empty = ~masks.flatten(1).any(dim=1)
    if bool(empty.any()):
        examples = empty.nonzero().flatten().tolist()
        raise ValueError(f"pointing game undefined for empty masks (examples {examples})")
    region = _disk_dilate(masks, int(tolerance))
    is_max = maps == maps.flatten(1).amax(dim=1)[:, None, None]
    return ~(is_max & ~region).flatten(1).any(dim=1)


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Relevance mass accuracy of Arras et al. (2022): share of positive relevance on the object.

    .. math::
        \mathrm{mass}(s, M) = \frac{\sum_{p \in M} \max(s_p, 0)}{\sum_{p} \max(s_p, 0)}
        \in [0, 1].

    As in CLEVR-XAI only positive relevance counts (negative values are evidence
    *against* the class and would otherwise cancel mass inside the mask). A map with no
    positive value has no mass to place; it scores 0 rather than NaN so that such maps
    are penalised, not dropped, when averaging.

    Args:
        maps (Tensor): Saliency maps ``(B, H, W)`` or ``(B, 1, H, W)``.
        masks (Tensor): Object masks ``(B, H, W)`` or ``(B, 1, H, W)``, bool or 0/1.

    Returns:
        Tensor: ``(B,)`` in ``[0, 1]``, in the maps' floating dtype; 1 for a map that is
        positive only inside the mask (e.g. the mask itself).
    """
    maps = format_maps(maps)
    masks = _format_masks(masks, maps)
    positive = maps.clamp_min(0).flatten(1)
    inside = (positive * masks.flatten(1)).sum(dim=1)
    total = positive.sum(dim=1)
    # where(total > 0) keeps the division finite; the masked-out quotient is discarded.
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)


def relevance_rank(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Relevance rank accuracy of Arras et al. (2022): share of the top-K pixels on the object.

    With :math:`K = |M|` the mask size and :math:`P_K` the :math:`K` pixels of highest
    relevance,

    .. math::
        \mathrm{rank}(s, M) = \frac{|P_K \cap M|}{K} \in [0, 1].

    Ties at the :math:`K`-th value are resolved in expectation over a uniformly random
    order of the tied pixels: every pixel tied with the :math:`K`-th largest value
    counts with weight :math:`(K - n_>)/n_=`, where :math:`n_>` is the number of
    strictly larger pixels and :math:`n_=` the number of tied ones. The result is
    deterministic, and an uninformative constant map scores the chance level
    :math:`K / (HW)` instead of an arbitrary raster-order value.

    Args:
        maps (Tensor): Saliency maps ``(B, H, W)`` or ``(B, 1, H, W)``.
        masks (Tensor): Object masks ``(B, H, W)`` or ``(B, 1, H, W)``, bool or 0/1.
                    Every mask must be non-empty.

    Returns:
        Tensor: ``(B,)`` in ``[0, 1]``, in the maps' floating dtype.
    """
    maps = format_maps(maps)
    masks = _format_masks(masks, maps)
    flat = maps.flatten(1)
    inside = masks.flatten(1)
    k = inside.sum(dim=1)
    if bool((k == 0).any()):
        raise ValueError("relevance rank undefined for empty masks")
    ordered = flat.sort(dim=1, descending=True).values
    kth = ordered.gather(1, (k - 1)[:, None])  # value of the K-th largest pixel
    greater = flat > kth
    tied = flat == kth
    n_greater = greater.sum(dim=1)
    n_tied = tied.sum(dim=1)  # >= 1: the K-th pixel itself
    share_of_tied = (k - n_greater).to(flat.dtype) / n_tied.to(flat.dtype)
    hits = (greater & inside).sum(dim=1).to(flat.dtype) + share_of_tied * (
        (tied & inside).sum(dim=1).to(flat.dtype)
    )
    return hits / k.to(flat.dtype)


# --------------------------------------------------------------------------- suite metric
REF_POINTING = "Zhang et al., 'Top-down neural attention by excitation backprop', ECCV 2016"
REF_ARRAS = "Arras, Osman & Samek, 'CLEVR-XAI', Information Fusion 81, 2022"


def _localisation_scores(settings: Any) -> Tuple[Score, ...]:
    tolerance = settings.pointing_tolerance
    return (
        Score(
            "pointing_game",
            "Pointing game",
            True,
            f"hit rate: every maximum of the map lies on the object mask dilated by {tolerance} px",
            REF_POINTING,
        ),
        Score(
            "pointing_game_0px",
            "Pointing game (0 px)",
            True,
            "hit rate with no tolerance: every maximum of the map lies on the object mask itself",
            REF_POINTING,
        ),
        Score(
            "relevance_mass",
            "Relevance mass",
            True,
            "share of the map's total mass inside the object mask",
            REF_ARRAS,
        ),
        Score(
            "relevance_rank",
            "Relevance rank",
            True,
            "share of the |mask| most salient pixels inside the object mask",
            REF_ARRAS,
        ),
    )


def _localisation(ctx: MetricContext, name: str, explain: Any, maps: Tensor) -> MetricOutput:
    tolerance = ctx.settings.pointing_tolerance
    return MetricOutput(
        {
            "pointing_game": pointing_game(maps, ctx.masks, tolerance).float(),
            "pointing_game_0px": pointing_game(maps, ctx.masks, 0).float(),
            "relevance_mass": relevance_mass(maps, ctx.masks),
            "relevance_rank": relevance_rank(maps, ctx.masks),
        }
    )


#: The suite's localisation metric: the pointing game (with and without tolerance),
#: relevance mass and relevance rank of every map against its object mask.
LOCALISATION = register_metric(
    Metric(
        key="localisation",
        label="localisation",
        scores=_localisation_scores,
        compute=_localisation,
        images=Images(masks=True),
        order=10,
    )
)
