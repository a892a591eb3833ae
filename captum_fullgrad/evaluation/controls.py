#!/usr/bin/env python3
r"""Control "attribution methods" that every real method should beat.

Each control is called exactly like an attribution method,
``control(model, inputs, target) -> maps`` of shape ``(B, 1, H, W)``, so a benchmark
can run it through the same metrics:

- :class:`UniformRandomMap`: i.i.d. :math:`U(0, 1)` saliency; the chance level of
  every metric.
- :class:`BlurredRandomMap`: the same noise smoothed by a Gaussian of
  :math:`\sigma = 4` px, giving blobs of roughly the size of the objects of interest;
  metrics that merely reward smooth, blobby maps (e.g. because removing a connected
  region hurts more than removing scattered pixels) are exposed by it.
- :class:`SobelEdgeMap`: the input's edge magnitude. It ignores the model entirely, so
  it must fail the model-randomisation sanity check, but it often looks plausible and
  scores well on localisation: Adebayo et al. (2018) show that several gradient methods
  behave much like an edge detector.

Randomness: the random controls must return the same map when called twice on the same
input (a benchmark may evaluate a method several times), yet different maps for
different images. Each example's noise is therefore drawn from its own generator,
seeded by hashing the control's ``seed`` together with the example's pixel values. The
map of an image thus does not depend on the batch it is in, its position in it, or the
device, and the controls hold no mutable state.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_fullgrad.evaluation._common import format_inputs

__all__ = [
    "BlurredRandomMap",
    "CONTROL_LABELS",
    "CONTROL_NAMES",
    "SobelEdgeMap",
    "UniformRandomMap",
    "blurred_random_map",
    "make_control",
    "sobel_edge_map",
    "uniform_random_map",
]


def _example_seeds(inputs: Tensor, seed: int) -> list:
    r"""One 63-bit seed per example: BLAKE2b of (seed, shape, float32 pixel bytes)."""
    pixels = inputs.detach().to(device="cpu", dtype=torch.float32).contiguous()
    seeds = []
    for example in pixels:
        digest = hashlib.blake2b(digest_size=8)
        digest.update(int(seed).to_bytes(8, "little", signed=True))
        digest.update(str(tuple(example.shape)).encode())
        digest.update(example.numpy().tobytes())
        seeds.append(int.from_bytes(digest.digest(), "little") >> 1)
    return seeds


def _uniform_noise(inputs: Tensor, seed: int) -> Tensor:
    r"""``(B, 1, H, W)`` :math:`U(0, 1)` noise on the inputs' device, keyed on content and seed."""
    b, _, h, w = inputs.shape
    draws = [
        torch.rand((1, h, w), generator=torch.Generator().manual_seed(s))
        for s in _example_seeds(inputs, seed)
    ]
    dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
    return torch.stack(draws).to(device=inputs.device, dtype=dtype)


