"""Grad-CAM on token models (ViT, Swin, ...): the tokens of the last block, on their grid.

Grad-CAM's usual layer, the last convolution that runs, is on a vision transformer its patch
embedding: the first layer, whose map explains nothing. :func:`find_token_layer` recognises
that case (the last convolution has ``kernel_size == stride > 1``, i.e. it cuts the image
into patches) and finds instead the last layer whose output is a grid of tokens, either a
token sequence ``(B, N, C)`` (``N`` = the patch grid plus a few class/register tokens in
front, ``C`` the embedding width) or a channels-last grid ``(B, h, w, C)`` as in Swin,
and whose patch tokens the explained output actually depends on. On a ViT that reads
its class token, that is the last block's first LayerNorm: after it, the patch tokens no
longer reach the class token, so their gradient is exactly zero (the layer pytorch-grad-cam
users pick by hand for ViTs). :func:`token_gradcam` computes Grad-CAM there (Selvaraju et al.
2017): the tokens reshaped to ``(B, C, h, w)``, weighted by their spatially averaged
gradient, summed over channels and ReLU'd. A model whose last convolution is a patch
embedding but which has no such token layer is refused with a message, never explained
with its patch embedding.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["TokenLayer", "find_token_layer", "token_gradcam"]

# At most this many tokens (class, distillation, register tokens) precede the patch grid.
_MAX_PREFIX_TOKENS = 16

# Token layer of each model and input shape, found once by a forward and backward pass.
_FOUND: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple[Any, ...], Optional[TokenLayer]]]" = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class TokenLayer:
    """Where Grad-CAM reads a token model.

    Attributes:
        name: qualified name of the module whose output is used.
        layout: ``"tokens"`` (``(B, N, C)``) or ``"nhwc"`` (``(B, h, w, C)``).
        grid: ``(h, w)`` of the patch grid at that layer.
        prefix: tokens in front of the grid (class and register tokens), for ``"tokens"``.
        patch_embedding: name of the patch-embedding convolution that was passed over.
    """

    name: str
    layout: str
    grid: Tuple[int, int]
    prefix: int
    patch_embedding: str


def _is_patch_embedding(conv: nn.Module) -> bool:
    kernel = tuple(getattr(conv, "kernel_size", ()))
    stride = tuple(getattr(conv, "stride", ()))
    return bool(kernel) and kernel == stride and math.prod(stride) > 1


def _grids(h: int, w: int) -> List[Tuple[int, int]]:
    """The patch grid and its successive halvings (Swin merges 2 x 2 patches per stage)."""
    grids = []
    while h >= 1 and w >= 1:
        grids.append((h, w))
        if h % 2 or w % 2:
            break
        h, w = h // 2, w // 2
    return grids


def _classify(
    output: Tensor, grids: List[Tuple[int, int]], embed: int
) -> Optional[Tuple[str, Tuple[int, int], int]]:
    """``(layout, grid, prefix)`` when ``output`` is a token grid of one example, else None."""
    shape = tuple(output.shape)
    if len(shape) == 3 and shape[0] == 1:
        tokens, channels = shape[1], shape[2]
        h, w = grids[0]
        if channels == embed and 0 <= tokens - h * w <= _MAX_PREFIX_TOKENS:
            return "tokens", (h, w), tokens - h * w
        for grid in grids[1:]:
            if tokens == grid[0] * grid[1]:
                return "tokens", grid, 0
    if len(shape) == 4 and shape[0] == 1:
        channels_last = shape[1:3] in grids
        channels_first = shape[2:4] in grids
        if channels_last and not channels_first:
            return "nhwc", (shape[1], shape[2]), 0
    return None


def _target_logits(output: Any, target: Any) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise ValueError("Grad-CAM on a token model needs logits of shape (B, K)")
    if target is None:
        index = output.argmax(dim=1)
    elif isinstance(target, Tensor):
        index = target.reshape(-1).to(device=output.device, dtype=torch.long)
        if index.numel() == 1:
            index = index.expand(output.shape[0])
    else:
        index = torch.full((output.shape[0],), int(target), device=output.device)
    return output.gather(1, index[:, None])[:, 0]


def find_token_layer(model: nn.Module, inputs: Tensor, target: Any = None) -> Optional[TokenLayer]:
    """Grad-CAM's layer on a token model, or ``None`` for a model whose last convolution is
    not a patch embedding (Grad-CAM then uses that convolution as usual).

    Args:
        model: the classifier.
        inputs: ``(B, C, H, W)``; its first example is run once (forward and backward) to
            find which token layers the output depends on. Cached per model and input shape.
        target: the explained class of the first example (``None``: its predicted class).

    Raises:
        ValueError: the last convolution is a patch embedding but no later layer holds the
            tokens on their grid (pass ``layer=`` to Grad-CAM).
    """
    from .methods import find_last_conv

    conv_name, conv = find_last_conv(model, inputs)
    if not _is_patch_embedding(conv):
        return None
    key = (tuple(inputs.shape[1:]), inputs.dtype, str(inputs.device))
    cached = _FOUND.get(model, {})
    if key in cached:
        return cached[key]

    outputs: List[Tuple[str, Tensor]] = []
    conv_grid: List[Tuple[int, int]] = []

    def record(name: str, module: nn.Module, output: Any) -> None:
        if module is conv and isinstance(output, Tensor) and output.dim() == 4:
            conv_grid.append((int(output.shape[-2]), int(output.shape[-1])))
        elif conv_grid and isinstance(output, Tensor) and output.requires_grad:
            outputs.append((name, output))

    handles = [
        module.register_forward_hook(lambda m, _i, o, name=name: record(name, m, o))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.enable_grad():
            probe = inputs[:1].detach().requires_grad_(True)
            first = target[:1] if isinstance(target, Tensor) and target.dim() > 0 else target
            logit = _target_logits(model(probe), first).sum()
            grids = _grids(*conv_grid[0]) if conv_grid else []
            embed = int(getattr(conv, "out_channels", 0))
            candidates = [
                (name, output, found)
                for name, output in outputs
                if (found := _classify(output, grids, embed)) is not None
            ]
            gradients = (
                torch.autograd.grad(
                    logit, [o for _, o, _ in candidates], allow_unused=True, retain_graph=False
                )
                if candidates
                else []
            )
    finally:
        for handle in handles:
            handle.remove()
    chosen: Optional[TokenLayer] = None
    for (name, _, (layout, grid, prefix)), gradient in reversed(list(zip(candidates, gradients))):
        if gradient is None:
            continue
        patches = gradient[:, prefix:] if layout == "tokens" else gradient
        if bool((patches != 0).any()):
            chosen = TokenLayer(name, layout, grid, prefix, conv_name)
            break
    if chosen is None:
        kernel = "x".join(str(k) for k in conv.kernel_size)  # type: ignore[union-attr]
        raise ValueError(
            f"Grad-CAM: the last convolution that runs, {conv_name!r}, is a patch embedding "
            f"(kernel = stride = {kernel}), whose map explains nothing, and no later layer "
            "holds the patch tokens on their grid ((B, N, C) tokens or (B, h, w, C)); pass "
            "layer=<module or module name> (--param gradcam.layer=NAME on the command line)"
        )
    _FOUND.setdefault(model, {})[key] = chosen
    return chosen


def token_gradcam(model: nn.Module, inputs: Tensor, target: Any, layer: TokenLayer) -> Tensor:
    """Grad-CAM ``(B, 1, h, w)`` on the token grid of ``layer`` (not yet upsampled).

    ``relu(sum_c mean_hw(d y / d A_c) * A_c)`` with ``A`` the layer's patch tokens reshaped
    to ``(B, C, h, w)`` and ``y`` the target logit of each example.
    """
    module = dict(model.named_modules())[layer.name]
    captured: List[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with torch.enable_grad():
            x = inputs.detach().requires_grad_(True)
            logits = _target_logits(model(x), target)
            (activation,) = captured[-1:]
            (gradient,) = torch.autograd.grad(logits.sum(), activation)
    finally:
        handle.remove()
    h, w = layer.grid

    def to_grid(t: Tensor) -> Tensor:
        if layer.layout == "tokens":
            t = t[:, layer.prefix :].reshape(t.shape[0], h, w, t.shape[-1])
        return t.permute(0, 3, 1, 2)

    activation, gradient = to_grid(activation.detach()), to_grid(gradient)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return (weights * activation).sum(dim=1, keepdim=True).clamp(min=0)
