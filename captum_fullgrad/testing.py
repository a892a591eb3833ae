"""Helpers for tests and benchmarks: networks whose bias sources are all non-zero.

torchvision's ``weights=None`` initialisation leaves every convolution bias and every
BatchNorm effective bias at exactly zero, ViT's head at zero and ConvNeXt's layer scale
at 1e-6. On such a network the bias-Jacobian terms of eq. 1 vanish and a completeness
test passes without testing anything, so every test and benchmark of this package first
randomises those terms with :func:`randomize_parameters_`.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Tuple

import torch
from torch import nn

__all__ = ["ZOO", "randomize_parameters_", "zoo_model"]

#: The torchvision classifiers on which eq. 1's completeness is tested and benchmarked
#: (the tests and ``benchmarks/completeness_zoo.py`` both loop over this list).
#: Inception needs inputs of at least 75 px.
ZOO: Tuple[str, ...] = (
    "vgg11_bn",
    "vgg16_bn",
    "alexnet",
    "resnet18",
    "resnet50",
    "densenet121",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "mnasnet0_5",
    "googlenet",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "convnext_tiny",
)

_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@torch.no_grad()
def randomize_parameters_(model: nn.Module, seed: int = 0, bias_scale: float = 0.1) -> nn.Module:
    """Give every bias source of ``model`` a non-zero value, in place, deterministically.

    - biases of every module: ``N(0, bias_scale^2)``;
    - normalisation layers: affine weight ``U(0.5, 1.5)``, affine bias ``N(0, bias_scale^2)``,
      running mean ``N(0, bias_scale^2)``, running variance ``U(0.5, 1.5)``;
    - parameters that are (nearly) all zero or tiny, such as zero-initialised heads, class
      tokens, position embeddings and layer scales: ``N(0, 0.02^2)`` for embeddings and
      weights, ``U(0.5, 1.5)`` for scales.

    Returns ``model`` for chaining.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal_like(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=generator, dtype=torch.float64) * std).to(t)

    def uniform_like(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return (
            low + (high - low) * torch.rand(t.shape, generator=generator, dtype=torch.float64)
        ).to(t)

    for module in model.modules():
        if isinstance(module, _NORMS):
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(uniform_like(module.weight, 0.5, 1.5))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(normal_like(module.bias, bias_scale))
            # Buffers, None when the norm keeps no running statistics.
            running_mean = getattr(module, "running_mean", None)
            if isinstance(running_mean, torch.Tensor):
                running_mean.copy_(normal_like(running_mean, bias_scale))
            running_var = getattr(module, "running_var", None)
            if isinstance(running_var, torch.Tensor):
                running_var.copy_(uniform_like(running_var, 0.5, 1.5))
            continue
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                param.copy_(normal_like(param, bias_scale))
            elif param.numel() > 0 and param.abs().max() < 1e-4:
                # Zero-initialised heads and embeddings, or layer scales at 1e-6.
                if "scale" in name or param.dim() == 1 and "gamma" in name:
                    param.copy_(uniform_like(param, 0.5, 1.5))
                else:
                    param.copy_(
                        normal_like(param, 0.02 if "embed" in name or "token" in name else 0.05)
                    )
    return model


def zoo_model(name: str, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """torchvision classifier ``name`` (one of :data:`ZOO`) with random weights and every
    bias source randomised (:func:`randomize_parameters_` with ``seed``), float32, eval mode.

    GoogLeNet and Inception are built without auxiliary heads. Inception's truncated-normal
    initialisation gives logits of ~1e9, so its convolution weights are scaled by 0.3 to
    keep a relative completeness gap meaningful.
    """
    import torchvision  # not needed by randomize_parameters_ alone

    kwargs: Dict[str, Any] = {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"init_weights": True, "aux_logits": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notes on init_weights
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    randomize_parameters_(model, seed)
    if name == "inception_v3":
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.mul_(0.3)
    return model.eval()
