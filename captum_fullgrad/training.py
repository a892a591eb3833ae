"""Training uses of the full-Jacobian: distillation (sections 4, 7.1), regularisation (5, 7.2).

Everything here is a differentiable loss term built on one captured forward pass and one
backward pass with ``create_graph=True`` (double backpropagation), so it can be added to
any training loop::

    logits_loss = F.cross_entropy(logits, labels)
    loss = logits_loss + lam * bias_jacobian_penalty(model, images, labels)
    loss.backward()

Layers
------
A *layer* is named like the rest of the package names bias sources (see
:class:`captum_fullgrad.capture.BiasSource`): either a **block** name (the name of a
convolution; a BatchNorm that reads the convolution's output belongs to its block) or the
name of a single bias **source** (a BatchNorm, a linear layer, ``module:op``...). A block's
bias-Jacobians are *summed element-wise* over its sources before anything else is done
with them. For a conv-BN block in eval mode, that sum is exactly the bias-Jacobian of the
single convolution obtained by folding the BatchNorm into it,
``df/dz * (gamma / sigma * b_conv + beta - mu * gamma / sigma)``, so the quantity does not
depend on how the block is parameterised (section 5's argument for bias-Jacobians over
weight-space measures). Layer names are only known after a forward pass; use
:func:`bias_blocks` to list them, and every function raises a ``ValueError`` that lists the
available names when it is given an unknown one.

What the penalty differentiates
-------------------------------
``bias_jacobian(grad) = grad * c``. The output gradient ``grad = df/dy`` is always
differentiable with respect to every parameter after the layer (and through the ReLU
masks' values, to the layer's input pathway). The intercept ``c`` is

- for convolutions and linear layers, the bias parameter itself: differentiable;
- for BatchNorm in eval mode, ``beta - mu * gamma / sqrt(var + eps)`` with the running
  statistics: differentiable with respect to ``gamma`` and ``beta``;
- for BatchNorm in train mode (batch statistics), the engine's closed form of the exact
  intercept of the batch-normalisation map, ``c = y - (y - beta) * eps / (var + eps)``
  with ``y = gamma * (z - mu) / sqrt(var + eps) + beta`` and the batch statistics
  ``mu``, ``var`` of the block's pre-activation ``z`` (normalisation is scale-invariant in
  its input, so its linear part ``J z`` is only ``(y - beta) * eps / (var + eps)`` and the
  intercept is almost the whole output). It is built from differentiable operations, so
  the penalty differentiates through ``gamma``, ``beta`` and the batch statistics (hence
  through every parameter before the BatchNorm), besides ``df/dy``; ``gradcheck`` tests
  cover both modes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validation
from .capture import BiasSource, Capture, forward_backward

__all__ = [
    "BlockInfo",
    "MATCHING_PRESETS",
    "MatchingTerms",
    "MatchingWeights",
    "bias_blocks",
    "bias_jacobian_penalty",
    "bias_weight_decay",
    "full_jacobian_matching_loss",
]

LayerSpec = Union[str, nn.Module]
_NORM_EPS = 1e-12


# --------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class BlockInfo:
    """A linear block of a model, as the capture sees it.

    Attributes:
        name: the block's name (the name of its first source, a convolution for conv-BN).
        sources: names of its bias sources, in forward order.
        modules: qualified names of the modules running those sources (for
            :func:`bias_weight_decay`).
        ops: the operation of each source (``conv2d``, ``batch_norm``...).
        spatial: whether every source is a spatial map (usable for matching maps).
        shape: output shape of the block's last source.
    """

    name: str
    sources: Tuple[str, ...]
    modules: Tuple[str, ...]
    ops: Tuple[str, ...]
    spatial: bool
    shape: Tuple[int, ...]


def _group_blocks(sources: Sequence[BiasSource]) -> "OrderedDict[str, List[BiasSource]]":
    blocks: "OrderedDict[str, List[BiasSource]]" = OrderedDict()
    for source in sources:
        blocks.setdefault(source.block, []).append(source)
    return blocks


def _block_info(name: str, members: Sequence[BiasSource]) -> BlockInfo:
    return BlockInfo(
        name=name,
        sources=tuple(m.name for m in members),
        modules=tuple(m.module for m in members),
        ops=tuple(m.op for m in members),
        spatial=all(m.spatial for m in members),
        shape=tuple(members[-1].shape),
    )


def _available(sources: Sequence[BiasSource]) -> str:
    blocks = _group_blocks(sources)
    block_text = ", ".join(
        f"{b}{'' if all(m.spatial for m in ms) else ' (non-spatial)'}" for b, ms in blocks.items()
    )
    extra = [s.name for s in sources if s.name not in blocks]
    text = f"blocks: {block_text or 'none'}"
    if extra:
        text += f"; single sources: {', '.join(extra)}"
    return text


def _resolve_layers(
    sources: Sequence[BiasSource], names: Sequence[str], *, role: str, need_spatial: bool
) -> List[Tuple[str, List[BiasSource]]]:
    """Map each layer name to its bias sources (a block's sources, or one source)."""
    blocks = _group_blocks(sources)
    by_name = {s.name: s for s in sources}
    resolved = []
    for name in names:
        if name in blocks:
            members = list(blocks[name])
        elif name in by_name:
            members = [by_name[name]]
        else:
            raise ValueError(
                f"{role} layer {name!r} is not a bias source of the model (a module without bias, "
                f"or not run in the forward pass). Available {_available(sources)}."
            )
        if need_spatial:
            bad = [m for m in members if not m.spatial]
            if bad:
                raise ValueError(
                    f"{role} layer {name!r} ({bad[0].op}, output shape {tuple(bad[0].shape)}) "
                    "is not a spatial map, so it has no channel-summed bias-Jacobian map or "
                    "attention map to match. Choose a convolutional block; available "
                    f"{_available(sources)}."
                )
        resolved.append((name, members))
    return resolved


def _spatial_block_names(sources: Sequence[BiasSource]) -> List[str]:
    return [
        name for name, members in _group_blocks(sources).items() if all(m.spatial for m in members)
    ]


def _layer_list(
    model: Any, layers: Union[None, LayerSpec, Sequence[LayerSpec]]
) -> Optional[List[str]]:
    """Names from a user's choice of layers (names or modules of ``model``)."""
    if layers is None:
        return None
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    names: List[str] = []
    for layer in layers:
        if isinstance(layer, str):
            names.append(layer)
        elif isinstance(layer, nn.Module):
            modules = model.named_modules() if isinstance(model, nn.Module) else ()
            match = [n for n, m in modules if m is layer]
            if not match:
                raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model.")
            names.append(match[0])
        else:
            raise TypeError(f"layers must be names or modules, got {type(layer).__name__}.")
    if not names:
        raise ValueError("layers is empty; pass None for the default layer.")
    return names


def _set_training(
    model: Any, modes: Optional[Dict[nn.Module, bool]] = None
) -> Dict[nn.Module, bool]:
    """Put ``model`` in eval mode (returning the previous flags) or restore ``modes``."""
    if not isinstance(model, nn.Module):
        return {}
    if modes is None:
        previous = {m: m.training for m in model.modules()}
        model.eval()
        return previous
    for module, flag in modes.items():
        module.training = flag
    return modes


def bias_blocks(
    model: Callable[..., Any], inputs: Tensor, additional_forward_args: Any = None
) -> List[BlockInfo]:
    """The linear blocks of ``model`` on ``inputs``, in forward order (one forward pass).

    The model is run in eval mode (so that no BatchNorm statistic is updated) and put back
    in its previous mode. Use it to choose ``layers`` and ``layer_pairs``, and
    ``block.modules`` for :func:`bias_weight_decay` on the same layer.
    """
    x, _ = _validation.format_single_input(inputs, method="bias_blocks")
    extra = _validation.format_additional_forward_args(additional_forward_args)
    collector = _Collector()
    modes = _set_training(model)
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), Capture(model, x, collector):
            model(x, *extra)
    finally:
        _set_training(model, modes)
    return [
        _block_info(name, members) for name, members in _group_blocks(collector.sources).items()
    ]


