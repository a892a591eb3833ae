"""A registry of saliency methods with one output convention, for side-by-side comparisons.

Every method is a callable ``(model, inputs, target) -> Tensor`` that returns a
**non-negative saliency map of shape ``(B, 1, H, W)``**, float32, detached, on the
input's device: the method's conventional display form (for gradient-type methods the
absolute attribution summed over colour channels, for Grad-CAM the rectified and
upsampled class activation map, for FullGrad eq. 4's map). Comparison figures,
benchmarks and evaluation metrics can then treat all methods alike.

Built-in methods (see ``docs/methods.md`` for the defaults and the papers they follow):

=======================  ===========================================================
name                     what it computes
=======================  ===========================================================
``saliency``             ``|grad|``, max over channels (Simonyan et al., 2014)
``input_x_gradient``     ``|x * grad|`` summed over channels
``guided_backprop``      ``|guided backprop|`` summed over channels (Springenberg et al.)
``integrated_gradients`` ``|IG|`` summed over channels (Sundararajan et al., 2017)
``smoothgrad``           mean over noisy copies of ``|grad|``, summed over channels
                         (Smilkov et al., 2017)
``gradcam``              Grad-CAM on the last convolution, upsampled (Selvaraju et al.)
``fullgrad``             eq. 4 of Srinivas & Fleuret (2019), single channel
``fullgrad_bias``        eq. 4 without the input-gradient term (bias-Jacobians only)
``smoothfullgrad``       FullGrad averaged over noisy copies (NoiseTunnel)
=======================  ===========================================================

Each built-in has parameters with paper-following defaults; ``get_method(name, **params)``
gives a configured variant. Users add their own with :func:`register_method`.

Example::

    >>> from captum_fullgrad.methods import get_method, register_method
    >>> ig = get_method("integrated_gradients", n_steps=20)
    >>> maps = ig(model, images, target=labels)          # (B, 1, H, W), >= 0
    >>> def edges(model, inputs, target):                # any (model, x, target) -> map
    ...     return inputs.diff(dim=-1, append=inputs[..., -1:]).abs().sum(1, keepdim=True)
    >>> register_method("edges", edges, label="Edges")
"""

from __future__ import annotations

import inspect
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

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

from . import _validation
from .full_gradient import FullGradient

__all__ = [
    "AttributionMethod",
    "DEFAULT_TABLE5_METHODS",
    "MapFunction",
    "available_methods",
    "find_last_conv",
    "get_method",
    "register_method",
    "smoothing_noise",
    "unregister_method",
]

#: A saliency method: ``fn(model, inputs, target) -> (B, 1, H, W)`` non-negative map.
MapFunction = Callable[[Any, Tensor, Any], Tensor]

