"""Intercepts of single operations: ``c_g = g(a) - J_g(a) a`` (seed section 3.2, docs/math.md).

Every operation ``y = g(a)`` of the forward pass whose inputs ``a`` depend on the network
input is linearised exactly at the current point, ``y = J_g(a) a + c_g``; chaining these
linear parts through the graph gives eq. 1 of the seed paper,
``f(x) = <grad_x f, x> + sum_g <df/dy_g, c_g>``, with no approximation.

This module decides ``c_g`` for one call. It knows closed forms for the operations that
dominate real networks and whose intercept is a per-channel vector (convolution and linear
biases, BatchNorm's effective bias in eval mode), for operations whose intercept is zero
(positively homogeneous of degree one: ReLU, pooling, views, sums, eval dropout, products
with a constant), for affine combinations with constants (adding a constant, concatenating
a constant such as a class token) and for products of graph tensors (``a * b``, ``a @ b``:
degree-``k`` multilinear maps have ``c = (1 - k) g(a)``). Everything else is linearised by
forward-mode automatic differentiation, ``J_g(a) a = jvp(g, a, a)``, which uses PyTorch's own
derivative formulas and so agrees with the backward pass that produces ``df/dy_g``.

Each closed form is one registry entry at the end of this module: :func:`register_rule`
routes torch functions to a rule of the trace, :func:`register_activation` gives an
element-wise activation its closed form in the trace and in the replay (its functional
names and its module types); see docs/extending.md.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

# Layout tags of tensors that have the network input's rank: channels first (N, C, *S)
# or channels last (N, *S, C). Anything else is not a spatial map for eq. 4.
CHANNELS_FIRST = "cf"
CHANNELS_LAST = "cl"


@dataclass
class Intercept:
    """The intercept of one output of one operation.

    Exactly one of ``channel_vector`` (an intercept constant along every axis but the
    channel axis, such as a bias) or ``dense`` (a tensor broadcastable to the output) is set.
    """

    output: Optional[Tensor]  # released once the capture has hooked it (no reference cycle)
    dense: Optional[Tensor] = None
    channel_vector: Optional[Tensor] = None
    channel_dim: Optional[int] = None  # axis of ``output`` that ``channel_vector`` runs along
    # Eval BatchNorm only: d output / d input per channel, so that a convolution's bias
    # feeding it can be folded into one reduction (df/dz_conv = scale * df/dy_bn).
    input_scale: Optional[Tensor] = None
    # A replayed element-wise activation whose intercept is never formed: during the one
    # gradient call of its source, ``(y, J^T df/dy, a)`` from its own autograd node, and
    # <df/dy, c> = <df/dy, y> - <J^T df/dy, a> element by element (docs/math.md).
    # ``a`` is ``None`` for a gated activation (hardtanh/ReLU6: the gradient passes unchanged
    # where y = a and not at all elsewhere), whose term is then (df/dy - J^T df/dy) * y.
    backward_pair: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]] = None
    # A replayed product of two graph tensors (degree 2, c = -y): during the one gradient
    # call of its source, ``y``; <df/dy, c> is then -<df/dy, y>, negated after the sums.
    negated_output: Optional[Tensor] = None
    # A replayed normalisation (c = y - (y - beta) s, s = eps / (var + eps)): during the one
    # gradient call of its source, ``normalisation_parts``' ``(y, beta, s)``; c is formed
    # only then, or not at all when s is constant along the channels (a channel sum is
    # then (1 - s) sum_c g y + s sum_c g beta).
    shrunk_output: Optional[Tuple[Tensor, Optional[Tensor], Tensor]] = None
    # Memory that the element-wise term's full-size temporary may be formed in (a
    # replay's :class:`captum_fullgrad.capture.Workspace`), during the same gradient call.
    workspace: Optional[Any] = None


@dataclass
class OpResult:
    """What a rule returns: the operation's result and the intercepts of its graph outputs.

    ``layout`` overrides the layout inferred for the outputs (convolutions and pooling are
    channels-first whatever their input); ``failed`` names an op whose intercept could not
    be computed, so that the completeness gap is reported, never hidden.
    """

    value: Any
    intercepts: List[Intercept]
    layout: Optional[str] = None
    failed: Optional[str] = None


class Context:
    """What a rule may ask of the capture: whether a tensor depends on the network input."""

    def is_graph(self, value: Any) -> bool:  # pragma: no cover - implemented by the capture
        raise NotImplementedError

    def graph_outputs(self, value: Any) -> List[Tensor]:
        """The tensors of ``value`` that carry gradient back to the network input."""
        # Fast paths first: this runs once per operation of the forward pass.
        if isinstance(value, Tensor):
            return [value] if _is_graph_output(value) else []
        if isinstance(value, (tuple, list)) and all(isinstance(v, Tensor) for v in value):
            return [v for v in value if _is_graph_output(v)]
        if not isinstance(value, (tuple, list, dict)):
            return []  # .dim(), .shape, None from __setitem__...
        flat, _ = tree_flatten(value)
        return [t for t in flat if _is_graph_output(t)]


def op_name(func: Callable) -> str:
    """A short readable name: ``Tensor.__imul__`` -> ``mul``, ``F.conv2d`` -> ``conv2d``."""
    name = getattr(func, "__name__", type(func).__name__)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in _BINARY_DUNDER:
            name = name[1:]
        elif name.startswith("r") and name[1:] in _BINARY_DUNDER:
            name = name[1:]
    return name.rstrip("_") or name


_BINARY_DUNDER = {
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "matmul",
    "pow",
    "mod",
    "and",
    "or",
    "xor",
}
_INPLACE_DUNDER = {f"__i{n}__" for n in _BINARY_DUNDER} | {"__setitem__"}
_INPLACE_POSITION: Dict[Callable, Optional[int]] = {}


def is_inplace(func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """Whether ``func`` overwrites its first argument (``relu_``, ``x += y``, ``inplace=True``)."""
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDER or (name.endswith("_") and not name.startswith("_")):
        return True
    if kwargs.get("inplace", False):
        return True
    try:
        position = _INPLACE_POSITION[func]
    except (KeyError, TypeError):
        position = None
        try:
            parameters = list(inspect.signature(func).parameters)
            if "inplace" in parameters:
                position = parameters.index("inplace")
        except (TypeError, ValueError):
            pass
        try:
            _INPLACE_POSITION[func] = position
        except TypeError:
            pass
    return position is not None and len(args) > position and bool(args[position])


def _arg(
    args: Sequence[Any], kwargs: Dict[str, Any], index: int, name: str, default: Any = None
) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# --------------------------------------------------------------------------- rules
# A rule has the signature (ctx, func, args, kwargs) -> OpResult and is only called when at
# least one argument is a graph tensor.


def _zero(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    """Positively homogeneous of degree one in its graph inputs: no intercept."""
    return OpResult(func(*args, **kwargs), [])


def _channel_first_zero(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> OpResult:
    """Pooling, resizing: no intercept, and the output is channels-first."""
    return OpResult(func(*args, **kwargs), [], layout=CHANNELS_FIRST)


def _biased_linear_map(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any], channels_last: bool
) -> OpResult:
    """``W a + b`` with a constant ``W`` (convolution, linear): the intercept is the bias,
    along the output's channel axis (axis 1 for convolutions, the last for ``F.linear``)."""
    weight = _arg(args, kwargs, 1, "weight")
    if ctx.is_graph(weight):  # a weight computed from the input: bilinear, not affine
        return _generic(ctx, func, args, kwargs)
    bias = _arg(args, kwargs, 2, "bias")
    out = func(*args, **kwargs)
    intercepts = []
    if bias is not None and ctx.graph_outputs(out):
        channel_dim = out.dim() - 1 if channels_last else 1
        intercepts.append(Intercept(out, channel_vector=bias, channel_dim=channel_dim))
    return OpResult(out, intercepts, layout=None if channels_last else CHANNELS_FIRST)