# --------------------------------------------------------------------------- collector
class _Collector:
    """Keeps only what the chosen layers need, reduced as the backward pass delivers it.

    ``choose`` is called after the forward pass (names are final then) and before the
    backward pass; from then on ``on_gradient`` keeps, for each chosen layer, either the
    element-wise sum of its sources' bias-Jacobians (``kind="full"``, for the penalty) or
    the sum of their channel-summed maps (``kind="map"``, for matching). Other sources'
    gradients are dropped at once. With ``keep_outputs`` it also keeps the output tensor of
    each spatial source (for attention maps; only the chosen layers' survive ``choose``).

    ``release`` must be called when the pass is over, also on error. The capture's hooks
    stay on the graph and close over this collector, so anything it still held (kept maps
    are part of the double-backward graph, outputs are activations) would form a reference
    cycle through autograd that Python cannot collect. After ``release`` the hooks, which
    fire again during the caller's ``loss.backward()`` with second-order gradients, do
    nothing.
    """

    def __init__(self, kind: str = "full", keep_outputs: bool = False) -> None:
        self.kind = kind
        self.keep_outputs = keep_outputs
        self.closed = False
        self.sources: List[BiasSource] = []
        self.outputs: Dict[BiasSource, Tensor] = {}
        self._keys: Dict[BiasSource, List[str]] = {}
        self.kept: "OrderedDict[str, Tensor]" = OrderedDict()
        self.layers: List[Tuple[str, List[BiasSource]]] = []

    def on_source(self, source: BiasSource) -> None:
        self.sources.append(source)
        # The capture releases ``intercept.output`` right after this call.
        output = getattr(source.intercept, "output", None)
        if self.keep_outputs and source.spatial and isinstance(output, Tensor):
            self.outputs[source] = output

    def choose(self, layers: List[Tuple[str, List[BiasSource]]], gradients: bool = True) -> None:
        self.layers = layers
        self._keys = {}
        if gradients:
            for key, members in layers:
                for member in members:
                    self._keys.setdefault(member, []).append(key)
        needed = {members[-1] for _, members in layers}
        self.outputs = {s: t for s, t in self.outputs.items() if s in needed}

    def release(self) -> None:
        self.closed = True
        self._keys = {}
        self.kept = OrderedDict()
        self.outputs = {}
        self.sources = []
        self.layers = []

    def on_gradient(self, source: BiasSource, grad: Optional[Tensor]) -> None:
        if self.closed or grad is None:
            return
        keys = self._keys.get(source)
        if not keys:
            return
        if self.kind == "full":
            value = source.bias_jacobian(grad)
        else:
            value = source.channel_summed(grad)
        for key in keys:
            self.kept[key] = self.kept[key] + value if key in self.kept else value

    def value(self, key: str, like: Tensor) -> Tensor:
        """The kept tensor of ``key``; zeros (no gradient reached the layer) when missing."""
        if key in self.kept:
            return self.kept[key]
        members = dict(self.layers)[key]
        shape = list(members[-1].shape)
        channel_dim = members[-1].channel_dim
        if self.kind == "map" and channel_dim is not None:
            del shape[channel_dim]
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def activation(self, key: str) -> Tensor:
        members = dict(self.layers)[key]
        if members[-1] not in self.outputs:
            raise RuntimeError(
                f"the capture did not hand over the output of layer {key!r}; attention matching "
                "needs BiasSource.intercept.output at on_source time."
            )
        return self.outputs[members[-1]]


