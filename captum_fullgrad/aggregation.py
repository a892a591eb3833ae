"""Aggregation: the saliency map of eq. 4, reduced while the backward pass runs.

    S_f(x) = |grad_x f(x) * x| + sum_{l in L} resize( | sum_{c in c_l} f^b(x)_c | )      (eq. 4)

``L`` is the set of spatial layers: bias sources whose output has the input's spatial
layout (channels-first, or channels-last after a permute as in ConvNeXt) with more than one
spatial position. A convolution followed directly by a BatchNorm is one linear block (the
paper's 13 conv-BN blocks of VGG-16-BN): its bias-Jacobians are summed before the absolute
value. ``resize`` is (bi/tri)linear interpolation, ``align_corners=False`` by default.

:class:`MapCollector` receives each source's output gradient from the capture hook and
keeps only what eq. 4 and eq. 1 need: one channel-summed map per block at the layer's own
resolution and one number per example for the completeness sum. No per-layer gradient is
kept, so memory stays near that of a plain input-gradient pass.

The NeurIPS-2019 post-processing of the authors' code is offered for parity: per source
(conv and BN separately), absolute value, per-example min-max rescale over the whole
``C x H x W`` tensor (``(t - min) / (max + 1e-6)``, max taken after subtracting the min),
channel sum, resize with ``align_corners=True``; the input term gets the same rescale.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .capture import BiasSource

__all__ = [
    "MapCollector",
    "POSTPROCESS_MODES",
    "resize_and_sum",
    "input_term_map",
    "interpolation_mode",
]

EQ4 = "eq4"
NEURIPS2019 = "neurips2019"
POSTPROCESS_MODES = (EQ4, NEURIPS2019)
_EPS = 1e-6


_HALF = (torch.float16, torch.bfloat16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision gradients (autocast) are reduced in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def minmax_rescale(t: Tensor) -> Tensor:
    """The authors' per-example rescale: ``(t - min) / (max(t - min) + 1e-6)`` over all but dim 0."""
    flat = t.flatten(1)
    shifted = flat - flat.min(1, keepdim=True).values
    return (shifted / (shifted.max(1, keepdim=True).values + _EPS)).view_as(t)