#: The columns of the seed paper's Table 5, in its order.
DEFAULT_TABLE5_METHODS: Tuple[str, ...] = (
    "guided_backprop",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "fullgrad",
    "fullgrad_bias",
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class AttributionMethod:
    """A registered saliency method, possibly configured with non-default parameters.

    Call it as ``method(model, inputs, target=None)``. The wrapper enforces the output
    convention: ``target=None`` explains the predicted class (argmax of the model's
    output), gradients are enabled even under :func:`torch.no_grad`, and the result is
    checked to be a ``(B, 1, H, W)`` non-negative finite map, returned as float32,
    detached, on the input's device.

    Attributes:
        name: registry key, e.g. ``"integrated_gradients"``.
        label: short human-readable name for figure titles, e.g. ``"Integrated gradients"``.
        fn: the underlying function ``fn(model, inputs, target, **parameters)``.
        description: one line on what the map is.
        reference: the paper the method and its defaults follow.
        defaults: every parameter of ``fn`` and its default value.
        params: the parameters set for this variant (overriding ``defaults``).
    """

    name: str
    label: str
    fn: Callable[..., Tensor]
    description: str = ""
    reference: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> Dict[str, Any]:
        """The effective parameters: ``defaults`` updated with ``params``."""
        return {**self.defaults, **self.params}

    def configure(self, **params: Any) -> "AttributionMethod":
        """A copy of this method with some parameters changed (checked like :func:`get_method`)."""
        return _configured(self, {**self.params, **params})

    def __call__(self, model: Any, inputs: Tensor, target: Any = None) -> Tensor:
        """The ``(B, 1, H, W)`` map of ``inputs`` for ``target`` (None: the predicted class)."""
        x = _check_inputs(inputs, self.name)
        with torch.enable_grad():
            target = _resolve_target(model, x, target)
            result = self.fn(model, x, target, **self.params)
        return _check_output(result, x, self.name)

    def __hash__(self) -> int:  # the parameter mappings are not hashable
        return hash((self.name, self.fn))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"AttributionMethod({self.name!r}{', ' + shown if shown else ''})"


@dataclass(frozen=True)
class _Entry:
    method: AttributionMethod
    validate: Optional[Callable[..., None]] = None


_REGISTRY: Dict[str, _Entry] = {}


def _normalise_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("-", "_")


def _keyword_defaults(fn: Callable[..., Any]) -> Dict[str, Any]:
    """Parameters of ``fn`` beyond ``(model, inputs, target)`` that have defaults."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    defaults = {}
    for index, parameter in enumerate(signature.parameters.values()):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if index < 3 and parameter.kind != parameter.KEYWORD_ONLY:
            continue
        if parameter.default is not parameter.empty:
            defaults[parameter.name] = parameter.default
    return defaults


def register_method(
    name: str,
    fn: Callable[..., Tensor],
    label: Optional[str] = None,
    overwrite: bool = False,
    *,
    description: str = "",
    reference: str = "",
) -> AttributionMethod:
    """Add a saliency method to the registry.

    Args:
        name: registry key: lower-case letters, digits and underscores, starting with a
            letter (``"-"`` is read as ``"_"``; case is ignored).
        fn: ``fn(model, inputs, target, **parameters) -> Tensor`` returning a non-negative
            ``(B, 1, H, W)`` map. ``target`` is already resolved (an int, a ``(B,)``
            tensor or whatever the caller passed; ``None`` becomes the predicted class).
            Keyword parameters with defaults become the method's parameters, settable
            with ``get_method(name, param=value)``.
        label: title used in figures; default: ``name``.
        overwrite: replace an existing method of that name (built-ins included).
        description: one line on what the map shows.
        reference: where the method comes from.

    Returns:
        The registered :class:`AttributionMethod` (with default parameters).

    Raises:
        ValueError: bad name, or the name is taken and ``overwrite`` is False.
        TypeError: ``fn`` is not callable.
    """
    return _register(name, fn, label, overwrite, description, reference, None)


def _register(
    name: str,
    fn: Callable[..., Tensor],
    label: Optional[str],
    overwrite: bool,
    description: str,
    reference: str,
    validate: Optional[Callable[..., None]],
) -> AttributionMethod:
    key = _normalise_name(name)
    if not _NAME_RE.match(key):
        raise ValueError(
            f"invalid method name {name!r}: use lower-case letters, digits and underscores, "
            "starting with a letter"
        )
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if key in _REGISTRY and not overwrite:
        raise ValueError(
            f"a method named {key!r} is already registered; pass overwrite=True to replace it"
        )
    method = AttributionMethod(
        name=key,
        label=label if label is not None else key,
        fn=fn,
        description=description,
        reference=reference,
        defaults=_keyword_defaults(fn),
    )
    _REGISTRY[key] = _Entry(method, validate)
    return method


def unregister_method(name: str) -> None:
    """Remove a method from the registry (raises ValueError if unknown)."""
    key = _normalise_name(name)
    _lookup(key)
    del _REGISTRY[key]


def available_methods() -> List[str]:
    """Registered method names, built-ins first, in registration order."""
    return list(_REGISTRY)


def _lookup(key: str) -> _Entry:
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {key!r}; registered methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def get_method(name: Union[str, AttributionMethod], **params: Any) -> AttributionMethod:
    """The registered method ``name``, configured with ``params`` (others keep their defaults).

    Args:
        name: a name from :func:`available_methods` (case-insensitive, ``-`` = ``_``), or
            an :class:`AttributionMethod`, returned as is (or reconfigured with ``params``).
        **params: parameter overrides, e.g. ``get_method("integrated_gradients", n_steps=20)``.

    Raises:
        ValueError: unknown method name (the message lists the registered names), unknown
            parameter name (the message lists the method's parameters), or a bad value.
    """
    if isinstance(name, AttributionMethod):
        return name.configure(**params) if params else name
    entry = _lookup(_normalise_name(name))
    return _configured(entry.method, params) if params else entry.method


def _configured(method: AttributionMethod, params: Mapping[str, Any]) -> AttributionMethod:
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        accepted = ", ".join(method.defaults) or "none"
        raise ValueError(
            f"method {method.name!r} has no parameter {', '.join(repr(u) for u in unknown)}; "
            f"its parameters are: {accepted}"
        )
    entry = _REGISTRY.get(method.name)
    if entry is not None and entry.validate is not None and entry.method.fn is method.fn:
        entry.validate(**{**method.defaults, **params})
    return AttributionMethod(
        name=method.name,
        label=method.label,
        fn=method.fn,
        description=method.description,
        reference=method.reference,
        defaults=method.defaults,
        params=dict(params),
    )


# --------------------------------------------------------------------------------------
# Conventions shared by every method
# --------------------------------------------------------------------------------------


def _check_inputs(inputs: Any, name: str) -> Tensor:
    if isinstance(inputs, tuple) and len(inputs) == 1:
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"method {name!r} expects an image tensor (B, C, H, W), got {type(inputs).__name__}"
        )
    if inputs.dim() != 4 or inputs.shape[0] == 0:
        raise ValueError(
            f"method {name!r} expects images of shape (B, C, H, W), got {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise TypeError(f"method {name!r} needs floating-point images, got dtype {inputs.dtype}")
    return inputs.detach()


def _resolve_target(model: Any, inputs: Tensor, target: Any) -> Any:
    """``None`` becomes the predicted class of each example (for models returning ``(B, K)``)."""
    if target is not None:
        return target
    with torch.no_grad():
        output = model(inputs)
    if isinstance(output, Tensor) and output.dim() == 2 and output.shape[1] > 1:
        return output.argmax(dim=1)
    return None


def _check_output(result: Any, inputs: Tensor, name: str) -> Tensor:
    if isinstance(result, tuple) and len(result) == 1:
        result = result[0]
    if not isinstance(result, Tensor):
        raise TypeError(f"method {name!r} returned {type(result).__name__}, expected a tensor")
    expected = (inputs.shape[0], 1, *inputs.shape[2:])
    if tuple(result.shape) != expected:
        raise ValueError(
            f"method {name!r} returned a map of shape {tuple(result.shape)}, expected {expected}"
        )
    result = result.detach().to(device=inputs.device, dtype=torch.float32)
    if not torch.isfinite(result).all():
        raise ValueError(f"method {name!r} returned NaN or infinite values")
    if (result < 0).any():
        raise ValueError(
            f"method {name!r} returned negative values; a saliency map must be non-negative "
            "(take .abs() or clamp(min=0))"
        )
    return result


def _channel_abs(attribution: Tensor, reduce: str = "sum") -> Tensor:
    """``|attribution|`` reduced over the channel dimension, ``(B, 1, H, W)``."""
    magnitude = attribution.abs()
    if reduce == "max":
        return magnitude.amax(dim=1, keepdim=True)
    return magnitude.sum(dim=1, keepdim=True)


def _grad_input(x: Tensor) -> Tensor:
    """A leaf copy of ``x`` that requires grad (Captum then does not warn)."""
    return x.detach().clone().requires_grad_(True)


class _Quiet:
    def __enter__(self) -> None:
        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.filterwarnings("ignore", message=r".*did not already require gradients.*")
        warnings.filterwarnings("ignore", message=r".*Setting backward hooks on ReLU activations.*")

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


def _positive_int(name: str, value: Any, method: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method}: {name} must be a positive integer, got {value!r}")


def _optional_positive_int(name: str, value: Any, method: str) -> None:
    if value is not None:
        _positive_int(name, value, method)


def _non_negative(name: str, value: Any, method: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(f"{method}: {name} must be a finite number >= 0, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[Any], method: str) -> None:
    if value not in choices:
        raise ValueError(f"{method}: {name} must be one of {list(choices)}, got {value!r}")


# --------------------------------------------------------------------------------------
# Built-in methods
# --------------------------------------------------------------------------------------


def _saliency(model: Any, inputs: Tensor, target: Any, *, reduce: str = "max") -> Tensor:
    with _Quiet():
        gradient = Saliency(model).attribute(_grad_input(inputs), target=target, abs=True)
    return _channel_abs(gradient, reduce)


def _check_saliency(*, reduce: str) -> None:
    _choice("reduce", reduce, ("max", "sum"), "saliency")


def _input_x_gradient(model: Any, inputs: Tensor, target: Any) -> Tensor:
    with _Quiet():
        attribution = InputXGradient(model).attribute(_grad_input(inputs), target=target)
    return _channel_abs(attribution)


def _guided_backprop(model: Any, inputs: Tensor, target: Any) -> Tensor:
    with _Quiet():
        attribution = GuidedBackprop(model).attribute(_grad_input(inputs), target=target)
    return _channel_abs(attribution)


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
    with _Quiet():
        attribution = IntegratedGradients(model).attribute(
            _grad_input(inputs),
            baselines=baseline,
            target=target,
            n_steps=n_steps,
            method=method,
            internal_batch_size=internal_batch_size,
        )
    return _channel_abs(attribution)


def _check_integrated_gradients(
    *, n_steps: Any, baseline: Any, method: Any, internal_batch_size: Any
) -> None:
    name = "integrated_gradients"
    _positive_int("n_steps", n_steps, name)
    _optional_positive_int("internal_batch_size", internal_batch_size, name)
    _choice(
        "method",
        method,
        ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"),
        name,
    )
    if not (isinstance(baseline, (int, float, Tensor)) or callable(baseline)) or isinstance(
        baseline, bool
    ):
        raise ValueError(
            f"{name}: baseline must be a number, a tensor or a callable, got {baseline!r}"
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


def _check_noise(
    name: str, nt_samples: Any, noise: Any, nt_samples_batch_size: Any, seed: Any
) -> None:
    _positive_int("nt_samples", nt_samples, name)
    _non_negative("noise", noise, name)
    _optional_positive_int("nt_samples_batch_size", nt_samples_batch_size, name)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{name}: seed must be an integer or None, got {seed!r}")


def _check_smoothgrad(
    *, nt_samples: Any, noise: Any, abs_before_mean: Any, nt_samples_batch_size: Any, seed: Any
) -> None:
    _check_noise("smoothgrad", nt_samples, noise, nt_samples_batch_size, seed)
    _choice("abs_before_mean", abs_before_mean, (True, False), "smoothgrad")


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


def _gradcam(
    model: Any,
    inputs: Tensor,
    target: Any,
    *,
    layer: Union[None, str, nn.Module] = None,
    interpolate_mode: str = "bilinear",
) -> Tensor:
    if layer is None:
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


def _check_gradcam(*, layer: Any, interpolate_mode: Any) -> None:
    if layer is not None and not isinstance(layer, (str, nn.Module)):
        raise ValueError(f"gradcam: layer must be None, a module name or a module, got {layer!r}")
    _choice(
        "interpolate_mode", interpolate_mode, ("bilinear", "bicubic", "nearest", "area"), "gradcam"
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


def _check_fullgrad_common(
    name: str, postprocess: Any, interpolate_mode: Any, internal_batch_size: Any
) -> None:
    _choice("postprocess", postprocess, ("eq4", "neurips2019"), name)
    _choice("interpolate_mode", interpolate_mode, ("bilinear", "bicubic", "nearest", "area"), name)
    _optional_positive_int("internal_batch_size", internal_batch_size, name)


def _check_fullgrad(
    *,
    postprocess: Any,
    interpolate_mode: Any,
    layers: Any,
    internal_batch_size: Any,
    include_input_gradient: Any,
) -> None:
    _check_fullgrad_common("fullgrad", postprocess, interpolate_mode, internal_batch_size)
    _choice("include_input_gradient", include_input_gradient, (True, False), "fullgrad")


def _check_fullgrad_bias(
    *, postprocess: Any, interpolate_mode: Any, layers: Any, internal_batch_size: Any
) -> None:
    _check_fullgrad_common("fullgrad_bias", postprocess, interpolate_mode, internal_batch_size)


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


def _check_smoothfullgrad(
    *,
    nt_samples: Any,
    noise: Any,
    postprocess: Any,
    interpolate_mode: Any,
    layers: Any,
    nt_samples_batch_size: Any,
    seed: Any,
) -> None:
    _check_noise("smoothfullgrad", nt_samples, noise, nt_samples_batch_size, seed)
    _check_fullgrad_common("smoothfullgrad", postprocess, interpolate_mode, None)


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

_BUILTINS = (
    (
        "saliency",
        _saliency,
        "Gradient",
        "|d f / d x|, maximum over colour channels",
        _SIMONYAN,
        _check_saliency,
    ),
    (
        "input_x_gradient",
        _input_x_gradient,
        "Input × gradient",
        "|x * d f / d x| summed over channels",
        _SHRIKUMAR,
        None,
    ),
    (
        "guided_backprop",
        _guided_backprop,
        "Guided backprop",
        "|guided backpropagation| summed over channels",
        _SPRINGENBERG,
        None,
    ),
    (
        "integrated_gradients",
        _integrated_gradients,
        "Integrated gradients",
        "|integrated gradients| from a baseline (default zeros) summed over channels",
        _SUNDARARAJAN,
        _check_integrated_gradients,
    ),
    (
        "smoothgrad",
        _smoothgrad,
        "SmoothGrad",
        "mean |gradient| over noisy copies (noise std = 15 % of the input range), "
        "summed over channels",
        _SMILKOV,
        _check_smoothgrad,
    ),
    (
        "gradcam",
        _gradcam,
        "Grad-CAM",
        "ReLU'd Grad-CAM of the last convolution that runs, bilinearly upsampled",
        _SELVARAJU,
        _check_gradcam,
    ),
    (
        "fullgrad",
        _fullgrad,
        "FullGrad",
        "eq. 4: |x * grad| + sum of |channel-summed bias-Jacobians|",
        _SRINIVAS,
        _check_fullgrad,
    ),
    (
        "fullgrad_bias",
        _fullgrad_bias,
        "Bias-Jacobian",
        "eq. 4 without the input-gradient term: bias-Jacobian maps only",
        _SRINIVAS,
        _check_fullgrad_bias,
    ),
    (
        "smoothfullgrad",
        _smoothfullgrad,
        "SmoothFullGrad",
        "mean FullGrad map over noisy copies (NoiseTunnel, noise std = 15 % of the input range)",
        _SRINIVAS_SMOOTH,
        _check_smoothfullgrad,
    ),
)

for _name, _fn, _label, _description, _reference, _validate in _BUILTINS:
    _register(_name, _fn, _label, False, _description, _reference, _validate)
del _name, _fn, _label, _description, _reference, _validate