# --------------------------------------------------------------------------- penalty
def bias_jacobian_penalty(
    model: Callable[..., Any],
    inputs: Tensor,
    target: _validation.TargetType,
    layers: Union[None, LayerSpec, Sequence[LayerSpec]] = None,
    *,
    additional_forward_args: Any = None,
    return_output: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Bias-Jacobian norm regulariser of section 5: ``mean_i sum_l ||f^b_l(x_i)||^2``.

    ``f`` is the output of the ``target`` class (the correct class, section 7); ``l`` runs
    over the chosen layers; a block's sources are summed element-wise first (see the
    module docstring). One forward pass under capture and one backward pass with
    ``create_graph=True``: the result is differentiable with respect to the parameters
    (what exactly it differentiates: module docstring). Works in train and eval mode;
    in train mode it runs a forward pass, so BatchNorm statistics are updated and dropout
    is sampled as in any forward pass: use ``return_output=True`` and take the
    cross-entropy from the same logits instead of a second forward pass.

    Args:
        model: the network (``nn.Module`` for readable layer names).
        inputs: the batch ``(B, ...)``.
        target: the class whose output is differentiated, in Captum's formats; normally
            the labels tensor.
        layers: layer names (blocks or single sources, see :func:`bias_blocks`) or
            modules; ``None``: the last spatial block (the last convolutional block, as in
            section 7.2). Non-spatial layers (a linear layer) are allowed here.
        additional_forward_args: further arguments of ``model``.
        return_output: also return the model's output (logits) of this forward pass,
            differentiable, for the task loss.

    Returns:
        A scalar tensor (and the logits when ``return_output``).
    """
    method = "bias_jacobian_penalty"
    x, _ = _validation.format_single_input(inputs, method=method)
    extra = _validation.format_additional_forward_args(additional_forward_args)
    names = _layer_list(model, layers)
    collector = _Collector("full")
    box: Dict[str, Tensor] = {}

    def select(output: Any) -> Tensor:
        selected = _validation.select_output(output, target, x.shape[0], method=method)
        box["output"] = output
        if names is None:
            spatial = _spatial_block_names(collector.sources)
            if not spatial:
                raise ValueError(
                    f"{method}: the model has no spatial (convolutional) block for the default "
                    f"layer; pass layers=... Available {_available(collector.sources)}."
                )
            chosen = [spatial[-1]]
        else:
            chosen = names
        collector.choose(
            _resolve_layers(collector.sources, chosen, role=method, need_spatial=False)
        )
        return selected

    try:
        forward_backward(model, x, select, extra, collector, create_graph=True)
        output = box["output"]
        penalty = output.sum() * 0.0  # keeps the graph when no gradient reached the layers
        for key, _ in collector.layers:
            if key in collector.kept:
                bj = collector.kept[key]
                penalty = penalty + bj.flatten(1).pow(2).sum(1).mean().to(penalty.dtype)
    finally:
        collector.release()
    return (penalty, output) if return_output else penalty


def bias_weight_decay(model: nn.Module, layers: Union[LayerSpec, Sequence[LayerSpec]]) -> Tensor:
    """Squared norm of the bias parameters of ``layers``: ``sum_l ||b_l||^2``.

    The bias weight decay baseline of section 7.2, to be applied to the same layer as the
    bias-Jacobian penalty: for a conv-BN block pass both modules, e.g.
    ``bias_blocks(model, x)[-1].modules`` (the convolution's bias and BatchNorm's beta; the
    running-mean part of BatchNorm's effective bias is not a parameter).

    Raises:
        ValueError: for a name that is not a module of ``model``, or a module without bias.
    """
    names = _layer_list(model, layers)
    if names is None:
        raise ValueError("bias_weight_decay needs the layers whose biases to decay.")
    modules = dict(model.named_modules())
    total: Optional[Tensor] = None
    for name in dict.fromkeys(names):
        module_name = name.split(":")[0].split("#")[0]
        if module_name not in modules:
            available = [
                n for n, m in modules.items() if isinstance(getattr(m, "bias", None), Tensor)
            ]
            raise ValueError(
                f"bias_weight_decay: {name!r} is not a module of the model; modules with a bias: "
                f"{', '.join(available) or 'none'}."
            )
        bias = getattr(modules[module_name], "bias", None)
        if not isinstance(bias, Tensor):
            raise ValueError(
                f"bias_weight_decay: module {module_name!r} "
                f"({type(modules[module_name]).__name__}) has no bias."
            )
        term = bias.pow(2).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


# --------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class MatchingWeights:
    """Weights of the terms of :func:`full_jacobian_matching_loss` (0 switches a term off).

    Attributes:
        output: squared error between the logits ("activation matching").
        input_jacobian: squared error between (L2-normalised) input-Jacobians of the
            target class.
        bias_jacobian: squared error between L2-normalised channel-summed bias-Jacobian
            maps of paired layers, averaged over the pairs.
        attention: attention transfer (Zagoruyko & Komodakis 2017) on the same pairs,
            averaged over the pairs.
    """

    output: float = 1.0
    input_jacobian: float = 1.0
    bias_jacobian: float = 1.0
    attention: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"MatchingWeights.{f.name} must be a finite number >= 0, got {value!r}."
                )


#: The methods of Tables 2 and 3 (each used with the cross-entropy, which is not part of
#: the matching loss). Weights: output 1, every other active term 1; the benchmark scales
#: them (see docs/training.md).
MATCHING_PRESETS: Dict[str, MatchingWeights] = {
    "activation": MatchingWeights(output=1.0, input_jacobian=0.0, bias_jacobian=0.0, attention=0.0),
    "i_jacobian": MatchingWeights(output=1.0, input_jacobian=1.0, bias_jacobian=0.0, attention=0.0),
    "attention": MatchingWeights(output=1.0, input_jacobian=0.0, bias_jacobian=0.0, attention=1.0),
    "i_jacobian_attention": MatchingWeights(
        output=1.0, input_jacobian=1.0, bias_jacobian=0.0, attention=1.0
    ),
    "full_jacobian": MatchingWeights(
        output=1.0, input_jacobian=1.0, bias_jacobian=1.0, attention=0.0
    ),
    "full_jacobian_attention": MatchingWeights(
        output=1.0, input_jacobian=1.0, bias_jacobian=1.0, attention=1.0
    ),
}


@dataclass
class MatchingTerms:
    """The unweighted terms of one call of :func:`full_jacobian_matching_loss`.

    Terms that were switched off (weight 0) are ``None``. ``student_output`` is the
    student's output (logits) of this forward pass, differentiable: take the
    cross-entropy from it instead of running the student a second time.
    """

    output: Optional[Tensor]
    input_jacobian: Optional[Tensor]
    bias_jacobian: Optional[Tensor]
    attention: Optional[Tensor]
    student_output: Tensor
    pairs: List[Tuple[str, str]] = field(default_factory=list)


def _normalise(maps: Tensor) -> Tensor:
    """Per-example L2 normalisation of a batch of maps, flattened to ``(B, N)``."""
    return F.normalize(maps.flatten(1), p=2.0, dim=1, eps=_NORM_EPS)


def _resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(Bi/tri)linear resize of ``(B, *spatial)`` maps to ``size``."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(
        maps.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False
    ).squeeze(1)


def _map_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_i || s_i/||s_i|| - t_i/||t_i|| ||^2`` after resizing both to the larger size."""
    if student.dim() != teacher.dim():
        raise ValueError(
            f"cannot match a {student.dim() - 1}-d map with a {teacher.dim() - 1}-d map "
            f"(shapes {tuple(student.shape)} and {tuple(teacher.shape)})."
        )
    size = [max(a, b) for a, b in zip(student.shape[1:], teacher.shape[1:])]
    s = _normalise(_resize(student, size))
    t = _normalise(_resize(teacher.to(student.dtype), size))
    return (s - t).pow(2).sum(1).mean()


def _attention_map(
    activation: Tensor, channel_dim: int, nonlinearity: Optional[Callable[[Tensor], Tensor]]
) -> Tensor:
    """``F(A) = sum_c A_c^2`` (Zagoruyko & Komodakis 2017), ``(B, *spatial)``."""
    if nonlinearity is not None:
        activation = nonlinearity(activation)
    return activation.pow(2).sum(channel_dim)


@dataclass
class _Network:
    output: Tensor
    input_jacobian: Optional[Tensor]
    layers: List[Tuple[str, List[BiasSource]]]
    maps: Dict[str, Tensor]  # channel-summed bias-Jacobian map per chosen layer
    activations: Dict[str, Tensor]  # output of each chosen layer (for attention)


def _run_network(
    model: Callable[..., Any],
    x: Tensor,
    target: _validation.TargetType,
    extra: Tuple[Any, ...],
    *,
    names: Optional[List[str]],
    choose_default: Callable[[List[str]], List[str]],
    role: str,
    jacobians: bool,
    maps: bool,
    attention: bool,
    create_graph: bool,
) -> _Network:
    """One network's pass: logits, input-Jacobian, maps and activations of the chosen layers.

    ``jacobians``: one backward pass (input-Jacobian; bias-Jacobian maps when ``maps``);
    otherwise the forward pass runs under capture only when ``attention`` needs the
    layers' outputs, and plainly else.
    """
    collector = _Collector("map", keep_outputs=attention)
    box: Dict[str, Any] = {"layers": []}

    def select(output: Any) -> Tensor:
        selected = _validation.select_output(
            output, target, x.shape[0], method="full_jacobian_matching_loss"
        )
        box["output"] = output
        if maps or attention:
            chosen = (
                names
                if names is not None
                else choose_default(_spatial_block_names(collector.sources))
            )
            box["layers"] = _resolve_layers(collector.sources, chosen, role=role, need_spatial=True)
        collector.choose(box["layers"], gradients=maps)
        return selected

    input_jacobian = None
    try:
        if jacobians:
            run = forward_backward(model, x, select, extra, collector, create_graph=create_graph)
            input_jacobian = run.input_gradient
        elif attention:
            copy = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                with Capture(model, copy, collector):
                    output = model(copy, *extra)
                select(output)
        else:
            # Nothing to differentiate for the teacher: no graph.
            with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
                select(model(x, *extra))
        layers = box["layers"]
        like = box["output"]
        kept_maps = {key: collector.value(key, like) for key, _ in layers} if maps else {}
        activations = {key: collector.activation(key) for key, _ in layers} if attention else {}
    finally:
        collector.release()
    return _Network(box["output"], input_jacobian, layers, kept_maps, activations)


def full_jacobian_matching_loss(
    student: Callable[..., Any],
    teacher: Callable[..., Any],
    inputs: Tensor,
    target: _validation.TargetType,
    layer_pairs: Optional[Sequence[Tuple[LayerSpec, LayerSpec]]] = None,
    weights: Union[None, str, MatchingWeights] = None,
    *,
    num_pairs: int = 3,
    normalize_input_jacobian: bool = True,
    attention_nonlinearity: Optional[Callable[[Tensor], Tensor]] = F.relu,
    additional_forward_args: Any = None,
    return_terms: bool = False,
) -> Union[Tensor, Tuple[Tensor, MatchingTerms]]:
    """Full-Jacobian matching (sections 4 and 7.1): distil ``teacher`` into ``student``.

    With ``d(a, b) = mean_i ||a_i - b_i||^2`` (batch mean of a per-example squared L2
    distance) and ``n(m) = m / ||m||_2`` per example, the loss is::

        w.output         * d(logits_s, logits_t)
      + w.input_jacobian * d(n(grad_x f_s), n(grad_x f_t))  (no n if not normalize_input_jacobian)
      + w.bias_jacobian  * mean_pairs d(n(R(sum_c f^b_s,l)), n(R(sum_c f^b_t,l')))
      + w.attention      * mean_pairs d(n(R(sum_c A_s,l^2)), n(R(sum_c A_t,l'^2)))

    where ``f`` is the output of the ``target`` (correct) class, ``sum_c f^b_l`` the
    channel-summed bias-Jacobian map of layer ``l`` (section 4.1.3: summed over channels,
    not space; summed over the sources of a conv-BN block), ``A_l`` the activation the
    block produces (after ``attention_nonlinearity``, ReLU by default, as the activations of
    attention transfer are post-ReLU), and ``R`` a (bi)linear resize of both maps of a pair
    to the larger of their two sizes.

    Normalisation: each map is divided by its per-example L2 norm, as attention transfer
    does. Teacher and student differ in depth and width, so the share of ``f(x)`` that one
    layer's biases carry differs between them (eq. 1 only ties the total); the normalised
    map keeps *where* in the image the layer's intercept acts (the locally-connected
    sub-structure argument of section 4.1.1) and drops a scale that the architectures need
    not share; it also bounds each term by 4, so that one weight fits every pair.
    Input-Jacobians are normalised the same way by default (``normalize_input_jacobian``);
    the logits term carries the scale.

    The teacher must be in eval mode; its quantities are computed without
    ``create_graph`` and detached, and neither its ``.grad`` nor its ``requires_grad``
    flags are touched. The student may be in train mode. The loss is exactly zero when
    the student is a copy of the teacher (same mode) and the pairs are the same layers.

    Args:
        student, teacher: networks mapping ``inputs`` to logits of the same shape.
        inputs: the batch ``(B, C, *spatial)``.
        target: the correct class of each example, in Captum's formats.
        layer_pairs: ``[(student_layer, teacher_layer), ...]`` (block or source names, or
            modules); ``None``: the last ``num_pairs`` spatial blocks of each network,
            paired in order (the deepest with the deepest). Only needed for the
            bias-Jacobian and attention terms.
        weights: a :class:`MatchingWeights`, a key of :data:`MATCHING_PRESETS`, or
            ``None`` for ``MATCHING_PRESETS["full_jacobian"]``.
        num_pairs: number of automatically paired layers.
        normalize_input_jacobian: L2-normalise input-Jacobians per example before the
            squared error (``False``: raw squared error, as literally in section 7.1).
        attention_nonlinearity: applied to a block's output before ``sum_c A_c^2``.
        additional_forward_args: further arguments of both networks.
        return_terms: also return the unweighted :class:`MatchingTerms` (with the
            student's logits, for the cross-entropy).

    Raises:
        ValueError: for a teacher in training mode, unknown layer names (the message lists
            the available ones), non-spatial layers, or outputs of different shapes.
    """
    method = "full_jacobian_matching_loss"
    x, _ = _validation.format_single_input(inputs, method=method)
    extra = _validation.format_additional_forward_args(additional_forward_args)
    if weights is None:
        weights = MATCHING_PRESETS["full_jacobian"]
    elif isinstance(weights, str):
        if weights not in MATCHING_PRESETS:
            raise ValueError(
                f"{method}: unknown preset {weights!r}; presets: {', '.join(MATCHING_PRESETS)}."
            )
        weights = MATCHING_PRESETS[weights]
    elif not isinstance(weights, MatchingWeights):
        raise TypeError(f"{method}: weights must be a MatchingWeights, a preset name or None.")
    if isinstance(teacher, nn.Module):
        _validation.check_eval_mode(teacher, method=f"{method} (teacher)")
    if num_pairs < 1:
        raise ValueError(f"{method}: num_pairs must be >= 1, got {num_pairs}.")

    student_names: Optional[List[str]] = None
    teacher_names: Optional[List[str]] = None
    if layer_pairs is not None:
        pairs = list(layer_pairs)
        if not pairs:
            raise ValueError(f"{method}: layer_pairs is empty; pass None for automatic pairing.")
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(
                    f"{method}: each layer pair must be (student_layer, teacher_layer), "
                    f"got {pair!r}."
                )
        student_names = _layer_list(student, [p[0] for p in pairs])
        teacher_names = _layer_list(teacher, [p[1] for p in pairs])

    need_maps = weights.bias_jacobian > 0 or weights.attention > 0
    need_jacobians = weights.input_jacobian > 0 or weights.bias_jacobian > 0
    # Default pairing: the last k spatial blocks of each network, k = min(num_pairs, both counts).
    counts: Dict[str, int] = {}

    def teacher_default(spatial: List[str]) -> List[str]:
        counts["teacher"] = len(spatial)
        return spatial[-min(num_pairs, len(spatial)) :] if spatial and need_maps else []

    def student_default(spatial: List[str]) -> List[str]:
        k = min(num_pairs, len(spatial), counts.get("teacher", 0)) if need_maps else 0
        if need_maps and k == 0:
            raise ValueError(
                f"{method}: the bias-Jacobian and attention terms need spatial blocks, but the "
                f"student has {len(spatial)} and the teacher {counts.get('teacher', 0)}; pass "
                "layer_pairs or set those weights to 0."
            )
        return spatial[len(spatial) - k :] if k else []

    teacher_run = _run_network(
        teacher,
        x,
        target,
        extra,
        names=teacher_names if need_maps else [],
        choose_default=teacher_default,
        role=f"{method}: teacher",
        jacobians=need_jacobians,
        maps=weights.bias_jacobian > 0,
        attention=weights.attention > 0,
        create_graph=False,
    )
    teacher_layers = teacher_run.layers
    student_run = _run_network(
        student,
        x,
        target,
        extra,
        names=student_names if need_maps else [],
        choose_default=student_default,
        role=f"{method}: student",
        jacobians=need_jacobians,
        maps=weights.bias_jacobian > 0,
        attention=weights.attention > 0,
        create_graph=True,
    )
    student_layers = student_run.layers
    if need_maps and layer_pairs is None:
        # The teacher kept its last min(num_pairs, count) blocks; pair the deepest ones.
        teacher_layers = teacher_layers[len(teacher_layers) - len(student_layers) :]
    if need_maps and len(student_layers) != len(teacher_layers):  # pragma: no cover - guarded above
        raise ValueError(
            f"{method}: {len(student_layers)} student layers for {len(teacher_layers)} "
            "teacher layers."
        )

    s_out, t_out = student_run.output, teacher_run.output.detach()
    if not isinstance(s_out, Tensor) or s_out.shape != t_out.shape:
        raise ValueError(
            f"{method}: student output shape {tuple(getattr(s_out, 'shape', ()))} differs from "
            f"the teacher's {tuple(t_out.shape)}."
        )

    zero = s_out.sum() * 0.0
    loss = zero
    terms: Dict[str, Optional[Tensor]] = {
        "output": None,
        "input_jacobian": None,
        "bias_jacobian": None,
        "attention": None,
    }
    if weights.output > 0:
        terms["output"] = (s_out - t_out.to(s_out.dtype)).pow(2).flatten(1).sum(1).mean()
    if weights.input_jacobian > 0:
        if student_run.input_jacobian is None or teacher_run.input_jacobian is None:
            raise RuntimeError("captum_fullgrad: a network's pass kept no input-Jacobian")
        s_j, t_j = student_run.input_jacobian, teacher_run.input_jacobian.detach()
        if normalize_input_jacobian:
            s_j, t_j = _normalise(s_j), _normalise(t_j)
        terms["input_jacobian"] = (s_j - t_j.to(s_j.dtype)).pow(2).flatten(1).sum(1).mean()
    pairs_out = [(s, t) for (s, _), (t, _) in zip(student_layers, teacher_layers)]
    if weights.bias_jacobian > 0:
        distances = [
            _map_distance(student_run.maps[s_name], teacher_run.maps[t_name].detach())
            for (s_name, _), (t_name, _) in zip(student_layers, teacher_layers)
        ]
        terms["bias_jacobian"] = torch.stack(distances).mean()
    if weights.attention > 0:
        distances = []
        for (s_name, s_members), (t_name, t_members) in zip(student_layers, teacher_layers):
            s_dim, t_dim = s_members[-1].channel_dim, t_members[-1].channel_dim
            if s_dim is None or t_dim is None:
                raise RuntimeError(f"captum_fullgrad: `{s_name}` or `{t_name}` has no channel axis")
            s_map = _attention_map(student_run.activations[s_name], s_dim, attention_nonlinearity)
            with torch.no_grad():
                t_map = _attention_map(
                    teacher_run.activations[t_name].detach(), t_dim, attention_nonlinearity
                )
            distances.append(_map_distance(s_map, t_map))
        terms["attention"] = torch.stack(distances).mean()
    for name, value in terms.items():
        if value is not None:
            loss = loss + getattr(weights, name) * value.to(loss.dtype)
    if return_terms:
        return loss, MatchingTerms(
            output=terms["output"],
            input_jacobian=terms["input_jacobian"],
            bias_jacobian=terms["bias_jacobian"],
            attention=terms["attention"],
            student_output=s_out,
            pairs=pairs_out,
        )
    return loss
