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

import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .capture import BiasSource

__all__ = [
    "MapCollector",
    "MapLayout",
    "POSTPROCESS_MODES",
    "resize_and_sum",
    "input_term_map",
    "interpolation_mode",
    "area_split",
    "signed_bias_attribution",
]

EQ4 = "eq4"
NEURIPS2019 = "neurips2019"
SIGNED = "signed"
POSTPROCESS_MODES = (EQ4, NEURIPS2019, SIGNED)
_EPS = 1e-6


_HALF = (torch.float16, torch.bfloat16)

# Block maps of fewer bytes in all than this are not reserved (MapCollector.reserve): the
# reservation costs about 0.1 ms of host time per call (a batch-1 call of a small network
# takes a few milliseconds), and maps that small matter little to the allocator.
_RESERVED_BYTES = 1 << 20

# What :meth:`MapCollector.reserve` allocates: per group of block maps, their shape
# ``(B, *spatial)``, dtype, device and the blocks' keys.
MapLayout = Tuple[Tuple[Tuple[int, ...], torch.dtype, torch.device, Tuple[str, ...]], ...]


def minmax_rescale(t: Tensor) -> Tensor:
    """The authors' per-example rescale ``(t - min) / (max(t - min) + 1e-6)`` (all but dim 0)."""
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

    def __init__(
        self, postprocess: str = EQ4, selected: Optional[Callable[[BiasSource], bool]] = None
    ) -> None:
        if postprocess not in POSTPROCESS_MODES:
            raise ValueError(
                f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}."
            )
        if postprocess == SIGNED:
            # The signed attribution reads eq. 4's signed block maps, before any absolute
            # value (see signed_bias_attribution).
            postprocess = EQ4
        self.postprocess = postprocess
        self.selected = selected
        # Eq. 4 sums a conv-BN block before the absolute value anyway, so the capture may
        # reduce the pair in one pass over the BatchNorm's gradient (see Capture).
        self.fold_conv_batch_norm = postprocess == EQ4 and selected is None
        self.block_maps: "OrderedDict[str, Tensor]" = OrderedDict()
        self._other_sum: Optional[Tensor] = None  # terms of sources outside the eq4 maps
        self._groups: Optional[List[Tensor]] = None
        self.mapped_sources: List[BiasSource] = []
        # Memory reserved for the block maps before the forward pass (:meth:`reserve`):
        # per block, its slot; per resolution, the buffer that holds its slots.
        self._slots: Dict[str, Tensor] = {}
        self._buffers: List[Tuple[Tensor, Tuple[str, ...]]] = []
        self._reserved: Optional[MapLayout] = None
        self._in_slots = 0  # blocks whose map went to their slot
        self._elsewhere = False  # a block's map that did not
        self._misfit = False  # a block's map that did not fit the slot it had

    def layout(self) -> MapLayout:
        """The block maps this call made, for :meth:`reserve` of a later call: per map
        shape, dtype and device, the blocks' keys (eq. 4 maps only)."""
        if self.postprocess != EQ4:
            return ()
        reserved = self._reserved
        if reserved is not None:
            if not self._buffers:
                return reserved  # too small to reserve: a layout that changed does not matter
            if self._misfit:
                # A map that did not fit its slot (half-precision gradients under autocast,
                # whose maps are kept in float32): the next reservation would not fit
                # either, so no more is made for this plan.
                return ()
            if not self._elsewhere and self._in_slots == len(self._slots):
                return reserved  # the reservation held every map, and nothing else came
        groups: Dict[Tuple[Tuple[int, ...], torch.dtype, torch.device], List[str]] = {}
        for key, block_map in self.block_maps.items():
            group = (tuple(block_map.shape), block_map.dtype, block_map.device)
            groups.setdefault(group, []).append(key)
        return tuple((*group, tuple(keys)) for group, keys in groups.items())

    def reserve(self, layout: MapLayout) -> None:
        """Allocate the block maps of ``layout`` (a :meth:`layout` of an earlier call with
        the same plan) now, before the forward pass.

        On the CPU the maps are the only tensors this collector keeps while the backward
        pass runs. Allocated one by one during it, dozens of maps of a few hundred
        kilobytes land in the memory that the pass frees, split it, and the C allocator
        takes fresh pages for the next full-size gradient (docs/benchmarks.md). Reserved
        here, one buffer per resolution, they need no memory during the pass; the channel
        sums are written into their slots, and the buffer is the per-resolution stack that
        eq. 4 reads. A block that does not fit its slot (another shape or dtype, gradient
        recording on) or has none is kept as before; a slot that no gradient reaches is
        zero.
        """
        if self.postprocess != EQ4 or self.block_maps or self._buffers:
            return
        self._reserved = layout
        total = 0
        for shape, dtype, _, keys in layout:
            total += math.prod(shape) * len(keys) * dtype.itemsize
        if total < _RESERVED_BYTES:
            return  # small maps: the reservation's host time would be all it changed
        for shape, dtype, device, keys in layout:
            # Block-major: each slot is contiguous, as the reductions' ``out`` needs.
            buffer = torch.empty((len(keys), *shape), dtype=dtype, device=device)
            self._slots.update(zip(keys, buffer.unbind(0)))
            self._buffers.append((buffer, keys))
        self._reserved = layout

    # The replay need not call on_source per step: this collector reads nothing there.
    wants_sources = False

    def on_source(self, source: BiasSource) -> None:
        pass

    def on_term(self, per_example: Tensor) -> None:
        """Add terms of eq. 1 that belong to no map, ``(B,)`` (a replay's regions: see
        :class:`captum_fullgrad.replay.CapturePlan`)."""
        self._other_sum = per_example if self._other_sum is None else self._other_sum + per_example

    def on_gradient(self, source: BiasSource, grad: Tensor) -> None:
        # Entering an autocast context costs more host time than the reduction of a small
        # layer, and asking whether one is active for the gradient's device costs several
        # microseconds per layer: ask first whether any is (one call into C).
        if _any_autocast_enabled() and _autocast_enabled(grad.device.type):
            with torch.autocast(grad.device.type, enabled=False):
                self._reduce(source, grad)
        else:
            self._reduce(source, grad)

    def on_gradients(self, pairs: Sequence[Tuple[BiasSource, Tensor]]) -> None:
        """Several sources' gradients at once (the small layers a replay captured): the same
        as one :meth:`on_gradient` per pair, with the autocast check made once.

        One matrix product per resolution over the concatenated gradients was tried here
        and measured slower than a matrix-vector product per layer, at batch 1 on one
        thread (host time) as at batch 4 (the concatenation copies every gradient once
        more): see docs/benchmarks.md.
        """
        if not pairs:
            return
        if _any_autocast_enabled() and _autocast_enabled(pairs[0][1].device.type):
            with torch.autocast(pairs[0][1].device.type, enabled=False):
                self._reduce_captured(pairs)
        else:
            self._reduce_captured(pairs)

    def _reduce_captured(self, pairs: Sequence[Tuple[BiasSource, Tensor]]) -> None:
        # Sources outside the maps whose terms are plain dot products per example (the
        # biases and gates of squeeze-excitation blocks, the classifier: dozens per call
        # in an EfficientNet) enter eq. 1's sum through one product of concatenated rows
        # rather than two kernels and a Python path each.
        rows: Dict[Tuple[torch.device, torch.dtype], Tuple[List[Tensor], List[Tensor]]] = {}
        for source, grad in pairs:
            row = None if source.spatial else _dot_row(source, grad)
            if row is None:
                self._reduce(source, grad)
                continue
            grads, intercepts = rows.setdefault((grad.device, grad.dtype), ([], []))
            grads.append(row[0])
            intercepts.append(row[1])
        for grads, intercepts in rows.values():
            if len(grads) == 1:
                contribution = torch.linalg.vecdot(grads[0], intercepts[0])
            else:
                contribution = torch.linalg.vecdot(torch.cat(grads, 1), torch.cat(intercepts, 1))
            self._other_sum = (
                contribution if self._other_sum is None else self._other_sum + contribution
            )

    def _reduce(self, source: BiasSource, grad: Tensor) -> None:
        in_map = source.spatial and (self.selected is None or self.selected(source))
        if in_map and self.postprocess == EQ4:
            # One kernel per layer here; the completeness share of these maps (their
            # spatial sums) and the absolute values are taken once per resolution at the end.
            key = source.block
            block_maps = self.block_maps
            previous = block_maps.get(key)
            slot = self._slots.get(key) if self._slots else None
            if previous is None and slot is not None and _fits(slot, grad, source.channel_dim):
                block_maps[key] = source.channel_summed(grad, include_folded=True, out=slot)
                self._in_slots += 1
            else:
                summed = source.channel_summed(grad, include_folded=True)
                if summed.dtype in _HALF:
                    summed = summed.float()
                if previous is None:
                    block_maps[key] = summed
                    self._elsewhere = True
                    self._misfit = self._misfit or slot is not None
                elif previous is slot and not summed.requires_grad:
                    previous.add_(summed)
                else:
                    block_maps[key] = previous + summed
            self._groups = None
            self.mapped_sources.append(source)
            return
        if grad.dtype in _HALF:
            grad = grad.float()  # half-precision gradients (autocast) reduced in float32
        contribution = source.per_example_sum(grad)
        self._other_sum = (
            contribution if self._other_sum is None else self._other_sum + contribution
        )
        if in_map:
            bias_jacobian = source.bias_jacobian(grad)
            rescaled = minmax_rescale(bias_jacobian.abs()).sum(source.channel_dim)
            # Authors' code: one map per source, no conv-BN grouping.
            self.block_maps[source.name] = rescaled
            self.mapped_sources.append(source)

    def _grouped(self) -> List[Tensor]:
        """The block maps stacked by resolution: ``[(B, n_blocks, *size), ...]``."""
        if self._groups is None:
            block_maps = self.block_maps
            # A reserved buffer is its resolution's stack when every map of that
            # resolution lies in it (its slots that no gradient reached set to zero).
            in_buffers: Dict[Tuple[int, ...], Tuple[Tensor, set]] = {}
            for buffer, keys in self._buffers:
                slots = [self._slots[key] for key in keys]
                if any(block_maps.get(key) is slot for key, slot in zip(keys, slots)):
                    for key, slot in zip(keys, slots):
                        if block_maps.get(key) is not slot:
                            slot.zero_()
                    in_buffers[tuple(buffer.shape[2:])] = (
                        buffer.transpose(0, 1),
                        {id(s) for s in slots},
                    )
            by_size: Dict[Tuple[int, ...], List[Tensor]] = OrderedDict()
            for m in block_maps.values():
                by_size.setdefault(tuple(m.shape[1:]), []).append(m)
            groups = []
            for size, maps in by_size.items():
                reserved_group = in_buffers.get(size)
                if reserved_group is not None and all(id(m) in reserved_group[1] for m in maps):
                    groups.append(reserved_group[0])
                elif len(maps) > 1:
                    groups.append(torch.stack(maps, 1))
                else:
                    groups.append(maps[0].unsqueeze(1))
            self._groups = groups
        return self._groups

    @property
    def bias_sum(self) -> Optional[Tensor]:
        """``sum_g <df/dy_g, c_g>`` per example, ``(B,)``: the bias part of eq. 1."""
        total = self._other_sum
        if self.postprocess == EQ4 and self.block_maps:
            groups = self._grouped()
            # One sum over the concatenated maps (a reserved group, a transposed view, is
            # copied by ``flatten``): fewer kernels than a sum per resolution at batch 1.
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
            # A resolution of one block needs no sum over blocks.
            summed = stacked.abs() if stacked.shape[1] == 1 else stacked.abs().sum(1, keepdim=True)
            if tuple(summed.shape[2:]) != size:
                summed = F.interpolate(summed, size=size, mode=mode, align_corners=align_corners)
            # ``total`` is a fresh tensor of this call (an absolute value or a resize).
            total = summed if total is None else total.add_(summed)
        assert total is not None
        return total[:, 0]


