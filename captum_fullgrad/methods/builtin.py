"""The built-in saliency methods, each one :func:`register_method` declaration (see
``docs/methods.md`` for their defaults and the papers they follow): adapters of Captum's
gradient-type methods, integrated gradients, SmoothGrad, Grad-CAM and the FullGrad
variants of eq. 4. Importing :mod:`captum_fullgrad.methods` registers them.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from torch import Tensor, nn

from .. import _validation
from ..full_gradient import FullGradient
from .registry import (
    ParameterCheck,
    is_int_or_none,
    is_non_negative,
    is_one_of,
    is_optional,
    is_positive_int,
    register_method,
)

__all__ = ["find_last_conv", "smoothing_noise"]


def _channel_abs(attribution: Tensor, reduce: str = "sum") -> Tensor:
    """``|attribution|`` reduced over the channel dimension, ``(B, 1, H, W)``."""
    magnitude = attribution.abs()
    if reduce == "max":
        return magnitude.amax(dim=1, keepdim=True)
    return magnitude.sum(dim=1, keepdim=True)


def _grad_input(x: Tensor) -> Tensor:
    """A leaf copy of ``x`` that requires grad (Captum then does not warn)."""
    return x.detach().clone().requires_grad_(True)


def _captum_channel_abs(
    attribution: Any, inputs: Tensor, target: Any, reduce: str = "sum", **kwargs: Any
) -> Tensor:
    """A Captum attribution method's ``|attribution|`` reduced over channels (the adapters
    of gradient-type methods), on a leaf copy of ``inputs`` and without Captum's warnings."""
    with _Quiet():
        result = attribution.attribute(_grad_input(inputs), target=target, **kwargs)
    return _channel_abs(result, reduce)


class _Quiet:
    def __enter__(self) -> None:
        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.filterwarnings("ignore", message=r".*did not already require gradients.*")
        warnings.filterwarnings("ignore", message=r".*Setting backward hooks on ReLU activations.*")

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


# --------------------------------------------------------------------------------------
# Built-in methods
# --------------------------------------------------------------------------------------

_SIMONYAN = (
    "Simonyan, Vedaldi & Zisserman, 'Deep inside convolutional networks', ICLR workshop 2014"
)
_SHRIKUMAR = "Shrikumar et al., 'Not just a black box', arXiv:1605.01713, 2016"
_SPRINGENBERG = (
    "Springenberg et al., 'Striving for simplicity: the all convolutional net', ICLR workshop 2015"
)
_SUNDARARAJAN = "Sundararajan, Taly & Yan, 'Axiomatic attribution for deep networks', ICML 2017"
_SMILKOV = "Smilkov et al., 'SmoothGrad: removing noise by adding noise', arXiv:1706.03825, 2017"
_SELVARAJU = "Selvaraju et al., 'Grad-CAM: visual explanations from deep networks', ICCV 2017"
_SRINIVAS = (
    "Srinivas & Fleuret, 'Full-Jacobian representation of neural networks', 2019, eq. 4 "
    "(postprocess='neurips2019': 'Full-gradient representation for neural network "
    "visualization', NeurIPS 2019)"
)
_SRINIVAS_SMOOTH = (
    "Srinivas & Fleuret 2019; SmoothFullGrad of the authors' code (idiap/fullgrad-saliency)"
)


def _is_baseline(value: Any) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float, Tensor)) or callable(value)):
        raise ValueError(f"must be a number, a tensor or a callable, got {value!r}")


def _is_layer(value: Any) -> None:
    if value is not None and not isinstance(value, (str, nn.Module)):
        raise ValueError(f"must be None, a module name or a module, got {value!r}")


_is_interpolate_mode = is_one_of("bilinear", "bicubic", "nearest", "area")

#: The checks shared by the noise-tunnel adapters (``smoothgrad``, ``smoothfullgrad``).
_NOISE_CHECKS: Dict[str, ParameterCheck] = {
    "nt_samples": is_positive_int,
    "noise": is_non_negative,
    "nt_samples_batch_size": is_optional(is_positive_int),
    "seed": is_int_or_none,
}
#: The checks shared by the FullGrad adapters.
_FULLGRAD_CHECKS: Dict[str, ParameterCheck] = {
    "postprocess": is_one_of("eq4", "neurips2019"),
    "interpolate_mode": _is_interpolate_mode,
    "internal_batch_size": is_optional(is_positive_int),
}


