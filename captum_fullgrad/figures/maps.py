"""Saliency maps of several methods on one batch (:func:`attribution_maps`), timed, and
their normalisation for display (:func:`normalize_maps`)."""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .._device import synchronize
from ..methods import DEFAULT_TABLE5_METHODS, AttributionMethod, resolve_methods
from ._common import check_images

MethodSpec = Union[str, AttributionMethod]


@dataclass
class AttributionMaps:
    """Saliency maps of several methods on one batch, with the model's predictions.

    Attributes:
        maps: method name -> ``(N, 1, H, W)`` float32 maps on the CPU, in method order.
        labels: method name -> figure label.
        seconds: method name -> wall-clock seconds spent computing its maps (all batches).
        targets: ``(N,)`` the explained class of each image.
        predictions: ``(N,)`` the predicted class (argmax of the logits).
        probabilities: ``(N, K)`` softmax of the logits.
    """

    maps: "OrderedDict[str, Tensor]"
    labels: Dict[str, str]
    seconds: Dict[str, float]
    targets: Tensor
    predictions: Tensor
    probabilities: Tensor


def _resolve_methods(methods: Union[MethodSpec, Sequence[MethodSpec]]) -> List[AttributionMethod]:
    # The registry's one reader of method lists: the same names and errors as the CLI.
    return resolve_methods(methods)


def _batches(n: int, batch_size: Optional[int]) -> List[slice]:
    size = n if not batch_size else batch_size
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _resolve_targets(targets: Any, predictions: Tensor, num_classes: int) -> Tensor:
    n = predictions.shape[0]
    if targets is None:
        return predictions.clone()
    if isinstance(targets, int) and not isinstance(targets, bool):
        resolved = torch.full((n,), targets, dtype=torch.long)
    else:
        resolved = torch.as_tensor(targets).reshape(-1).to(torch.long).cpu()
        if resolved.numel() == 1 and n > 1:
            resolved = resolved.expand(n).clone()
    if resolved.numel() != n:
        raise ValueError(f"got {resolved.numel()} targets for {n} images")
    if num_classes > 0 and ((resolved < 0) | (resolved >= num_classes)).any():
        raise ValueError(
            f"targets must be class indices in [0, {num_classes - 1}], got {resolved.tolist()}"
        )
    return resolved


def _logits(model: Any, inputs: Tensor, batch_size: Optional[int]) -> Tensor:
    outputs = []
    with torch.no_grad():
        for part in _batches(inputs.shape[0], batch_size):
            output = model(inputs[part])
            if not isinstance(output, Tensor) or output.dim() != 2:
                raise ValueError("the model must return logits of shape (N, K)")
            outputs.append(output.detach().float().cpu())
    return torch.cat(outputs)


def attribution_maps(
    model: Any,
    inputs: Tensor,
    targets: Any = None,
    methods: Union[MethodSpec, Sequence[MethodSpec]] = DEFAULT_TABLE5_METHODS,
    *,
    batch_size: Optional[int] = None,
    progress: bool = False,
    description: str = "saliency maps",
) -> AttributionMaps:
    """Run several saliency methods on a batch, in chunks, and time each.

    Args:
        model: classifier in eval mode returning logits ``(N, K)``.
        inputs: ``(N, C, H, W)`` model inputs (already preprocessed), on the model's device.
        targets: classes to explain: ``None`` (the predicted classes), one int for all, or
            one per image.
        methods: method names (see :func:`~captum_fullgrad.methods.available_methods`)
            or :class:`~captum_fullgrad.methods.AttributionMethod` objects.
        batch_size: images per call of a method (``None``: all at once).
        progress: show a tqdm progress bar on stderr (one step per method and chunk).
        description: the progress bar's label (e.g. the stage of a longer run).

    Returns:
        :class:`AttributionMaps`.
    """
    inputs = check_images(inputs, "inputs")
    resolved = _resolve_methods(methods)
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    logits = _logits(model, inputs, batch_size)
    probabilities = logits.softmax(dim=1)
    predictions = logits.argmax(dim=1)
    target_tensor = _resolve_targets(targets, predictions, logits.shape[1])
    parts = _batches(inputs.shape[0], batch_size)
    device = inputs.device

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(resolved) * len(parts),
        desc=description,
        unit="batch",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    maps: "OrderedDict[str, Tensor]" = OrderedDict()
    seconds: Dict[str, float] = {}
    try:
        for method in resolved:
            bar.set_postfix_str(method.name)
            chunks = []
            elapsed = 0.0
            for part in parts:
                synchronize(device)
                start = time.perf_counter()
                result = method(model, inputs[part], target_tensor[part].to(device))
                synchronize(device)
                elapsed += time.perf_counter() - start
                chunks.append(result.cpu())
                bar.update(1)
            maps[method.name] = torch.cat(chunks)
            seconds[method.name] = elapsed
    finally:
        bar.close()
    return AttributionMaps(
        maps=maps,
        labels={m.name: m.label for m in resolved},
        seconds=seconds,
        targets=target_tensor,
        predictions=predictions,
        probabilities=probabilities,
    )


def normalize_maps(maps: Tensor, percentile: float = 99.0) -> Tensor:
    """Scale each non-negative map to ``[0, 1]``: divide by its own ``percentile``-th
    percentile and clip at 1 (zero stays zero).

    A map whose percentile is zero (mostly zero, e.g. a sparse Grad-CAM) is divided by its
    maximum instead; an all-zero map stays zero.

    Args:
        maps: ``(N, 1, H, W)``, ``(N, H, W)`` or ``(H, W)`` non-negative maps.
        percentile: in ``(0, 100]``; 100 is plain division by the maximum.

    Returns:
        Float32 tensor of the same shape with values in ``[0, 1]``.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if maps.dim() < 2:
        raise ValueError(
            f"maps must have at least 2 dimensions (H, W), got shape {tuple(maps.shape)}"
        )
    shape = maps.shape
    flat = (
        maps.detach().float().reshape(-1, shape[-2] * shape[-1])
        if maps.dim() > 2
        else maps.detach().float().reshape(1, -1)
    )
    flat = flat.clamp(min=0)
    if flat.shape[1] <= 16_000_000:
        scale = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    else:  # torch.quantile's size limit
        k = max(1, int(math.ceil(percentile / 100.0 * flat.shape[1])))
        scale = flat.kthvalue(k, dim=1, keepdim=True).values
    peak = flat.amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, peak)
    scaled = torch.where(
        scale > 0, flat / scale.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(flat)
    )
    return scaled.clamp(0.0, 1.0).reshape(shape)
