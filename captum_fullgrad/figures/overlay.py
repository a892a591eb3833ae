"""A saliency map blended over its image (:func:`overlay`), unsigned or signed."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ._common import (
    SALIENCY_CMAP,
    SIGNED_CMAP,
    check_alpha,
    check_percentile,
    clean_axes,
    map_2d,
    mark_all_zero,
    signed_scale,
)
from .maps import normalize_maps


def normalize_signed_map(values: Tensor, percentile: float = 100.0) -> Tensor:
    """Scale a signed map to ``[-1, 1]``: divide by the ``percentile``-th percentile of its
    absolute values (its maximum where that is zero) and clip; zero stays zero.

    Args:
        values: a map of any shape (normalised as a whole).
        percentile: in ``(0, 100]``; 100 is division by ``max |m|``.

    Returns:
        Float64 tensor of the same shape in ``[-1, 1]`` (all zeros for an all-zero map).
    """
    percentile = check_percentile(percentile)
    values = values.detach().double()
    scale = signed_scale(values, percentile)
    if scale == 0.0:
        return torch.zeros_like(values)
    return (values / scale).clamp(-1.0, 1.0)


def overlay(
    image: Any,
    saliency: Any,
    *,
    alpha: float = 0.5,
    cmap: Optional[str] = None,
    percentile: float = 99.0,
    signed: Optional[bool] = None,
) -> np.ndarray:
    """Blend a saliency map over its image (pytorch-grad-cam's ``show_cam_on_image``).

    The map is normalised to a colour index ``v`` and coloured with ``cmap``; every pixel is
    then ``(1 - alpha) * image + alpha * cmap(v)``:

    - a non-negative map (``signed=False``): ``v = clip(m / q(m), 0, 1)``, with ``q`` the
      ``percentile``-th percentile of the map (:func:`normalize_maps`; the maximum where
      that is zero); default colour map :data:`SALIENCY_CMAP`.
    - a signed map (``signed=True``, e.g. a term of eq. 1): ``u = clip(m / q(|m|), -1, 1)``
      and ``v = (u + 1) / 2``, so that zero falls in the middle of the diverging default
      colour map :data:`SIGNED_CMAP` (white for ``RdBu_r``) and the sign is kept.

    A map of another size than the image (e.g. a block's bias-Jacobian at its own
    resolution) is resized to the image with bilinear interpolation first.

    Args:
        image: ``(3, H, W)`` / ``(1, H, W)`` tensor or ``(H, W, 3)`` / ``(H, W)`` array, floats
            in [0, 1] or uint8; a grey image is drawn as grey RGB.
        saliency: one map ``(h, w)``, ``(1, h, w)`` or ``(1, 1, h, w)``.
        alpha: weight of the coloured map, in [0, 1] (0: the image alone).
        cmap: Matplotlib colour map name (default by ``signed``, see above).
        percentile: normalisation percentile, in (0, 100].
        signed: treat the map as signed; ``None``: signed exactly when it has a negative value.

    Returns:
        ``(H, W, 3)`` float32 array in [0, 1] (``imshow`` it, or multiply by 255 for a PNG).
    """
    from matplotlib import colormaps

    alpha = check_alpha(alpha)
    percentile = check_percentile(percentile)
    if isinstance(image, Tensor):
        picture = image.detach().cpu()
        if picture.dim() == 3 and picture.shape[0] in (1, 3):
            picture = picture.permute(1, 2, 0)
        array = picture.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(
            "image must be (3, H, W), (1, H, W), (H, W, 3) or (H, W), "
            f"got shape {tuple(np.shape(image))}"
        )
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array
    array = np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    values = map_2d(saliency)
    height, width = array.shape[:2]
    if tuple(values.shape) != (height, width):
        values = torch.nn.functional.interpolate(
            values[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
    if signed is None:
        signed = bool((values < 0).any())
    if signed:
        index = (normalize_signed_map(values, percentile) + 1.0) / 2.0
        colour_map = colormaps[cmap or SIGNED_CMAP]
    else:
        if bool((values < 0).any()):
            raise ValueError("the map has negative values: pass signed=True (or None) to show them")
        index = normalize_maps(values, percentile).double()
        colour_map = colormaps[cmap or SALIENCY_CMAP]
    colours = colour_map(index.numpy())[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * array + alpha * colours, 0.0, 1.0).astype(np.float32)


def show_map(
    ax: Any,
    values: Tensor,
    extent: Any,
    cmap: str,
    *,
    picture: Optional[np.ndarray],
    alpha: float,
    percentile: float,
    signed: bool,
    fontsize: float,
) -> float:
    """Draw one map cell of a figure: blended over ``picture`` when given (:func:`overlay`),
    else on its own (signed: centred at 0 within the symmetric ``percentile`` limit;
    unsigned: :func:`normalize_maps`); marked "all zero" when it is. Returns the signed
    colour limit (1.0 for an unsigned or all-zero map), for a colour bar."""
    if signed:
        limit = signed_scale(values, percentile)
        zero = limit == 0.0
        limit = limit or 1.0
    else:
        limit, zero = 1.0, not bool((values > 0).any())
    if picture is not None:
        shown = overlay(
            picture, values, alpha=alpha, cmap=cmap, percentile=percentile, signed=signed
        )
        ax.imshow(shown, extent=extent, interpolation="nearest")
    elif signed:
        ax.imshow(
            values.float().numpy(),
            extent=extent,
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            interpolation="nearest",
        )
    else:
        shown = normalize_maps(values, percentile)[0].numpy()
        ax.imshow(shown, extent=extent, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    clean_axes(ax)
    if zero:
        mark_all_zero(ax, fontsize)
    return limit