class MapCollector:
    """Reduce each bias source's gradient into eq. 4's per-block maps and eq. 1's sums.

    Args:
        postprocess: ``"eq4"`` (the seed paper) or ``"neurips2019"`` (the authors' code).
        selected: a predicate choosing the sources that enter the map; every source
            always enters the completeness sum.
    """

    def __init__(self, postprocess: str = EQ4, selected=None) -> None:
        if postprocess not in POSTPROCESS_MODES:
            raise ValueError(
                f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}."
            )
        self.postprocess = postprocess
        self.selected = selected
        # Eq. 4 sums a conv-BN block before the absolute value anyway, so the capture may
        # reduce the pair in one pass over the BatchNorm's gradient (see Capture).
        self.fold_conv_batch_norm = postprocess == EQ4 and selected is None
        self.block_maps: "OrderedDict[str, Tensor]" = OrderedDict()
        self._other_sum: Optional[Tensor] = None  # terms of sources outside the eq4 maps
        self._groups: Optional[List[Tensor]] = None
        self.mapped_sources: List[BiasSource] = []

    def on_source(self, source: BiasSource) -> None:
        pass

    def on_gradient(self, source: BiasSource, grad: Tensor) -> None:
        if _autocast_enabled(grad.device.type):
            with torch.autocast(grad.device.type, enabled=False):
                self._reduce(source, grad)
        else:
            # Entering an autocast context costs more host time than the reduction of a
            # small layer; only do it when a caller's autocast is active.
            self._reduce(source, grad)

    def _reduce(self, source: BiasSource, grad: Tensor) -> None:
        in_map = source.spatial and (self.selected is None or self.selected(source))
        if in_map and self.postprocess == EQ4:
            # One kernel per layer here; the completeness share of these maps (their
            # spatial sums) and the absolute values are taken once per resolution at the end.
            summed = source.channel_summed(grad, include_folded=True)
            if summed.dtype in _HALF:
                summed = summed.float()
            key = source.block
            self.block_maps[key] = (
                self.block_maps[key] + summed if key in self.block_maps else summed
            )
            self._groups = None
        else:
            grad = grad.to(_accumulation_dtype(grad.dtype))
            contribution = source.per_example_sum(grad)
            self._other_sum = (
                contribution if self._other_sum is None else self._other_sum + contribution
            )
            if in_map:
                bias_jacobian = source.bias_jacobian(grad)
                rescaled = minmax_rescale(bias_jacobian.abs()).sum(source.channel_dim)
                # Authors' code: one map per source, no conv-BN grouping.
                self.block_maps[source.name] = rescaled
        if in_map:
            self.mapped_sources.append(source)

    def _grouped(self) -> List[Tensor]:
        """The block maps stacked by resolution: ``[(B, n_blocks, *size), ...]``."""
        if self._groups is None:
            by_size: Dict[Tuple[int, ...], List[Tensor]] = OrderedDict()
            for m in self.block_maps.values():
                by_size.setdefault(tuple(m.shape[1:]), []).append(m)
            self._groups = [
                torch.stack(g, 1) if len(g) > 1 else g[0].unsqueeze(1) for g in by_size.values()
            ]
        return self._groups

    @property
    def bias_sum(self) -> Optional[Tensor]:
        """``sum_g <df/dy_g, c_g>`` per example, ``(B,)``: the bias part of eq. 1."""
        total = self._other_sum
        if self.postprocess == EQ4 and self.block_maps:
            groups = self._grouped()
            flat = (
                groups[0].flatten(1)
                if len(groups) == 1
                else torch.cat([g.flatten(1) for g in groups], 1)
            )
            part = flat.sum(1)
            total = part if total is None else total + part
        return total

    def bias_map(
        self, size: Sequence[int], mode: str, align_corners: Optional[bool]
    ) -> Optional[Tensor]:
        """``sum_l resize(|block map|)`` at the input's spatial ``size``: ``(B, *size)``."""
        if not self.block_maps:
            return None
        if self.postprocess != EQ4:
            return resize_and_sum(list(self.block_maps.values()), size, mode, align_corners)
        # Resizing is linear: the blocks of one resolution are summed (after the absolute
        # value) before the single interpolation of that resolution.
        size = tuple(int(s) for s in size)
        mode = interpolation_mode(mode, len(size))
        if mode in ("nearest", "nearest-exact", "area"):
            align_corners = None
        total: Optional[Tensor] = None
        for stacked in self._grouped():
            summed = stacked.abs().sum(1, keepdim=True)
            if tuple(summed.shape[2:]) != size:
                summed = F.interpolate(summed, size=size, mode=mode, align_corners=align_corners)
            total = summed if total is None else total + summed
        assert total is not None
        return total[:, 0]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def interpolation_mode(mode: str, spatial_rank: int) -> str:
    """Translate ``"bilinear"`` to the linear mode of the input's spatial rank."""
    if mode in ("linear", "bilinear", "trilinear"):
        return {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial_rank]
    if mode == "bicubic" and spatial_rank != 2:
        raise ValueError("bicubic interpolation needs a 2-D spatial input.")
    if mode not in ("nearest", "nearest-exact", "area", "bicubic"):
        raise ValueError(
            f"interpolate_mode must be one of bilinear, linear, trilinear, bicubic, nearest, "
            f"nearest-exact, area; got {mode!r}."
        )
    return mode


def resize_and_sum(
    maps: List[Tensor], size: Sequence[int], mode: str, align_corners: Optional[bool]
) -> Tensor:
    """Resize each ``(B, *s)`` map to ``size`` and add them up; one interpolation per distinct size."""
    size = tuple(int(s) for s in size)
    mode = interpolation_mode(mode, len(size))
    if mode in ("nearest", "nearest-exact", "area"):
        align_corners = None
    by_size: Dict[Tuple[int, ...], List[Tensor]] = OrderedDict()
    for m in maps:
        by_size.setdefault(tuple(m.shape[1:]), []).append(m)
    total: Optional[Tensor] = None
    for shape, group in by_size.items():
        stacked = torch.stack(group, 1) if len(group) > 1 else group[0].unsqueeze(1)
        if shape != size:
            stacked = F.interpolate(stacked, size=size, mode=mode, align_corners=align_corners)
        summed = stacked.sum(1)
        total = summed if total is None else total + summed
    assert total is not None
    return total


def input_term_map(input_gradient: Tensor, inputs: Tensor, postprocess: str) -> Tensor:
    """The input part of eq. 4, per channel: ``|grad_x f * x|`` (or the authors' rescale of it)."""
    product = input_gradient * inputs
    if postprocess == NEURIPS2019:
        return minmax_rescale(product.abs())
    return product.abs()