@register_method(
    "saliency",
    label="Gradient",
    description="|d f / d x|, maximum over colour channels",
    reference=_SIMONYAN,
    checks={"reduce": is_one_of("max", "sum")},
)
def _saliency(model: Any, inputs: Tensor, target: Any, *, reduce: str = "max") -> Tensor:
    return _captum_channel_abs(Saliency(model), inputs, target, reduce, abs=True)


@register_method(
    "input_x_gradient",
    label="Input × gradient",
    description="|x * d f / d x| summed over channels",
    reference=_SHRIKUMAR,
)
def _input_x_gradient(model: Any, inputs: Tensor, target: Any) -> Tensor:
    return _captum_channel_abs(InputXGradient(model), inputs, target)


@register_method(
    "guided_backprop",
    label="Guided backprop",
    description="|guided backpropagation| summed over channels",
    reference=_SPRINGENBERG,
)
def _guided_backprop(model: Any, inputs: Tensor, target: Any) -> Tensor:
    return _captum_channel_abs(GuidedBackprop(model), inputs, target)


@register_method(
    "integrated_gradients",
    label="Integrated gradients",
    description="|integrated gradients| from a baseline (default zeros) summed over channels",
    reference=_SUNDARARAJAN,
    checks={
        "n_steps": is_positive_int,
        "internal_batch_size": is_optional(is_positive_int),
        "method": is_one_of(
            "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"
        ),
        "baseline": _is_baseline,
    },
    passes="n_steps",  # one forward and backward pass per point of the path integral
    fast_params={"n_steps": 8},
)
def _integrated_gradients(
    model: Any,
    inputs: Tensor,
    target: Any,
    *,
    n_steps: int = 50,
    baseline: Union[float, Tensor, Callable[[Tensor], Tensor]] = 0.0,
    method: str = "gausslegendre",
    internal_batch_size: Optional[int] = 32,
) -> Tensor:
    if callable(baseline) and not isinstance(baseline, Tensor):
        baseline = baseline(inputs)
    if isinstance(baseline, Tensor):
        baseline = baseline.to(device=inputs.device, dtype=inputs.dtype)
        if baseline.dim() == inputs.dim() - 1:
            baseline = baseline.unsqueeze(0)
    else:
        baseline = float(baseline)
    batch = inputs.shape[0]
    if internal_batch_size is not None and batch > internal_batch_size:
        # Captum needs internal_batch_size >= the number of examples (it warns and
        # evaluates all examples at once otherwise): split the examples instead, so the
        # bound on images per forward pass holds.
        parts = []
        for start in range(0, batch, internal_batch_size):
            stop = min(start + internal_batch_size, batch)
            part_baseline = baseline
            if isinstance(baseline, Tensor) and baseline.shape[0] == batch and batch > 1:
                part_baseline = baseline[start:stop]
            parts.append(
                _integrated_gradients(
                    model,
                    inputs[start:stop],
                    _validation.slice_target(target, start, stop, batch),
                    n_steps=n_steps,
                    baseline=part_baseline,
                    method=method,
                    internal_batch_size=internal_batch_size,
                )
            )
        return torch.cat(parts)
    return _captum_channel_abs(
        IntegratedGradients(model),
        inputs,
        target,
        baselines=baseline,
        n_steps=n_steps,
        method=method,
        internal_batch_size=internal_batch_size,
    )


#: Default bound on the noisy images of one attribution call in the SmoothGrad adapters:
#: memory grows with the images of a call (about 45 MB per 64 px image for FullGrad on
#: the shapes model, about 120 MB per 224 px image for VGG-16-BN on a GPU).
NOISY_IMAGES_PER_CALL = 64


def smoothing_noise(inputs: Tensor, nt_samples: int, noise: float, seed: Optional[int]) -> Tensor:
    """Gaussian noise ``(nt_samples, *inputs.shape)`` whose standard deviation is ``noise``
    times each example's value range ``max - min`` (Smilkov et al. 2017, sec. 3.2).

    Drawn on the CPU from its own generator when ``seed`` is given, so the same seed gives
    the same noise on every device and the global random state is left alone.
    """
    scale = noise * (inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1))
    shape = (nt_samples, *inputs.shape)
    if seed is None:
        draws = torch.randn(shape, device=inputs.device, dtype=inputs.dtype)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        draws = torch.randn(shape, generator=generator, dtype=inputs.dtype).to(inputs.device)
    return draws * scale.view(1, -1, *([1] * (inputs.dim() - 1)))


def _tile_target(target: Any, copies: int) -> Any:
    """A per-example target repeated for ``copies`` sample-major copies of the batch."""
    if isinstance(target, Tensor) and target.numel() > 1:
        return target.reshape(-1).repeat(copies)
    if isinstance(target, list):
        return target * copies
    return target


