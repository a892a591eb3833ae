r"""Helpers the evaluation metrics share: input, target and map checks, batched forward
passes, seeded generators, the deterministic pixel-removal order, and JSON conversion.

Public within :mod:`captum_fullgrad.evaluation` (the metric modules import these names),
private to the package: users call the metrics, not these.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from captum_fullgrad.evaluation._lazy import nn, no_grad, torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = [
    "Explainer",
    "SeedLike",
    "check_percentages",
    "format_inputs",
    "format_maps",
    "format_target",
    "forward_logits",
    "jsonable",
    "make_generator",
    "maps_for",
    "percent_to_count",
    "removal_ranks",
]

#: An explanation method: ``explain(model, inputs, target) -> (B, 1, H, W)`` maps.
Explainer = Callable[["nn.Module", "Tensor", "Tensor"], "Tensor"]
#: A seed or a generator to draw from.
SeedLike = Union[int, "torch.Generator"]


def format_maps(maps: Tensor, name: str = "maps") -> Tensor:
    r"""Return saliency maps as a floating ``(B, H, W)`` tensor, checking the layout.

    Accepts ``(B, H, W)`` or ``(B, 1, H, W)``. Multi-channel attributions such as
    gradient x input ``(B, C, H, W)`` are rejected rather than silently reduced: how to
    pool channels (sum, sum of absolute values, ...) is a property of the attribution
    method and has to be decided by its caller.
    """
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(
                f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(maps.shape)};"
                " reduce multi-channel attributions to one channel first"
            )
        maps = maps[:, 0]
    elif maps.dim() != 3:
        raise ValueError(
            f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(maps.shape)}"
        )
    if not torch.is_floating_point(maps):
        maps = maps.to(torch.get_default_dtype())
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return maps.detach()


def format_inputs(inputs: Tensor) -> Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ValueError(
            f"inputs must be a (B, C, H, W) tensor, got {getattr(inputs, 'shape', type(inputs))}"
        )
    return inputs.detach()


def format_target(
    target: Union[int, Sequence[int], Tensor], batch: int, device: torch.device
) -> Tensor:
    r"""Return class indices as a long ``(B,)`` tensor on ``device``; an int is broadcast."""
    t = torch.as_tensor(target, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target must be an int or have shape ({batch},), got {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError("target must hold integer class indices")
    return t.long()


def maps_for(maps: Tensor, inputs: Tensor) -> Tensor:
    r"""Format maps to ``(B, H, W)`` on the inputs' device and check they match the inputs."""
    maps = format_maps(maps).to(inputs.device)
    b, _, h, w = inputs.shape
    if maps.shape != (b, h, w):
        raise ValueError(
            f"maps of shape {tuple(maps.shape)} do not match inputs of shape {tuple(inputs.shape)}"
        )
    return maps


@no_grad
def forward_logits(model: nn.Module, inputs: Tensor, batch_size: Optional[int] = None) -> Tensor:
    r"""Logits ``(N, K)`` of ``model`` on ``inputs``, in chunks of ``batch_size`` examples."""
    n = inputs.shape[0]
    step = n if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    outputs = [model(inputs[i : i + step]) for i in range(0, n, step)]
    logits = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"model must return logits of shape (N, K), got {tuple(logits.shape)}")
    return logits


def make_generator(seed: SeedLike) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def removal_ranks(maps: Tensor, order: str, generator: torch.Generator) -> Tensor:
    r"""Rank of every pixel in the removal order, ``(B, H*W)``: rank 0 is removed first.

    ``order="least"`` removes pixels by increasing saliency, ``"most"`` by decreasing
    saliency. Ties are broken by a uniformly random permutation drawn from
    ``generator``: the pixels are shuffled, then stably sorted, so tied pixels keep
    their shuffled relative order while distinct values keep their exact order (no
    jitter is added to the values). A constant map therefore removes pixels in random
    order, the natural "uninformative" baseline, instead of in raster order, which
    would remove the top rows first. The permutation is drawn on the generator's
    device (the CPU for an integer seed), so the order does not depend on the device
    the maps live on.
    """
    if order not in ("least", "most"):
        raise ValueError(f"order must be 'least' or 'most', got {order!r}")
    b, n = maps.shape[0], maps[0].numel()
    flat = maps.reshape(b, n)
    keys = torch.rand((b, n), generator=generator, device=generator.device)
    shuffle = keys.argsort(dim=1).to(flat.device)  # (B, N) uniform random permutations
    shuffled = flat.gather(1, shuffle)
    position = shuffled.argsort(dim=1, descending=(order == "most"), stable=True)
    removal_order = shuffle.gather(1, position)  # pixel index removed at each step
    ranks = torch.empty_like(removal_order)
    ranks.scatter_(1, removal_order, torch.arange(n, device=flat.device).expand(b, n))
    return ranks


def percent_to_count(percent: float, n_pixels: int) -> int:
    r"""Number of pixels in ``percent`` % of ``n_pixels``, rounded half up, clipped.

    Rounding half up (not Python's round-half-to-even) keeps the count monotone in
    ``percent``.
    """
    return int(min(n_pixels, max(0, math.floor(percent * n_pixels / 100.0 + 0.5))))


def check_percentages(percentages: Sequence[float], upper: float, inclusive: bool) -> Tensor:
    p = torch.as_tensor(list(percentages), dtype=torch.float64)
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError("percentages must be a non-empty sequence of numbers")
    too_big = (p > upper) if inclusive else (p >= upper)
    if bool((p <= 0).any() or too_big.any()):
        bound = "]" if inclusive else ")"
        raise ValueError(f"percentages must lie in (0, {upper}{bound}, got {p.tolist()}")
    if p.numel() > 1 and not bool((p[1:] > p[:-1]).all()):
        raise ValueError("percentages must be strictly increasing")
    return p


def jsonable(value: Any) -> Any:
    """A JSON-ready copy: tuples become lists, non-finite floats None, others their repr."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return jsonable(value.item())
    if isinstance(value, nn.Module):
        return type(value).__name__
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)