def _gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    r"""Separable Gaussian blur of ``(B, 1, H, W)`` maps.

    Kernel radius :math:`\lceil 3\sigma \rceil` (the truncated mass is below 0.3 %),
    normalised to sum 1. Borders are reflected (no dark rim as with zero padding);
    when the image is too small to reflect the whole radius, they are replicated.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    h, w = maps.shape[-2:]
    mode = "reflect" if radius < min(h, w) else "replicate"
    padded = F.pad(maps, (radius, radius, radius, radius), mode=mode)
    # Shifted weighted sums in a fixed order rather than conv2d: convolution kernels
    # choose their summation order by batch size and device, and the control must give
    # bit-identical maps for an image whichever batch it is evaluated in.
    taps = kernel.tolist()
    rows = sum(t * padded[..., :, i : i + w] for i, t in enumerate(taps))
    return sum(t * rows[..., i : i + h, :] for i, t in enumerate(taps))


class UniformRandomMap:
    r"""Control map: independent :math:`U(0, 1)` saliency for every pixel.

    Args:
        seed (int, optional): Seed combined with each image's content. Default: 0.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def __call__(self, model: Optional[nn.Module], inputs: Tensor, target: Any = None) -> Tensor:
        r"""Return ``(B, 1, H, W)`` maps for ``inputs`` ``(B, C, H, W)``; ``model`` and
        ``target`` are ignored."""
        return _uniform_noise(format_inputs(inputs), self.seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class BlurredRandomMap:
    r"""Control map: uniform noise blurred by a Gaussian, rescaled to ``[0, 1]``.

    The noise is exactly that of :class:`UniformRandomMap` with the same ``seed``; it is
    blurred with a Gaussian of standard deviation ``sigma`` pixels, then min-max scaled
    per map to ``[0, 1]`` (blurring shrinks the noise towards 0.5; rescaling restores a
    comparable dynamic range and keeps every value non-negative).

    Args:
        seed (int, optional): Seed combined with each image's content. Default: 0.
        sigma (float, optional): Blur standard deviation in pixels; 4 px gives blobs of
                    about 1/8 of a 64-px image. Default: 4.
    """

    def __init__(self, seed: int = 0, sigma: float = 4.0) -> None:
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.seed = int(seed)
        self.sigma = float(sigma)

    def __call__(self, model: Optional[nn.Module], inputs: Tensor, target: Any = None) -> Tensor:
        r"""Return ``(B, 1, H, W)`` maps in ``[0, 1]``; ``model`` and ``target`` are ignored."""
        blurred = _gaussian_blur(_uniform_noise(format_inputs(inputs), self.seed), self.sigma)
        low = blurred.amin(dim=(2, 3), keepdim=True)
        span = blurred.amax(dim=(2, 3), keepdim=True) - low
        return torch.where(
            span > 0, (blurred - low) / span.clamp_min(torch.finfo(span.dtype).tiny), 0.0
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, sigma={self.sigma})"


class SobelEdgeMap:
    r"""Control map: Sobel gradient magnitude of the grey-scale input.

    .. math::
        g = \tfrac{1}{C}\sum_c x_c, \qquad
        s = \sqrt{(K_x * g)^2 + (K_y * g)^2}, \qquad
        K_x = \begin{psmallmatrix}-1&0&1\\-2&0&2\\-1&0&1\end{psmallmatrix},\;
        K_y = K_x^\top .

    The grey image is the channel mean: the inputs are usually standardised per channel,
    for which luminance weights have no particular meaning. Borders are replicated, so a
    constant image gives an exactly zero map. Deterministic; no seed.
    """

    def __call__(self, model: Optional[nn.Module], inputs: Tensor, target: Any = None) -> Tensor:
        r"""Return ``(B, 1, H, W)`` non-negative maps; ``model`` and ``target`` are ignored."""
        inputs = format_inputs(inputs)
        grey = F.pad(inputs.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        # Separable form K_x = (1, 2, 1)^T (-1, 0, 1), written with slices rather than a
        # convolution so that it is exact on GPUs too (no TF32 rounding).
        dx = grey[..., :, 2:] - grey[..., :, :-2]
        dy = grey[..., 2:, :] - grey[..., :-2, :]
        gx = dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]
        gy = dy[..., :, :-2] + 2.0 * dy[..., :, 1:-1] + dy[..., :, 2:]
        gradients = torch.cat([gx, gy], dim=1)
        return gradients.pow(2).sum(dim=1, keepdim=True).sqrt()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Ready-made instances with the default seed, usable wherever a method is expected.
uniform_random_map = UniformRandomMap(seed=0)
blurred_random_map = BlurredRandomMap(seed=0, sigma=4.0)
sobel_edge_map = SobelEdgeMap()


#: Names of the three controls, in report order.
CONTROL_NAMES: Tuple[str, ...] = ("uniform_random", "blurred_random", "sobel_edges")
#: Their display labels.
CONTROL_LABELS = {
    "uniform_random": "Control: uniform random",
    "blurred_random": "Control: blurred random",
    "sobel_edges": "Control: Sobel edges",
}


def make_control(name: str, seed: int) -> Callable[..., Tensor]:
    """The control ``name`` (one of :data:`CONTROL_NAMES`), its noise drawn from ``seed``."""
    if name == "uniform_random":
        return UniformRandomMap(seed=seed)
    if name == "blurred_random":
        return BlurredRandomMap(seed=seed)
    if name == "sobel_edges":
        return SobelEdgeMap()
    raise ValueError(f"unknown control {name!r}; controls: {', '.join(CONTROL_NAMES)}")