def _noise_tunnel(
    attribution: Any,
    inputs: Tensor,
    target: Any,
    *,
    nt_samples: int,
    noise: float,
    nt_samples_batch_size: Optional[int],
    seed: Optional[int],
    **kwargs: Any,
) -> Tensor:
    """SmoothGrad: the mean attribution of ``nt_samples`` noisy copies of every example.

    What Captum's ``NoiseTunnel(nt_type="smoothgrad")`` computes, with the noise's standard
    deviation relative to each example's range (NoiseTunnel takes one value per input
    tensor); every example's copies go through the attribution together, at most
    ``nt_samples_batch_size`` samples of the whole batch per call (Captum's meaning); by
    default as many samples as keep a call within :data:`NOISY_IMAGES_PER_CALL` images,
    and at least one.
    """
    target = _resolve_target_for_copies(target)
    noise_draws = smoothing_noise(inputs, nt_samples, noise, seed)
    per_call = nt_samples_batch_size or max(1, NOISY_IMAGES_PER_CALL // inputs.shape[0])
    total: Optional[Tensor] = None
    with _Quiet():
        for start in range(0, nt_samples, per_call):
            chunk = noise_draws[start : start + per_call]
            copies = chunk.shape[0]
            noisy = (inputs.unsqueeze(0) + chunk).reshape(
                copies * inputs.shape[0], *inputs.shape[1:]
            )
            result = attribution.attribute(
                _grad_input(noisy), target=_tile_target(target, copies), **kwargs
            )
            summed = result.reshape(copies, inputs.shape[0], *result.shape[1:]).sum(0)
            total = summed if total is None else total + summed
    assert total is not None
    return total / nt_samples


def _resolve_target_for_copies(target: Any) -> Any:
    if isinstance(target, Tensor) and target.numel() == 1:
        return int(target.reshape(-1)[0])
    return target


@register_method(
    "smoothgrad",
    label="SmoothGrad",
    description="mean |gradient| over noisy copies (noise std = 15 % of the input range), "
    "summed over channels",
    reference=_SMILKOV,
    checks={**_NOISE_CHECKS, "abs_before_mean": is_one_of(True, False)},
    stochastic=True,
    passes="nt_samples",  # one gradient per noisy copy
    samples_param="nt_samples",
    fast_params={"nt_samples": 4},
)
def _smoothgrad(
    model: Any,
    inputs: Tensor,
    target: Any,
    *,
    nt_samples: int = 50,
    noise: float = 0.15,
    abs_before_mean: bool = True,
    nt_samples_batch_size: Optional[int] = None,
    seed: Optional[int] = 0,
) -> Tensor:
    attribution = _noise_tunnel(
        Saliency(model),
        inputs,
        target,
        nt_samples=nt_samples,
        noise=noise,
        nt_samples_batch_size=nt_samples_batch_size,
        seed=seed,
        abs=abs_before_mean,
    )
    return _channel_abs(attribution)


# Last convolution of each model and input shape, found once by a forward pass.
_LAST_CONV: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple[Any, ...], str]]" = (
    weakref.WeakKeyDictionary()
)