def _conv(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    return _biased_linear_map(ctx, func, args, kwargs, channels_last=False)


def _linear(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    return _biased_linear_map(ctx, func, args, kwargs, channels_last=True)


def _norm_arguments(func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments of ``batch_norm``/``instance_norm`` by name: ``F.*`` take the running
    statistics before the affine terms, ``torch.*`` after them."""
    if func in (F.batch_norm, F.instance_norm):
        names = ["input", "running_mean", "running_var", "weight", "bias", "use", "momentum", "eps"]
    else:
        names = ["input", "weight", "bias", "running_mean", "running_var", "use", "momentum", "eps"]
    values = {name: _arg(args, kwargs, i, name) for i, name in enumerate(names)}
    flag = "training" if op_name(func) == "batch_norm" else "use_input_stats"
    values["use"] = _arg(args, kwargs, names.index("use"), flag, op_name(func) == "instance_norm")
    if values["eps"] is None:
        values["eps"] = 1e-5
    return values


def _batch_norm(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> OpResult:
    norm = _norm_arguments(func, args, kwargs)
    running_mean, running_var, weight, bias = (
        norm["running_mean"],
        norm["running_var"],
        norm["weight"],
        norm["bias"],
    )
    if ctx.is_graph(weight) or ctx.is_graph(bias):
        return _generic(ctx, func, args, kwargs, layout=CHANNELS_FIRST)
    if norm["use"] or running_mean is None or running_var is None:
        return _batch_norm_batch_statistics(ctx, func, args, kwargs, bias, norm["eps"])
    out = func(*args, **kwargs)
    scale, effective_bias = _batch_norm_affine(running_mean, running_var, weight, bias, norm["eps"])
    intercepts = (
        [Intercept(out, channel_vector=effective_bias, channel_dim=1, input_scale=scale)]
        if ctx.graph_outputs(out)
        else []
    )
    return OpResult(out, intercepts, layout=CHANNELS_FIRST)


def _batch_norm_batch_statistics(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any], bias: Any, eps: float
) -> OpResult:
    """BatchNorm on batch statistics (training mode), in closed form (see
    :func:`normalisation_intercept`). Unlike forward-mode AD, this stays differentiable in
    ``gamma``, ``beta`` and the batch statistics (the bias-Jacobian penalty trains through
    it), and the real call updates the running statistics once.
    """
    input_ = _arg(args, kwargs, 0, "input")
    out = func(*args, **kwargs)
    if not ctx.graph_outputs(out) or not isinstance(input_, Tensor) or input_.dim() < 2:
        return OpResult(out, [], layout=CHANNELS_FIRST)
    constant = normalisation_intercept(
        ("batch_norm", None, eps), input_, out, bias, differentiable=True
    )
    return OpResult(out, [Intercept(out, dense=constant)], layout=CHANNELS_FIRST)


def _batch_norm_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """Eval mode: y = (x - mu) * gamma / sqrt(var + eps) + beta, with the effective bias of
    seed section 3.2: ``beta - mu * gamma / sqrt(var + eps)``.

    Computed on every call, never cached: a training-mode forward pass updates the running
    statistics in place without bumping their version counter, and writes through
    ``.data`` bump nothing either, so no cheap key can tell that they changed.
    """
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    effective_bias = -running_mean * scale
    if bias is not None:
        effective_bias = effective_bias + bias
    return scale, effective_bias


def _normalisation(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> OpResult:
    """Layer, group, RMS and instance normalisation, in closed form (see
    :func:`normalisation_intercept`); forward-mode AD through ``layer_norm`` runs a Python
    decomposition."""
    a = _arg(args, kwargs, 0, "input")
    name = op_name(func)
    if name == "instance_norm":
        norm = _norm_arguments(func, args, kwargs)
        if not norm["use"]:
            return _generic(ctx, func, args, kwargs)  # running statistics: affine, rare
        weight, bias, axes, eps = norm["weight"], norm["bias"], None, norm["eps"]
    elif name == "group_norm":
        weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        axes, eps = int(_arg(args, kwargs, 1, "num_groups")), _arg(args, kwargs, 4, "eps", 1e-5)
    else:
        normalized_shape = _arg(args, kwargs, 1, "normalized_shape")
        axes = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
        weight = _arg(args, kwargs, 2, "weight")
        if name == "rms_norm":
            bias, eps = None, _arg(args, kwargs, 3, "eps", None)
        else:
            bias, eps = _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    minimum_rank = 3 if name == "instance_norm" else 2
    if (
        not isinstance(a, Tensor)
        or not a.is_floating_point()
        or a.dim() < minimum_rank
        or ctx.is_graph(weight)
        or ctx.is_graph(bias)
    ):
        return _generic(ctx, func, args, kwargs)
    value = func(*args, **kwargs)
    if not _is_graph_output(value):
        return OpResult(value, [])
    return OpResult(
        value, [Intercept(value, dense=normalisation_intercept((name, axes, eps), a, value, bias))]
    )


_PER_CHANNEL_NORMS = ("batch_norm", "group_norm", "channel_layer_norm", "instance_norm")


def normalisation_intercept(
    settings: Tuple[Any, ...],
    a: Tensor,
    y: Tensor,
    bias: Optional[Tensor],
    differentiable: bool = False,
) -> Tensor:
    """``c = y - (y - beta) eps / (var + eps)`` for ``y = gamma (a - mu) / sqrt(var + eps) + beta``.

    :func:`normalisation_parts` gives ``(y, beta, eps / (var + eps))``; this forms ``c``
    from them (see :func:`shrunk_intercept`).
    """
    return shrunk_intercept(*normalisation_parts(settings, a, y, bias, differentiable))


def shrunk_intercept(y: Tensor, beta: Optional[Tensor], shrink: Tensor) -> Tensor:
    """A normalisation's intercept from :func:`normalisation_parts`: ``y - (y - beta) shrink``."""
    normalised_part = y if beta is None else y - beta
    return y - normalised_part * shrink


def normalisation_parts(
    settings: Tuple[Any, ...],
    a: Tensor,
    y: Tensor,
    bias: Optional[Tensor],
    differentiable: bool = False,
    rstd: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``(y, beta, eps / (var + eps))`` of a normalisation, each broadcastable to ``y``
    (``beta`` ``None`` without a bias), in ``y``'s dtype; the intercept is
    ``y - (y - beta) eps / (var + eps)`` (:func:`shrunk_intercept`).

    Along ``a -> (1 + t) a`` only ``eps`` keeps the normalised part from being invariant:
    ``J a = (y - beta) eps / (var + eps)``. ``settings`` is ``(kind, axes, eps)``; the
    statistics (biased variance; RMS: the mean square, no ``mu`` and no ``beta``) run over:
    ``layer_norm``, ``rms_norm``: the last ``axes`` axes of each example; ``group_norm``:
    each of ``axes`` groups of channels; ``channel_layer_norm``: the channel axis 1
    (torchvision's ``LayerNorm2d``); ``instance_norm``: each channel's positions;
    ``batch_norm``: every axis but the channels (training mode). ``differentiable`` keeps
    the graph to ``a``, ``y`` and ``beta`` (the training uses differentiate through it).
    ``rstd``, the ``1 / sqrt(var + eps)`` the kernel computed (see
    :func:`saved_layer_norm_rstd`), replaces a second pass over ``a`` for the variance:
    ``eps / (var + eps) = eps * rstd**2``.
    """
    kind, axes, eps = settings
    if rstd is not None and not differentiable:
        y = y.detach()
        shrink = (rstd.detach() * rstd.detach()).mul_(float(eps))
        beta = None
        if bias is not None:
            shape = [-1] + [1] * (y.dim() - 2) if kind in _PER_CHANNEL_NORMS else list(bias.shape)
            beta = bias.detach().reshape(shape).to(y.dtype)
        return y, beta, shrink.to(y.dtype)
    with contextlib.nullcontext() if differentiable else torch.no_grad():
        values = a if differentiable else a.detach()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()  # the kernels accumulate statistics in float32 too
        if eps is None:  # rms_norm's default: the epsilon of its accumulation type
            eps = torch.finfo(values.dtype).eps
        rank = values.dim()
        if kind == "group_norm":
            grouped = values.reshape(values.shape[0], axes, -1)
            variance = grouped.var(-1, unbiased=False, keepdim=True)
            variance = variance.expand(-1, -1, values.shape[1] // axes).reshape(
                *values.shape[:2], *([1] * (rank - 2))
            )
        elif kind == "channel_layer_norm":
            variance = values.var(1, unbiased=False, keepdim=True)
        elif kind == "instance_norm":
            variance = values.var(list(range(2, rank)), unbiased=False, keepdim=True)
        elif kind == "batch_norm":
            variance = values.var([0, *range(2, rank)], unbiased=False, keepdim=True)
        elif kind == "rms_norm":
            variance = values.square().mean(list(range(-axes, 0)), keepdim=True)
        else:
            variance = values.var(list(range(-axes, 0)), unbiased=False, keepdim=True)
        shrink = eps / (variance + eps)
        # Differentiable: a copy, since the product below saves its operand for double
        # backpropagation and the model may overwrite ``y`` in place (an in-place ReLU).
        y = y.clone() if differentiable else y.detach()
        beta = None
        if bias is not None:
            shape = [-1] + [1] * (y.dim() - 2) if kind in _PER_CHANNEL_NORMS else list(bias.shape)
            beta = (bias if differentiable else bias.detach()).reshape(shape).to(y.dtype)
        return y, beta, shrink.to(y.dtype)


def saved_layer_norm_rstd(settings: Tuple[Any, ...], y: Tensor) -> Optional[Tensor]:
    """The ``1 / sqrt(var + eps)`` that ``native_layer_norm`` saved for its backward pass,
    shaped like the statistics :func:`normalisation_parts` would compute from the input
    (``(N, 1, *spatial)`` for torchvision's ``LayerNorm2d``, whose output ``y`` is a
    permuted view); ``None`` for another kind or when the output did not come from it.

    Reading it saves a full pass over the input per layer (the variance), and it is the
    statistic the kernel used, so ``eps * rstd**2`` is the ``J a`` of the op's own arithmetic.
    """
    kind = settings[0]
    if kind not in ("layer_norm", "channel_layer_norm"):
        return None
    made = y._base if y._base is not None else y
    node = made.grad_fn
    if node is None or type(node).__name__ != "NativeLayerNormBackward0":
        return None
    rstd = getattr(node, "_saved_result2", None)
    if not isinstance(rstd, Tensor) or rstd.dim() != made.dim():
        return None
    if kind == "channel_layer_norm":
        if made.dim() < 2 or y.dim() != made.dim():
            return None
        rstd = rstd.movedim(-1, 1)  # the kernel ran channels-last, between the permutes
    return rstd


_INSTANCE_NORMS = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)


def _is_layer_norm_2d(module: torch.nn.Module) -> bool:
    """torchvision's ConvNeXt ``LayerNorm2d`` (permute, layer_norm over channels, permute
    back), recognised without importing torchvision, or timm's (the same operations)."""
    kind = type(module)
    return (
        kind.__name__ == "LayerNorm2d" and kind.__module__ == "torchvision.models.convnext"
    ) or _is_plain_timm_norm(module, "LayerNorm2d")


def _is_plain_timm_norm(module: torch.nn.Module, name: str) -> bool:
    """timm's ``LayerNorm`` / ``LayerNorm2d`` with its fused path off: their ``forward`` is
    then ``F.layer_norm`` (between two permutes for ``LayerNorm2d``), as torch's and
    torchvision's. A version without the flag is not recognised."""
    kind = type(module)
    if kind.__name__ != name or kind.__module__ != "timm.layers.norm":
        return False
    flags = [getattr(module, a) for a in ("_fast_norm", "fast_norm") if hasattr(module, a)]
    return bool(flags) and not any(flags)


def normalisation_settings(module: torch.nn.Module) -> Optional[Tuple[Any, ...]]:
    """``(kind, axes, eps)`` of a normalisation module of exactly a known type (see
    :func:`normalisation_intercept`); ``None`` for any other module."""
    kind = type(module)
    norm: Any = module  # read as the matched type, not as Tensor | Module
    if kind is torch.nn.LayerNorm or _is_plain_timm_norm(module, "LayerNorm"):
        return ("layer_norm", len(norm.normalized_shape), float(norm.eps))
    if kind is torch.nn.GroupNorm:
        return ("group_norm", int(norm.num_groups), float(norm.eps))
    if _is_layer_norm_2d(module):
        return ("channel_layer_norm", 1, float(norm.eps))
    if kind is getattr(torch.nn, "RMSNorm", None):
        return ("rms_norm", len(norm.normalized_shape), norm.eps)
    if kind in _INSTANCE_NORMS and (norm.training or not norm.track_running_stats):
        return ("instance_norm", None, float(norm.eps))
    return None


def normalisation_op(settings: Tuple[Any, ...]) -> str:
    """The traced operation a normalisation module's source comes from."""
    return "layer_norm" if settings[0] == "channel_layer_norm" else settings[0]


def _add_sub(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    name = getattr(func, "__name__", "")
    a, b = args[0], _arg(args, kwargs, 1, "other")
    alpha = _arg(args, kwargs, 2, "alpha", 1)
    a_graph, b_graph = ctx.is_graph(a), ctx.is_graph(b)
    out = func(*args, **kwargs)
    if a_graph and b_graph or not ctx.graph_outputs(out):
        return OpResult(out, [])
    # out = first + sign * alpha * second, with (first, second) by the op's convention;
    # the intercept is the same expression with the graph operand set to zero.
    if name in ("__rsub__", "rsub"):
        first, second, sign = b, a, -1
    elif name in ("__radd__",):
        first, second, sign = b, a, 1
    else:
        first, second, sign = a, b, (-1 if "sub" in name else 1)
    first_graph = ctx.is_graph(first)
    if first_graph:
        constant = (
            second * (sign * alpha)
            if not isinstance(second, Tensor)
            else second.detach() * (sign * alpha)
        )
    else:
        constant = first.detach() if isinstance(first, Tensor) else first
    if not isinstance(constant, Tensor):
        constant = torch.tensor(constant, dtype=out.dtype, device=out.device)
    return OpResult(out, [Intercept(out, dense=constant)])


def _mul(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    a, b = args[0], _arg(args, kwargs, 1, "other")
    out = func(*args, **kwargs)
    if ctx.is_graph(a) and ctx.is_graph(b) and ctx.graph_outputs(out):
        # a * b is homogeneous of degree two: c = ab - (ab + ab) = -ab. The negation is a
        # new tensor, safe from a later in-place write to the output.
        return OpResult(out, [Intercept(out, dense=-out.detach())])
    return OpResult(out, [])


def _div(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    if ctx.is_graph(args[0]) and not ctx.is_graph(_arg(args, kwargs, 1, "other")):
        return _zero(ctx, func, args, kwargs)
    return _generic(ctx, func, args, kwargs)


def _multilinear(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> OpResult:
    if op_name(func) == "einsum":
        operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    else:
        operands = args
    degree = sum(1 for o in operands if ctx.is_graph(o))
    out = func(*args, **kwargs)
    if degree <= 1 or not ctx.graph_outputs(out):
        return OpResult(out, [])
    # A map linear in each of k graph operands: J a = k g(a), so c = (1 - k) g(a).
    return OpResult(out, [Intercept(out, dense=(1 - degree) * out.detach())])


def _cat(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    tensors = _arg(args, kwargs, 0, "tensors")
    out = func(*args, **kwargs)
    if all(ctx.is_graph(t) for t in tensors) or not ctx.graph_outputs(out):
        return OpResult(out, [])
    # Constants in their slots (a class token), zeros where graph tensors went.
    zeroed = [torch.zeros_like(t) if ctx.is_graph(t) else t.detach() for t in tensors]
    rest_args = tuple(args[1:]) if len(args) > 1 else ()
    with torch.no_grad():
        constant = func(zeroed, *rest_args, **{k: v for k, v in kwargs.items() if k != "tensors"})
    return OpResult(out, [Intercept(out, dense=constant)])


def _pad(ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> OpResult:
    mode = _arg(args, kwargs, 2, "mode", "constant")
    value = _arg(args, kwargs, 3, "value", None)
    out = func(*args, **kwargs)
    if mode != "constant" or not value or not ctx.graph_outputs(out):
        return OpResult(out, [])
    with torch.no_grad():
        constant = func(torch.zeros_like(args[0]), *args[1:], **kwargs)
    return OpResult(out, [Intercept(out, dense=constant)])


# ----------------------------------------------------------- element-wise activations
# An element-wise ``y = g(a)`` has a diagonal Jacobian, so ``J_g(a) a`` is ``g``'s own
# backward kernel with ``a`` in the place of the output gradient: one kernel, the very
# derivative formula the backward pass uses (so eq. 1 stays exact), where forward-mode AD
# needs copies of the input, a dual forward pass and its tangent.


@dataclass(frozen=True)
class _Activation:
    """How to find one activation's ``g'(a) a`` for the traced op and for its module.

    ``linear_part(a, y, *parameters)`` runs the backward kernel; ``reads`` says what it
    needs: ``"input"`` (taken before an in-place call overwrites ``a``), ``"output"``
    (hardtanh: ``y 1[low < y < high] = a 1[low < a < high]``), or ``"both"`` (sigmoid and
    tanh: out-of-place calls only). ``call_parameters(args, kwargs, func)`` and
    ``module_parameters(module)`` read the same parameters from a functional call and
    from a module.
    """

    linear_part: Callable[..., Tensor]
    reads: str = "input"
    # The autograd node type that the op makes, when it saves the op's input as
    # ``_saved_self`` (the original input, also in place), or its output (``holds_input``):
    # the replay then takes the intercept term from the backward pass instead of forming
    # ``c`` in the forward pass.
    backward_node: Optional[str] = None
    # Where its gradient passes unchanged the op is the identity (y = a), elsewhere it passes
    # none (hardtanh): J^T df/dy * a = J^T df/dy * y, so the replay's term needs no ``a``.
    gated: bool = False
    # The node saves the output, not the input (sigmoid, tanh): the replay keeps the input
    # for the term instead, as long as a closed-form intercept of its size would be kept.
    holds_input: bool = False
    call_parameters: Callable[[Sequence[Any], Dict[str, Any], Callable], Tuple[Any, ...]] = (
        lambda args, kwargs, func: ()
    )
    # Any: a module's attributes type as Tensor | Module; the registered type fixes them.
    module_parameters: Callable[[Any], Tuple[Any, ...]] = lambda module: ()


def _hardtanh_call(args: Sequence[Any], kwargs: Dict[str, Any], func: Callable) -> Tuple[Any, ...]:
    return (_arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))


def _elu_call(args: Sequence[Any], kwargs: Dict[str, Any], func: Callable) -> Tuple[Any, ...]:
    alpha = _arg(args, kwargs, 1, "alpha", 1.0)
    if func in (F.elu, F.elu_):  # (input, alpha, inplace); torch._C._nn.elu adds two scales
        return (alpha, 1.0, 1.0)
    return (alpha, _arg(args, kwargs, 2, "scale", 1.0), _arg(args, kwargs, 3, "input_scale", 1.0))


# What the trace and the replay read for each closed-form activation; filled only by
# register_activation (below), never edited by hand.
_ACTIVATIONS: Dict[str, _Activation] = {}
# Leaf activation modules whose ``forward`` is exactly their functional op: a capture plan
# (captum_fullgrad.replay) finds their intercepts with a forward hook instead of a trace.
_ACTIVATION_MODULES: Dict[type, str] = {}
# The same for modules of other libraries, by (module path, class name), so that the library
# need not be imported: timm's GELU and GELUTanh are ``F.gelu`` (their ``inplace`` is a
# dummy argument, ignored).
_LIBRARY_ACTIVATIONS: Dict[Tuple[str, str], Tuple[str, Tuple[Any, ...]]] = {
    ("timm.layers.activations", "GELU"): ("gelu", ("none",)),
    ("timm.layers.activations", "GELUTanh"): ("gelu", ("tanh",)),
}


def activation_settings(module: torch.nn.Module) -> Optional[Tuple[Any, ...]]:
    """What the intercept of an activation module depends on besides its input and output:
    ``(op name, inplace, *parameters)``; ``None`` for any other module (or an in-place
    one whose kernel needs both its input and its output)."""
    kind = type(module)
    name = _ACTIVATION_MODULES.get(kind)
    if name is None:
        known = _LIBRARY_ACTIVATIONS.get((kind.__module__, kind.__name__))
        if known is None:
            return None
        return (known[0], False, *known[1])
    activation = _ACTIVATIONS[name]
    inplace = bool(getattr(module, "inplace", False))
    if inplace and activation.reads == "both":
        return None
    return (name, inplace, *activation.module_parameters(module))


def activation_reads_input_first(settings: Tuple[Any, ...]) -> bool:
    """Whether ``g'(a) a`` must be taken before the call: an in-place activation whose
    kernel reads the input it is about to overwrite."""
    return settings[1] and _ACTIVATIONS[settings[0]].reads == "input"


def activation_backward_node(settings: Tuple[Any, ...]) -> Optional[str]:
    """The autograd node type of an activation whose term the replay may take from the
    backward pass (see :func:`register_activation`); ``None`` if it may not."""
    return _ACTIVATIONS[settings[0]].backward_node


def activation_holds_input(settings: Tuple[Any, ...]) -> bool:
    """Whether the replay keeps the activation's input for its backward-pass term (see
    :func:`register_activation`'s ``holds_input``)."""
    return _ACTIVATIONS[settings[0]].holds_input


def activation_is_gated(settings: Tuple[Any, ...]) -> bool:
    """Whether the activation passes its gradient unchanged where it is the identity and
    none elsewhere (see :func:`register_activation`'s ``gated``)."""
    return _ACTIVATIONS[settings[0]].gated


def activation_linear_part(
    settings: Tuple[Any, ...], a: Tensor, y: Optional[Tensor] = None
) -> Tensor:
    """``g'(a) a`` for ``settings`` (see :func:`activation_settings`), with the kernels the
    traced rule uses, so the same values. ``y`` is needed unless the kernel reads only the
    input; when given, ``a`` is taken in ``y``'s dtype (an autocast op computed in float32)."""
    with torch.no_grad():
        a = a.detach()
        if y is not None:
            y = y.detach()
            if a.dtype != y.dtype:
                a = a.to(y.dtype)
        return _ACTIVATIONS[settings[0]].linear_part(a, y, *settings[2:])


def _elementwise(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> OpResult:
    """``c = g(a) - g'(a) a`` for a registered activation, ``g'(a) a`` from its backward kernel."""
    a = _arg(args, kwargs, 0, "input")
    name = op_name(func)
    activation = _ACTIVATIONS[name]
    inplace = is_inplace(func, args, kwargs)
    if (
        not isinstance(a, Tensor)
        or not a.is_floating_point()
        or (inplace and activation.reads == "both")
    ):
        return _generic(ctx, func, args, kwargs)
    settings = (name, inplace, *activation.call_parameters(args, kwargs, func))
    linear_part = None
    if activation_reads_input_first(settings):
        try:
            linear_part = activation_linear_part(settings, a)
        except (RuntimeError, NotImplementedError):  # a dtype or device without the kernel
            return _generic(ctx, func, args, kwargs)
    value = func(*args, **kwargs)
    produced = a if value is None else value
    if not _is_graph_output(produced):
        return OpResult(value, [])
    with torch.no_grad():
        y = produced.detach()
        if linear_part is None:
            linear_part = activation_linear_part(settings, a, y)
        constant = y - linear_part
    return OpResult(value, [Intercept(produced, dense=constant)])


def _generic(
    ctx: Context,
    func: Callable,
    args: Sequence[Any],
    kwargs: Dict[str, Any],
    reevaluate: Optional[Callable[..., Any]] = None,
    reevaluate_inputs: Optional[List[Tensor]] = None,
    layout: Optional[str] = None,
) -> OpResult:
    """Any operation: ``c = g(a) - jvp(g, a, a)``, by forward-mode AD (double backward if absent).

    ``reevaluate`` replaces ``func`` for the linearisation when calling ``func`` again
    would have side effects (BatchNorm's running statistics).
    """
    inplace = is_inplace(func, args, kwargs)
    if reevaluate is None:
        flat, spec = tree_flatten((list(args), kwargs))
        input_positions = [i for i, v in enumerate(flat) if ctx.is_graph(v)]

        def call(*graph_values: Tensor) -> Any:
            values = list(flat)
            for i, v in zip(input_positions, graph_values):
                values[i] = v
            call_args, call_kwargs = tree_unflatten(values, spec)
            result = func(*call_args, **call_kwargs)
            # In-place ops that return None (__setitem__) change their first argument.
            return call_args[0] if result is None else result

        primals = [flat[i] for i in input_positions]
    else:
        call, primals = reevaluate, list(reevaluate_inputs or [])
    # In-place ops overwrite their input: linearise on a copy taken before the real call.
    saved = [p.detach().clone() for p in primals] if inplace else [p.detach() for p in primals]

    value = func(*args, **kwargs)
    produced = args[0] if value is None else value
    flat_out, _ = tree_flatten(produced)
    output_positions = [i for i, o in enumerate(flat_out) if _is_graph_output(o)]
    if not output_positions:
        return OpResult(value, [], layout=layout)
    try:
        with _math_attention():
            constants = _forward_mode_intercepts(call, saved, inplace, output_positions)
    except (RuntimeError, NotImplementedError):
        try:
            with _math_attention():
                constants = _double_backward_intercepts(call, saved, output_positions)
        except (RuntimeError, NotImplementedError) as error:
            warnings.warn(
                f"captum_fullgrad: could not linearise `{op_name(func)}` ({error}); its "
                "intercept is missing and the completeness delta will show the gap.",
                RuntimeWarning,
                stacklevel=3,
            )
            return OpResult(value, [], layout=layout, failed=op_name(func))
    intercepts = [Intercept(flat_out[i], dense=c) for i, c in zip(output_positions, constants)]
    return OpResult(value, intercepts, layout=layout)


def _math_attention() -> Any:
    """Fused attention kernels (flash, memory-efficient) have no forward-mode derivative;
    the math kernel computes the same function from differentiable parts."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()


def _is_graph_output(value: Any) -> bool:
    return (
        isinstance(value, Tensor)
        and value.requires_grad
        and (value.is_floating_point() or value.is_complex())
    )


# PyTorch has one forward-mode AD level for the whole process: two threads tracing at
# once would collide on it ("nested forward mode AD").
_DUAL_LEVEL_LOCK = threading.RLock()
_JVP_DECOMPOSITIONS_LOADED = False


def _load_jvp_decompositions() -> None:
    """Import what ``fwAD.make_dual`` imports on its first call, once, without its noise.

    That import scripts a few decompositions with ``torch.jit.script``, whose deprecation
    FutureWarning would otherwise reach the user from inside a capture. Called under
    ``_DUAL_LEVEL_LOCK`` (the warning filters are process-wide).
    """
    global _JVP_DECOMPOSITIONS_LOADED
    if _JVP_DECOMPOSITIONS_LOADED:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning
        )
        fwAD._maybe_load_decompositions()
    _JVP_DECOMPOSITIONS_LOADED = True


def _forward_mode_intercepts(
    call: Callable[..., Any], primals: List[Tensor], inplace: bool, positions: List[int]
) -> List[Tensor]:
    with _DUAL_LEVEL_LOCK, torch.no_grad():
        _load_jvp_decompositions()
        return _forward_mode_constants(call, primals, inplace, positions)


def _forward_mode_constants(
    call: Callable[..., Any], primals: List[Tensor], inplace: bool, positions: List[int]
) -> List[Tensor]:
    with fwAD.dual_level():
        # In-place ops write into their input and its tangent: give each its own storage.
        duals = [
            fwAD.make_dual(p.clone(), p.clone()) if inplace else fwAD.make_dual(p, p)
            for p in primals
        ]
        flat, _ = tree_flatten(call(*duals))
        constants = []
        for i in positions:
            primal, tangent = fwAD.unpack_dual(flat[i])
            # No tangent: the output does not move with the graph inputs, all of it is intercept.
            constants.append(primal.clone() if tangent is None else primal - tangent)
    return constants


def _double_backward_intercepts(
    call: Callable[..., Any], primals: List[Tensor], positions: List[int]
) -> List[Tensor]:
    """``J a`` as the derivative of ``<J^T v, a>`` in ``v``, for ops without forward AD."""
    with torch.enable_grad():
        leaves = [p.detach().clone().requires_grad_(True) for p in primals]
        flat, _ = tree_flatten(call(*[leaf.clone() for leaf in leaves]))
        outputs = [flat[i] for i in positions]
        connected = [o for o in outputs if o.requires_grad]
        probes = [torch.zeros_like(o, requires_grad=True) for o in connected]
        vjps = torch.autograd.grad(connected, leaves, probes, create_graph=True, allow_unused=True)
        used = [(v, leaf) for v, leaf in zip(vjps, leaves) if v is not None and v.requires_grad]
        jvps: Sequence[Optional[Tensor]]
        if used:
            jvps = torch.autograd.grad(
                [v for v, _ in used], probes, [leaf.detach() for _, leaf in used], allow_unused=True
            )
        else:
            jvps = [None] * len(probes)
    by_output = {id(o): j for o, j in zip(connected, jvps)}
    constants = []
    for o in outputs:
        j = by_output.get(id(o))
        constants.append(o.detach() - j.detach() if j is not None else o.detach().clone())
    return constants


# ------------------------------------------------------------------- rule table
_ZERO_NAMES = """
view view_as reshape reshape_as permute transpose t flatten unflatten squeeze unsqueeze expand
expand_as contiguous clone __getitem__ narrow select index_select gather take split
split_with_sizes chunk unbind tensor_split repeat tile flip fliplr flipud roll rot90 movedim
moveaxis swapaxes swapdims unfold mean sum neg negative __neg__ __pos__ positive float double
half bfloat16 to type type_as cpu cuda relu relu_ leaky_relu leaky_relu_ prelu max_pool1d
max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
dropout dropout1d dropout2d dropout3d feature_dropout pixel_shuffle pixel_unshuffle
channel_shuffle native_channel_shuffle fold diagonal diag diag_embed tril triu trace cumsum abs
absolute amax amin __get__ identity
""".split()
_CHANNEL_FIRST_ZERO_NAMES = """
avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices
adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices lp_pool1d lp_pool2d lp_pool3d
interpolate upsample upsample_nearest upsample_bilinear
""".split()


# --------------------------------------------------------------- registry
# One entry per closed-form operation: ``register_rule`` routes torch functions to a rule
# of the trace; ``register_activation`` adds an element-wise activation to every table
# the trace and the replay read. docs/extending.md ("An intercept rule") walks through it.

Rule = Callable[[Context, Callable, Sequence[Any], Dict[str, Any]], OpResult]

# The rule of each torch function the trace knows (anything else: the generic rule).
RULES: Dict[Callable, Rule] = {}

_NAMESPACES = (torch, torch.Tensor, F, torch._C._nn, torch._C._VariableFunctions)

_MISSING = object()


class Registration:
    """What one ``register_…`` call added; :meth:`remove` restores the tables as they were
    (tests register toy rules and take them out again)."""

    def __init__(self) -> None:
        self._undo: List[Tuple[Dict[Any, Any], Any, Any]] = []

    def _set(self, table: Dict[Any, Any], key: Any, value: Any) -> None:
        self._undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def remove(self) -> None:
        """Take this registration's entries out (restoring any entry it replaced)."""
        for table, key, previous in reversed(self._undo):
            if previous is _MISSING:
                table.pop(key, None)
            else:
                table[key] = previous
        self._undo.clear()


def _torch_functions(names: Sequence[str]) -> List[Callable]:
    """Every torch callable named ``names``: the function, the method, ``F.*`` and the
    C bindings, which a ``TorchFunctionMode`` may each see."""
    found: List[Callable] = []
    for name in names:
        if name == "__get__":  # properties (.T, .mT): matched by name in apply_rule
            continue
        for namespace in _NAMESPACES:
            func = getattr(namespace, name, None)
            if func is not None:
                found.append(func)
    return found


def register_rule(
    names: Sequence[str], rule: Rule, functions: Sequence[Callable] = ()
) -> Registration:
    """Route the torch functions called ``names`` (in ``torch``, ``torch.Tensor``,
    ``torch.nn.functional`` and the C bindings), and the callables ``functions``, to ``rule``.

    ``rule(ctx, func, args, kwargs)`` must run ``func(*args, **kwargs)`` once and return an
    :class:`OpResult` with the intercept ``c = g(a) - J_g(a) a`` of each graph output
    (``ctx.is_graph`` tells which arguments depend on the network input). Only the trace
    uses it; a function without a rule is linearised by forward-mode AD (:func:`_generic`).
    """
    registration = Registration()
    for func in [*_torch_functions(list(names)), *functions]:
        try:
            registration._set(RULES, func, rule)
        except TypeError:  # unhashable
            pass
    return registration


def register_activation(
    name: str,
    linear_part: Callable[..., Tensor],
    functions: Sequence[str] = (),
    modules: Sequence[type] = (),
    reads: str = "input",
    call_parameters: Optional[Callable[..., Tuple[Any, ...]]] = None,
    module_parameters: Optional[Callable[[Any], Tuple[Any, ...]]] = None,
    backward_node: Optional[str] = None,
    gated: bool = False,
    holds_input: bool = False,
) -> Registration:
    """Give the element-wise activation ``name`` a closed-form intercept in the trace and
    in the replay: ``c = g(a) - g'(a) a`` with ``g'(a) a = linear_part(a, y, *parameters)``.

    Args:
        name: the op's name as :func:`op_name` gives it (``"celu"``).
        linear_part: ``g'(a) a`` from the op's input ``a``, output ``y`` and parameters;
            best the op's own backward kernel with ``a`` as the output gradient, so the
            values are the derivative that the backward pass applies (eq. 1 stays exact).
        functions: the torch function names routed to it (default: ``name`` and its
            in-place ``name_``).
        modules: leaf module types whose ``forward`` is exactly this op (the replay hooks
            them; subclasses are not matched).
        reads: ``"input"``, ``"output"`` or ``"both"``: what ``linear_part`` needs. An
            in-place call overwrites the input: ``"input"`` is read before the call;
            under ``"both"`` in-place calls go to the generic rule (and in-place modules
            get no plan), which is also the choice when the in-place op's derivative
            formula differs from the out-of-place one.
        call_parameters: ``(args, kwargs, func) -> parameters`` of a functional call.
        module_parameters: ``module -> parameters``, the same values from a module.
        backward_node: the type name of the autograd node the op makes
            (``"SiluBackward0"``), if that node saves the op's original input as
            ``_saved_self``, in place too (or its output: see ``holds_input``). A
            replayed module's term then comes from the backward pass,
            ``<df/dy, y> - <J^T df/dy, a>``, with no intercept tensor formed or kept
            (check the op with tests/test_replay.py's identity test).
        gated: the op's backward passes ``df/dy`` unchanged exactly where ``y = a`` and
            zero elsewhere (hardtanh, ReLU6). Then ``(J^T df/dy) * a = (J^T df/dy) * y``
            in floating point too, and the term is ``(df/dy - J^T df/dy) * y``: one pass
            fewer, and the node's saved input is not read.
        holds_input: the ``backward_node`` saves the op's output, not its input (sigmoid,
            tanh: out-of-place calls only, ``reads="both"``). The replay then keeps the
            input from the forward pass until the node's backward runs (the memory that
            the closed-form intercept, a tensor of the same size, would have taken) and
            traces the call when something changes it in place before then (that step
            then keeps the closed form: ``ActivationInputChanged``).
    """
    if holds_input and (backward_node is None or reads != "both"):
        raise ValueError("holds_input needs a backward_node and reads='both'.")
    if reads not in ("input", "output", "both"):
        raise ValueError(f"reads must be 'input', 'output' or 'both', got {reads!r}.")
    activation = _Activation(
        linear_part,
        reads=reads,
        call_parameters=call_parameters or (lambda args, kwargs, func: ()),
        module_parameters=module_parameters or (lambda module: ()),
        backward_node=backward_node,
        gated=gated,
        holds_input=holds_input,
    )
    registration = register_rule(list(functions) or [name, f"{name}_"], _elementwise)
    registration._set(_ACTIVATIONS, name, activation)
    for module_type in modules:
        registration._set(_ACTIVATION_MODULES, module_type, name)
    return registration


_aten = torch.ops.aten
register_activation(
    "silu",
    lambda a, y: _aten.silu_backward(a, a),
    modules=[torch.nn.SiLU],
    backward_node="SiluBackward0",
)
register_activation(
    "gelu",
    lambda a, y, approximate: _aten.gelu_backward(a, a, approximate=approximate),
    functions=["gelu"],
    modules=[torch.nn.GELU],
    call_parameters=lambda args, kwargs, func: (_arg(args, kwargs, 1, "approximate", "none"),),
    module_parameters=lambda module: (module.approximate,),
    backward_node="GeluBackward0",
)
register_activation(
    "hardswish",
    lambda a, y: _aten.hardswish_backward(a, a),
    modules=[torch.nn.Hardswish],
    backward_node="HardswishBackward0",
)
register_activation(
    "hardsigmoid",
    lambda a, y: _aten.hardsigmoid_backward(a, a),
    modules=[torch.nn.Hardsigmoid],
    backward_node="HardsigmoidBackward0",
)
register_activation(
    "mish",
    lambda a, y: _aten.mish_backward(a, a),
    modules=[torch.nn.Mish],
    backward_node="MishBackward0",
)
register_activation(
    "softplus",
    lambda a, y, beta, threshold: _aten.softplus_backward(a, a, beta, threshold),
    functions=["softplus"],
    modules=[torch.nn.Softplus],
    call_parameters=lambda args, kwargs, func: (
        _arg(args, kwargs, 1, "beta", 1.0),
        _arg(args, kwargs, 2, "threshold", 20.0),
    ),
    module_parameters=lambda module: (float(module.beta), float(module.threshold)),
    backward_node="SoftplusBackward0",
)
register_activation(
    "elu",
    lambda a, y, alpha, scale, input_scale: _aten.elu_backward(
        a, alpha, scale, input_scale, False, a
    ),
    modules=[torch.nn.ELU],
    call_parameters=_elu_call,
    module_parameters=lambda module: (float(module.alpha), 1.0, 1.0),
    backward_node="EluBackward0",  # out of place only: in place, EluBackward1 saves y
)


def _hardtanh_linear_part(a: Tensor, y: Tensor, low: float, high: float) -> Tensor:
    # y 1[low < y < high] = a 1[low < a < high]: the output suffices (in-place calls too).
    return _aten.hardtanh_backward(y, y, low, high)


register_activation(
    "hardtanh",
    _hardtanh_linear_part,
    modules=[torch.nn.Hardtanh, torch.nn.ReLU6],  # ReLU6.forward is hardtanh(x, 0, 6)
    reads="output",
    call_parameters=_hardtanh_call,
    module_parameters=lambda module: (float(module.min_val), float(module.max_val)),
    backward_node="HardtanhBackward0",
    gated=True,
)
register_activation(
    "relu6",
    _hardtanh_linear_part,
    reads="output",
    call_parameters=lambda args, kwargs, func: (0.0, 6.0),
)
register_activation(
    "sigmoid",
    lambda a, y: _aten.sigmoid_backward(a, y),
    functions=["sigmoid"],
    modules=[torch.nn.Sigmoid],
    reads="both",
    backward_node="SigmoidBackward0",
    holds_input=True,
)
register_activation(
    "tanh",
    lambda a, y: _aten.tanh_backward(a, y),
    functions=["tanh"],
    modules=[torch.nn.Tanh],
    reads="both",
    backward_node="TanhBackward0",
    holds_input=True,
)

register_rule(
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d".split(), _conv
)
register_rule(["linear"], _linear)
register_rule(["batch_norm"], _batch_norm)
register_rule(
    "add sub subtract rsub __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ add_ sub_".split(),
    _add_sub,
)
register_rule("mul multiply __mul__ __rmul__ __imul__ mul_".split(), _mul)
register_rule("div divide true_divide __truediv__ __itruediv__ div_".split(), _div)
register_rule(
    "matmul __matmul__ __rmatmul__ mm bmm mv dot inner outer einsum".split(), _multilinear
)
register_rule("cat concat concatenate stack hstack vstack dstack".split(), _cat)
register_rule(["pad"], _pad)
register_rule("layer_norm group_norm rms_norm instance_norm".split(), _normalisation)
register_rule(_ZERO_NAMES, _zero)
register_rule(_CHANNEL_FIRST_ZERO_NAMES, _channel_first_zero)


def apply_rule(
    ctx: Context, func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> OpResult:
    """Run ``func`` and return its value with the intercepts of its graph outputs."""
    rule: Optional[Rule] = RULES.get(func)
    if rule is None:
        if getattr(func, "__name__", "") == "__get__":
            rule = _zero  # properties such as .T and .mT are linear
        else:
            rule = _generic
    return rule(ctx, func, args, kwargs)