def _fits(slot: Tensor, grad: Tensor, channel_dim: Optional[int]) -> bool:
    """Whether ``grad``'s channel sum can be written into ``slot``: its shape (the
    gradient's without the channel axis), dtype and device, and no graph to record."""
    # Host time (once per map and call): ``Tensor.device`` makes a new object each time.
    if channel_dim is None or slot.dtype is not grad.dtype or torch.is_grad_enabled():
        return False
    if not (slot.is_cpu and grad.is_cpu) and slot.device != grad.device:
        return False
    shape = grad.shape
    rank = len(shape)
    if channel_dim < 0:
        channel_dim += rank
    return slot.dim() == rank - 1 and slot.shape == shape[:channel_dim] + shape[channel_dim + 1 :]


def _dot_row(source: BiasSource, grad: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``(df/dy, c)`` as two ``(B, n)`` rows whose dot product per example is the source's
    term of eq. 1 (:meth:`BiasSource.per_example_sum`), or ``None`` where the source is
    not laid out with one example per row of its batch axis 0, or its intercept is not a
    channel vector or a dense tensor of the gradient's shape and dtype."""
    if source.batch_dim != 0 or grad.dim() < 2 or grad.dtype in _HALF:
        return None
    batch = grad.shape[0]
    if source.batch_size is not None and source.batch_size != batch:
        return None  # several slices per example (Swin's windows)
    intercept = source.intercept
    vector = intercept.channel_vector
    if vector is not None:
        channel_dim = intercept.channel_dim
        if (
            channel_dim is None
            or channel_dim % grad.dim() == 0
            or vector.dtype != grad.dtype
            or vector.dim() != 1
            or grad.numel() != batch * vector.shape[0]
            or grad.shape[channel_dim] != vector.shape[0]
        ):
            return None  # positions besides the channels: summed first by per_example_sum
        return grad.reshape(batch, -1), vector.expand(batch, -1)
    dense = intercept.dense
    if (
        dense is None
        or intercept.negated_output is not None
        or intercept.shrunk_output is not None
        or intercept.backward_pair is not None
        or dense.shape != grad.shape
        or dense.dtype != grad.dtype
    ):
        return None
    return grad.reshape(batch, -1), dense.reshape(batch, -1)


_any_autocast_enabled: Callable[[], bool] = getattr(
    torch._C, "_is_any_autocast_enabled", lambda: True
)


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
    """Resize each ``(B, *s)`` map to ``size`` and add them up (one resize per distinct size)."""
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


# ---------------------------------------------------------------- signed attribution


def _overlap_matrix(size: int, cells: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(size, cells)`` weights: the share of cell ``i`` that input pixel ``p`` covers.

    Cell ``i`` of a layer with ``cells`` positions covers ``[i size/cells, (i+1) size/cells)``
    of the input axis, pixel ``p`` covers ``[p, p + 1)``. In units of ``1/cells`` both ends
    are integers, so the overlaps are exact and every column sums to exactly ``size``
    before the division: each cell's value is split without loss, whatever the ratio.
    """
    p = torch.arange(size, dtype=torch.int64, device=device).unsqueeze(1)
    i = torch.arange(cells, dtype=torch.int64, device=device).unsqueeze(0)
    low = torch.maximum(p * cells, i * size)
    high = torch.minimum((p + 1) * cells, (i + 1) * size)
    return (high - low).clamp_min(0).to(dtype) / size


def area_split(signed_map: Tensor, size: Sequence[int]) -> Tensor:
    """Split each cell of a ``(B, *cells)`` map over the input positions it covers.

    The weights are the cell's area overlap with each input position, so the map's
    per-example sum is kept exactly (up to rounding) for any size ratio, non-divisible
    ones included; the result is ``(B, *size)``.
    """
    out = signed_map
    for axis, target in enumerate(size, start=1):
        cells = out.shape[axis]
        if cells == target:
            continue
        weights = _overlap_matrix(int(target), cells, out.dtype, out.device)
        out = torch.movedim(torch.matmul(weights, torch.movedim(out, axis, -2)), -2, axis)
    return out


def signed_bias_attribution(
    collector: MapCollector, shape: Sequence[int], channel_dim: int, *, include_non_spatial: bool
) -> Optional[Tensor]:
    """The bias terms of eq. 1 as a signed attribution of the input's ``shape``.

    Each block's signed channel-summed bias-Jacobian is split over the input positions
    its cells cover (:func:`area_split`) and evenly over the input's channels; with
    ``include_non_spatial`` the terms of sources that are not spatial maps are spread
    evenly over every element of an example. The per-example sum of the result is the
    sum of the included bias terms. ``None`` when there is nothing to place.
    """
    spatial = [int(s) for i, s in enumerate(shape) if i not in (0, channel_dim)]
    channels = int(shape[channel_dim])
    total: Optional[Tensor] = None
    for block_map in collector.block_maps.values():
        part = area_split(block_map, spatial)
        total = part if total is None else total + part
    result = None
    if total is not None:
        result = (total / channels).unsqueeze(channel_dim).expand(*shape)
    other = collector._other_sum
    if include_non_spatial and other is not None:
        elements = 1
        for s in shape[1:]:
            elements *= int(s)
        even = (other / elements).reshape(-1, *([1] * (len(shape) - 1)))
        result = even.expand(*shape) if result is None else result + even
    return result


def signed_input_term(input_gradient: Tensor, inputs: Tensor) -> Tensor:
    """The input term of eq. 1 per element, ``grad_x f * x``, keeping its sign."""
    return input_gradient * inputs