def find_last_conv(model: nn.Module, inputs: Tensor) -> Tuple[str, nn.Module]:
    """The last :class:`torch.nn.Conv2d` that runs in ``model``'s forward pass on ``inputs``.

    Found with forward hooks on one example (under :func:`torch.no_grad`), so the order of
    execution counts, not the order of definition: a convolution defined last but unused,
    or defined early and called last, is handled. The result is cached per model and
    input shape.

    Returns:
        ``(qualified name, module)``.

    Raises:
        ValueError: no ``nn.Conv2d`` runs in the forward pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Grad-CAM needs an nn.Module to find its last convolution, got {type(model).__name__}"
        )
    key = (tuple(inputs.shape[1:]), inputs.dtype, str(inputs.device))
    cached = _LAST_CONV.get(model, {}).get(key)
    modules = dict(model.named_modules())
    if cached is not None and cached in modules:
        return cached, modules[cached]
    executed: List[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: executed.append(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(inputs[:1].detach())
    finally:
        for handle in handles:
            handle.remove()
    if not executed:
        raise ValueError(
            f"Grad-CAM: no nn.Conv2d runs in the forward pass of {type(model).__name__}; "
            "pass layer=<module or module name> to get_method('gradcam', layer=...)"
        )
    _LAST_CONV.setdefault(model, {})[key] = executed[-1]
    return executed[-1], modules[executed[-1]]


@register_method(
    "gradcam",
    label="Grad-CAM",
    description="ReLU'd Grad-CAM of the last convolution that runs, bilinearly upsampled",
    reference=_SELVARAJU,
    checks={"layer": _is_layer, "interpolate_mode": _is_interpolate_mode},
)
def _gradcam(
    model: Any,
    inputs: Tensor,
    target: Any,
    *,
    layer: Union[None, str, nn.Module] = None,
    interpolate_mode: str = "bilinear",
) -> Tensor:
    if layer is None:
        # A token model (ViT, Swin): its last convolution is the patch embedding, so read the
        # tokens of its last block on their grid instead (or refuse, saying why).
        from .._token_grid import find_token_layer, token_gradcam

        tokens = find_token_layer(model, inputs, target)
        if tokens is not None:
            cam = token_gradcam(model, inputs, target, tokens)
            size = tuple(inputs.shape[2:])
            return LayerAttribution.interpolate(cam, size, interpolate_mode).clamp(min=0)
        _, module = find_last_conv(model, inputs)
    elif isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"gradcam: the model has no module named {layer!r}")
        module = modules[layer]
    else:
        module = layer
    with _Quiet():
        cam = LayerGradCam(model, module).attribute(
            _grad_input(inputs), target=target, relu_attributions=True
        )
    if cam.dim() != 4:
        raise ValueError(
            f"gradcam: layer output must be (B, C, h, w); its Grad-CAM has shape {tuple(cam.shape)}"
        )
    cam = LayerAttribution.interpolate(
        cam, tuple(inputs.shape[2:]), interpolate_mode=interpolate_mode
    )
    return cam.clamp(min=0)  # bicubic interpolation can undershoot zero


@register_method(
    "fullgrad",
    label="FullGrad",
    description="eq. 4: |x * grad| + sum of |channel-summed bias-Jacobians|",
    reference=_SRINIVAS,
    checks={**_FULLGRAD_CHECKS, "include_input_gradient": is_one_of(True, False)},
)
def _fullgrad(
    model: Any,
    inputs: Tensor,
    target: Any,
    *,
    postprocess: str = "eq4",
    interpolate_mode: str = "bilinear",
    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    internal_batch_size: Optional[int] = None,
    include_input_gradient: bool = True,
) -> Tensor:
    return FullGradient(model, layers=layers).attribute(
        inputs,
        target=target,
        single_channel=True,
        include_input_gradient=include_input_gradient,
        postprocess=postprocess,
        interpolate_mode=interpolate_mode,
        internal_batch_size=internal_batch_size,
    )


@register_method(
    "fullgrad_bias",
    label="Bias-Jacobian",
    description="eq. 4 without the input-gradient term: bias-Jacobian maps only",
    reference=_SRINIVAS,
    checks=_FULLGRAD_CHECKS,
)
def _fullgrad_bias(
    model: Any,
    inputs: Tensor,
    target: Any,
    *,
    postprocess: str = "eq4",
    interpolate_mode: str = "bilinear",
    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    internal_batch_size: Optional[int] = None,
) -> Tensor:
    return _fullgrad(
        model,
        inputs,
        target,
        postprocess=postprocess,
        interpolate_mode=interpolate_mode,
        layers=layers,
        internal_batch_size=internal_batch_size,
        include_input_gradient=False,
    )


@register_method(
    "smoothfullgrad",
    label="SmoothFullGrad",
    description="mean FullGrad map over noisy copies (NoiseTunnel, noise std = 15 % of the "
    "input range)",
    reference=_SRINIVAS_SMOOTH,
    checks={
        **_NOISE_CHECKS,
        "postprocess": _FULLGRAD_CHECKS["postprocess"],
        "interpolate_mode": _is_interpolate_mode,
    },
    stochastic=True,
    passes="nt_samples",  # one FullGrad (a forward and a backward pass) per noisy copy
    samples_param="nt_samples",
    fast_params={"nt_samples": 4},
)
def _smoothfullgrad(
    model: Any,
    inputs: Tensor,
    target: Any,
    *,
    nt_samples: int = 25,
    noise: float = 0.15,
    postprocess: str = "eq4",
    interpolate_mode: str = "bilinear",
    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    nt_samples_batch_size: Optional[int] = None,
    seed: Optional[int] = 0,
) -> Tensor:
    return _noise_tunnel(
        FullGradient(model, layers=layers),
        inputs,
        target,
        nt_samples=nt_samples,
        noise=noise,
        nt_samples_batch_size=nt_samples_batch_size,
        seed=seed,
        single_channel=True,
        postprocess=postprocess,
        interpolate_mode=interpolate_mode,
    )
