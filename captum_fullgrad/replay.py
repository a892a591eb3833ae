"""Replay: the bias sources of a traced forward pass, found again with plain module hooks.

The traced capture (:class:`captum_fullgrad.capture.Capture`) runs every torch call of the
forward pass through a ``TorchFunctionMode``. That is what makes it general, and it costs
host time for every operation, intercept-free ones included (about 4 ms of Python per
VGG-16-BN call on a laptop-class core; a GPU waits for it at small batches).

Most convolutional networks (VGG, ResNet, DenseNet, AlexNet, SqueezeNet...) have bias
sources only in their convolution, linear and BatchNorm modules: every other operation
(ReLU, pooling, residual additions of two graph tensors, concatenation, flatten) has a zero
intercept (seed section 3.2). For such a network the trace of one call says everything
later calls need: which module calls produce a source, in which order, and which
convolution's bias is reduced together with the BatchNorm that reads it. A
:class:`CapturePlan` keeps that, and :meth:`CapturePlan.replay` finds the same sources
with one global forward hook (and a global pre-hook where an in-place activation's input
must be read first), reading each intercept from the module's current state (so changed
weights, biases or BatchNorm statistics are picked up).

A plan is made only when every source of the traced call came from the first operation of
a leaf module of one of the exact types ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
``nn.Linear``, ``nn.BatchNorm1d/2d/3d`` in eval mode (or timm's ``BatchNormAct2d``,
whose BatchNorm node is found under its activation), an activation module whose
intercept follows from the call's input and output (``_intercepts.activation_settings``:
ReLU6, SiLU, GELU...; an in-place one's input is read in a pre-hook) or a normalisation
module (``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``InstanceNorm*``, torchvision's
``LayerNorm2d``), subclasses excluded (they may override ``forward``); or was a product
of two graph tensors that a module returned (squeeze-and-excitation's ``scale * x``,
intercept ``-y``); or lies in a *region* (below); and no operation failed. The replay
checks, call by call, that the same
modules run in the same order with the planned output shapes and the same forward hooks,
that the global module hooks are the same and that no planned layer gained or lost a
bias; BatchNorm vectors are recomputed every call (training steps change the running
statistics without a version bump). When a check fails, it
raises :class:`ReplayMismatch` after the forward pass and before any backward pass, and the
caller traces the call instead. What the guard cannot see is a functional operation with
an intercept that a ``forward`` performs only for some input values; the completeness
delta that :class:`~captum_fullgrad.FullGradient` returns would show it, and
``FullGradient(..., reuse_capture=False)`` traces every call.

Sources that no module hook can reach (attention's operations, ViT's class token and
position embedding, a module of another type) lie in *regions*: module calls whose sources
add up to ``<df/dy, y> - <J^T df/dy, a>`` (eq. 1 on the call), read from copies of the
call's arguments and output that the replay makes at its boundary (see ``_Regions``). A
region's term goes to eq. 1's sum only, so every source in it must be non-spatial.

An activation step whose autograd node saves the op's input (``register_activation``'s
``backward_node``) forms no intercept in the forward pass: a post-hook on that node hands
the collector ``df/dy`` with ``(y, J^T df/dy, a)``, and ``df/dy * c = df/dy * y -
(J^T df/dy) * a`` element by element (docs/math.md); a gated one (hardtanh, ReLU6) hands
``(df/dy - J^T df/dy) * y``'s factors without its input. Where the node saves the output
instead (sigmoid, tanh: ``holds_input``), the replay keeps the input for the hook, and the
end of the forward pass checks that nothing changed it in place (if something did, the
call is traced and that step keeps the closed form from then on). A small activation
outside the maps (a squeeze-excitation gate) gets no hook: its gradient is captured (see
below) and its closed form formed after the backward pass from the input and output kept
until then. A returned product's ``c = -y`` is
never formed (the channel-summed ``df/dy * y`` is negated), and a normalisation keeps only
``s = eps / (var + eps)`` from the forward pass: its closed form ``y - (y - beta) s`` is
formed when the backward pass reaches the output, or, where ``s`` is constant along the
channels, replaced by ``(1 - s) sum_c df/dy y + s (df/dy . beta)`` in eq. 4's channel sum.

Small layers (an output of at most ``_CAPTURED_ELEMENTS`` elements) whose term is a
channel vector get no hook: the backward pass that computes the input gradient also
returns the gradient at each such layer's autograd edge (``torch.autograd.grad`` with
``GradientEdge`` inputs, torch >= 2.4), and the collector reduces them one by one
afterwards. What a Python hook costs there is host time, not arithmetic; a larger layer
keeps its hook, which reduces its gradient while it is in cache and lets it go.

A plan without regions goes one step further once a hooked replay has fitted it: the
forward pass runs without the global hook. Conv, Linear and BatchNorm steps are found in
the autograd graph before the backward pass, by one walk that also checks the graph
against the one the hooked replay saw; only the modules of the other steps get a forward
hook of their own (``_Graph``).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._intercepts import (
    Intercept,
    activation_backward_node,
    activation_holds_input,
    activation_is_gated,
    activation_linear_part,
    activation_reads_input_first,
    activation_settings,
    normalisation_op,
    normalisation_parts,
    normalisation_settings,
    saved_layer_norm_rstd,
)
from .capture import (
    _CONV_NAMES,
    _OWN_GLOBAL_HOOKS,
    BiasSource,
    Capture,
    Collector,
    Recorder,
    install_global_module_hooks,
    register_gradient_hook,
    remove_global_module_hooks,
    thread_workspace,
)

__all__ = ["CapturePlan", "PlanCache", "ReplayMismatch", "call_signature", "plans_for"]

_CONVOLUTIONS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# The traced ops a planned module's source may come from (any convolution op for any
# convolution module, as the trace names them).
_OPS: Dict[type, AbstractSet[str]] = {
    **{t: _CONV_NAMES for t in _CONVOLUTIONS},
    nn.Linear: frozenset({"linear"}),
    **{t: frozenset({"batch_norm"}) for t in _BATCH_NORMS},
}


class ReplayMismatch(RuntimeError):
    """The forward pass did not call the planned modules in the planned order and shapes."""


class ActivationInputChanged(ReplayMismatch):
    """An activation's input that the replay kept for its backward-pass term (a sigmoid's,
    or a small gate's) was changed in place after the call (even through another view of
    the same tensor). The call is traced; the plan still holds, and ``steps`` (added to
    :attr:`CapturePlan.closed_form_steps` by the caller) keep the closed form from then on."""

    def __init__(self, steps: Tuple[int, ...]) -> None:
        super().__init__("an activation's input was changed in place after the call")
        self.steps = steps


@dataclass(frozen=True)
class _Step:
    """One planned source: what the trace knew of it, without any tensor of the model."""

    template: BiasSource  # the traced source, its intercept reduced to the layout
    shape: torch.Size
    # A convolution reduced with the BatchNorm at step ``folded_into`` (no hook of its own);
    # that BatchNorm has ``absorbs`` set to this convolution's step.
    folded_into: Optional[int] = None
    absorbs: Optional[int] = None
    batch_norm: bool = False
    # An activation module's op name and attributes (see ``activation_settings``): its
    # dense intercept is computed from the call's input and output.
    activation: Optional[Tuple[Any, ...]] = None
    # A product of two graph tensors returned by a (non-leaf) module: ``c = -y``, and the
    # type of the autograd node that must have made the output.
    product_node: Optional[type] = None
    # A normalisation module's ``(kind, axes, eps)`` (see ``normalisation_settings``).
    normalisation: Optional[Tuple[Any, ...]] = None
    # A BatchNorm whose module runs more after it (timm's BatchNormAct2d): the source is
    # the output of the BatchNorm's autograd node, found under the module's output.
    batch_norm_inside: bool = False


class CapturePlan:
    """Which module calls produce the bias sources of a traced call; replayable with hooks.

    Make one with :meth:`record` from a finished :class:`~captum_fullgrad.capture.Capture`;
    ``None`` means the network has a source that module hooks cannot reproduce.
    """

    def __init__(
        self,
        steps: Sequence[_Step],
        calls: Sequence[nn.Module],
        step_at: Sequence[Optional[int]],
        boundaries: Optional[Dict[int, Tuple[int, int]]] = None,
    ) -> None:
        self.steps: Tuple[_Step, ...] = tuple(steps)
        # Region boundaries (see ``_Regions``): by the order calls start, the position of
        # the call in ``calls`` and its weight; and by that position, the weight.
        self.boundary_starts: Dict[int, Tuple[int, int]] = dict(boundaries or {})
        self.boundary_returns: Dict[int, Tuple[int, int]] = {
            returned: (start, weight) for start, (returned, weight) in self.boundary_starts.items()
        }
        # Every module call of the traced forward pass, in the order the calls returned,
        # and the step (if any) that each call produces: the replay's guard. Weak
        # references: plans are cached per model and must not keep it alive.
        self.calls: Tuple["weakref.ref[nn.Module]", ...] = tuple(weakref.ref(m) for m in calls)
        self.step_at: Tuple[Optional[int], ...] = tuple(step_at)
        self.step_call: Tuple[int, ...] = tuple(step_at.index(i) for i in range(len(self.steps)))
        self._batch_norm_steps = [i for i, s in enumerate(self.steps) if s.batch_norm]
        # In-place activations whose input must be read before their call, by module id
        # (the call-sequence guard checks identities).
        self.read_first: Dict[int, Tuple[Any, ...]] = {
            id(calls[self.step_call[i]]): s.activation
            for i, s in enumerate(self.steps)
            if s.activation is not None and activation_reads_input_first(s.activation)
        }
        # Whether each call of a Conv/Linear/BatchNorm module that made no source had a
        # bias (a bias added later would be a source the plan does not have).
        self.had_bias: Tuple[Optional[bool], ...] = tuple(
            None if k is not None or type(m) not in _OPS else getattr(m, "bias", None) is not None
            for m, k in zip(calls, step_at)
        )
        # User hooks per call (None: none), and the global module hooks: a hook added or
        # removed later may add or remove an operation, so the plan would not fit.
        self.hooks_at: Tuple[Any, ...] = tuple(_hook_key(m) for m in calls)
        self.global_hooks = _global_hook_key()
        # What the replay's forward hook reads for call ``k``, in one tuple (it runs for
        # every module call, so its host time counts): the module, its hooks, its step, its
        # bias flag and its region boundary.
        self.entries: Tuple[Tuple[Any, Any, Optional[int], Optional[bool], Any], ...] = tuple(
            zip(
                self.calls,
                self.hooks_at,
                self.step_at,
                self.had_bias,
                (self.boundary_returns.get(k) for k in range(len(self.calls))),
            )
        )
        # Steps whose terms need their module's call (its input or output): an activation,
        # a normalisation, a returned product, timm's BatchNormAct2d. A graph replay hooks
        # these modules only (``module_hooks``); the other steps are found in the graph.
        self.module_steps = frozenset(
            i
            for i, s in enumerate(self.steps)
            if s.activation is not None
            or s.normalisation is not None
            or s.product_node is not None
            or s.batch_norm_inside
        )
        hooked: Dict[int, nn.Module] = {}
        for module, step in zip(calls, step_at):
            if step is not None and step in self.module_steps:
                hooked.setdefault(id(module), module)
        # Per hooked module: the step (or None) of each of its calls in order, and whether
        # its input must be read before the call.
        self.module_hooks: Tuple[
            Tuple["weakref.ref[nn.Module]", Tuple[Optional[int], ...], bool], ...
        ] = tuple(
            (
                weakref.ref(module),
                tuple(step for m, step in zip(calls, step_at) if m is module),
                key in self.read_first,
            )
            for key, module in hooked.items()
        )
        # Whether a replay may find the steps in the autograd graph rather than with a
        # global module hook (see ``_Graph``): no regions (their boundaries copy tensors in
        # the forward pass), and no user hook on a module that the graph replay hooks (a
        # module's own hooks run after the user's; the global hook runs before them).
        self.graph_eligible = not self.boundary_starts and all(
            key is None for module, key in zip(calls, self.hooks_at) if id(module) in hooked
        )
        # Learned by the first hooked replay that fits (see ``Replay.prepare_backward``).
        self.graph: Optional[_Graph] = None
        # What the collector of the last call with this plan kept, in the collector's own
        # terms (``MapCollector.layout``), so that the next call reserves it before its
        # forward pass. The replay neither reads nor checks it.
        self.collector_layout: Any = None
        self._step_elements = tuple(s.shape.numel() for s in self.steps)
        # The largest term formed in a workspace (activations' and products'), reserved
        # before each replay's forward pass.
        self.largest_term = max(
            (
                n
                for s, n in zip(self.steps, self._step_elements)
                if s.activation is not None or s.product_node is not None
            ),
            default=0,
        )
        # Each step's output shape as autograd's node metadata gives it (a list).
        self._step_shapes = tuple(list(s.shape) for s in self.steps)
        # Each Conv/Linear step's source as last built: its intercept is the bias parameter
        # itself, so in-place changes are seen through it.
        self._sources: List[Optional[BiasSource]] = [None] * len(self.steps)
        # Each BatchNorm step's source with the vectors it was built from.
        self._batch_norm_sources: List[Optional[Tuple[Any, BiasSource]]] = [None] * len(self.steps)
        # Activation steps whose input the model changed in place after the call (while the
        # replay kept it for the backward pass: :class:`ActivationInputChanged`): they form
        # the closed-form intercept in the forward pass from then on.
        self.closed_form_steps: set = set()

    def source_for(
        self,
        step: int,
        module: nn.Module,
        batch_norm: Dict[int, Tuple[Optional[Tensor], ...]],
    ) -> Optional[BiasSource]:
        """The source of ``step`` from the module's current parameters; ``None`` if it has none."""
        planned = self.steps[step]
        channel_dim = planned.template.intercept.channel_dim
        if isinstance(module, _BATCH_NORMS):
            vectors = batch_norm.get(step)
            if vectors is None:
                return None
            last = self._batch_norm_sources[step]
            if last is not None and last[0] is vectors:
                # batch_norm_vectors served the last call's vectors (every value read
                # unchanged): the source built from them is the same.
                return last[1]
            scale, effective_bias, folded, block = vectors
            source = _with_intercept(
                planned.template,
                Intercept(
                    None, channel_vector=effective_bias, channel_dim=channel_dim, input_scale=scale
                ),
            )
            source.folded_vector, source.block_vector = folded, block
            self._batch_norm_sources[step] = (vectors, source)
            return source
        bias = module.bias
        if not isinstance(bias, Tensor):
            return None
        cached = self._sources[step]
        if cached is not None and cached.intercept.channel_vector is bias:
            return cached
        cached = self._sources[step] = _with_intercept(
            planned.template, Intercept(None, channel_vector=bias, channel_dim=channel_dim)
        )
        return cached

    # The last flat inputs of batch_norm_vectors and what they gave (its key, see there).
    _last_batch_norm_vectors: Optional[
        Tuple[Hashable, Tensor, Dict[int, Tuple[Optional[Tensor], ...]]]
    ] = None

    def batch_norm_vectors(self) -> Optional[Dict[int, Tuple[Optional[Tensor], ...]]]:
        """Every BatchNorm step's (scale, effective bias, folded conv bias, block vector).

        The modules' current statistics and parameters are read on every call (a
        training-mode forward pass and writes through ``.data`` change them without a
        version bump), concatenated into one flat tensor; equal to the last call's, they
        give the last call's vectors, otherwise the vectors are computed from it in a
        handful of kernels and split into per-layer views (on the CPU a multi-tensor
        kernel still dispatches once per tensor: 90 dispatches for 13 layers). ``None``
        when a module is gone, training, or without running statistics or a folded bias.
        """
        steps = self._batch_norm_steps
        if not steps:
            return {}
        # Any: BatchNorm attributes read as tensors, not as Tensor | Module.
        modules: List[Any] = []
        convs: List[Any] = []
        # The flat path's inputs, per layer: (running_var, running_mean, weight, bias, eps)
        # and the folded convolutions' biases; ``flat`` while every layer is affine and
        # every vector has the first one's dtype.
        columns: List[List[Any]] = [[], [], [], [], []]
        conv_biases: List[Tensor] = []
        dtype = None
        flat = True
        calls, step_call, planned = self.calls, self.step_call, self.steps
        for step in steps:
            bn = calls[step_call[step]]()
            if bn is None or bn.training:
                return None
            buffers, parameters = bn._buffers, bn._parameters
            var, mean = buffers.get("running_var"), buffers.get("running_mean")
            if var is None or mean is None:
                return None
            absorbs = planned[step].absorbs
            conv = None
            if absorbs is not None:
                conv = calls[step_call[absorbs]]()
                conv_bias = None if conv is None else conv._parameters.get("bias")
                if conv_bias is None:
                    return None
                conv_biases.append(conv_bias)
                flat = flat and conv_bias.dtype is var.dtype
            modules.append(bn)
            convs.append(conv)
            if flat:
                weight, bias = parameters.get("weight"), parameters.get("bias")
                if dtype is None:
                    dtype = var.dtype
                flat = (
                    weight is not None
                    and bias is not None
                    and var.dtype is dtype
                    and mean.dtype is dtype
                    and weight.dtype is dtype
                    and bias.dtype is dtype
                )
                for column, value in zip(columns, (var, mean, weight, bias, bn.eps)):
                    column.append(value)
        with torch.no_grad():
            if flat:
                try:
                    inputs = _concatenated(
                        [*columns[:4], conv_biases], sum(t.shape[0] for t in columns[0])
                    )
                except RuntimeError:  # vectors on several devices: per-layer kernels
                    flat = False
            if not flat:
                return dict(zip(steps, _foreach_batch_norm_vectors(modules, convs)))
            # The current values, all of them, in one tensor: when they equal the last
            # call's exactly (the usual case between training steps), so do the vectors.
            # Comparing values, not versions, sees every change (a training forward pass
            # and ``.data`` writes bump no version). Only on the CPU: on an accelerator the
            # comparison's answer would wait for the device (a synchronisation per call),
            # and the kernels are launched without waiting.
            sizes = tuple(t.shape[0] for t in columns[0])
            key = (sizes, tuple(columns[4]), tuple(conv is not None for conv in convs))
            last = self._last_batch_norm_vectors
            if (
                last is not None
                and inputs.device.type == "cpu"
                and last[0] == key
                and last[1].dtype == inputs.dtype
                and last[1].device == inputs.device
                and torch.equal(last[1], inputs)
            ):
                return last[2]
            vectors = _flat_batch_norm_vectors(inputs, sizes, columns[4], convs)
            result = dict(zip(steps, vectors))
            # One tuple, replaced whole: a concurrent call reads the old or the new one.
            self._last_batch_norm_vectors = (key, inputs, result)
        return result

    @classmethod
    def record(cls, capture: Optional[Recorder]) -> Optional["CapturePlan"]:
        """The plan of a traced call, or ``None`` when it cannot be replayed exactly (or
        ``capture`` is not a :class:`~captum_fullgrad.capture.Capture`: a replay's record)."""
        if (
            not isinstance(capture, Capture)
            or capture.failed_ops
            or not capture.sources
            or not capture.module_calls
        ):
            return None
        if _global_hook_key()[0]:
            # A global forward hook runs before the replay's and may replace a module's
            # output, which the replay would then take for the operation's.
            return None
        kinds = {id(source): _step_kind(capture, source) for source in capture.sources}
        regions = _Regions.plan(capture, kinds)
        if regions is None:
            return None
        steps: List[_Step] = []
        position: Dict[int, int] = {}
        step_at: List[Optional[int]] = [None] * len(capture.module_calls)
        for source in capture.sources:
            if id(source) in regions.absorbed:
                continue  # its term is its region's
            kind = kinds[id(source)]
            if isinstance(kind, str):
                return None
            module, call, activation, product_node, normalisation = kind
            if step_at[call] is not None:
                return None  # a second source in one call
            if (
                activation is not None
                and activation_reads_input_first(activation)
                and (_hook_key(module) or ((), ()))[1]
            ):
                return None  # its own pre-hooks run after the replay's, and may change the input
            position[id(source)] = len(steps)
            step_at[call] = len(steps)
            layout_only = Intercept(None, channel_dim=source.intercept.channel_dim)
            template = dataclasses.replace(
                source, intercept=layout_only, folded_vector=None, block_vector=None
            )
            if normalisation is not None and normalisation[0] == "channel_layer_norm":
                # Traced on the channels-last tensor between LayerNorm2d's permutes, replayed
                # on the module's channels-first output: the same channel sums.
                n, *spatial, channels = source.shape
                template = dataclasses.replace(
                    template, shape=torch.Size([n, channels, *spatial]), channel_dim=1
                )
            steps.append(
                _Step(
                    template=template,
                    shape=template.shape,
                    batch_norm=isinstance(module, _BATCH_NORMS),
                    activation=activation,
                    product_node=product_node,
                    normalisation=normalisation,
                    batch_norm_inside=_is_timm_batch_norm_act(module),
                )
            )
        for conv, batch_norm in capture.folded_pairs():
            if id(conv) not in position or id(batch_norm) not in position:
                return None  # a pair split by a region: traced
            i, j = position[id(conv)], position[id(batch_norm)]
            steps[i] = dataclasses.replace(steps[i], folded_into=j)
            steps[j] = dataclasses.replace(steps[j], absorbs=i)
        return cls(steps, capture.module_calls, step_at, regions.boundaries)

    def hooks_unchanged(self) -> bool:
        """Whether every planned module is alive and has the forward hooks it had at the
        trace (a hook added or removed may add or remove an operation)."""
        for call, key in zip(self.calls, self.hooks_at):
            module = call()
            if module is None:
                return False
            if (module._forward_hooks or module._forward_pre_hooks or key is not None) and (
                _hook_key(module) != key
            ):
                return False
        return True

    def replay(
        self, inputs: Tensor, collector: Collector, *, capture_gradients: bool = False
    ) -> "Replay":
        """A context manager that finds this plan's sources in the forward pass it wraps.

        ``capture_gradients``: small layers' gradients are not handed over by hooks during
        the backward pass but captured by it (see :attr:`Replay.gradient_edges`); the
        caller then passes :meth:`Replay.deliver_gradients` what it captured.
        """
        return Replay(self, inputs, collector, capture_gradients=capture_gradients)


# Why a source has no step of its own: it may be covered by a region (see ``_Regions``), or
# it may not (a BatchNorm on batch statistics mixes the examples, so no per-example term).
_IN_FORWARD = "an operation written in a forward"
_UNFAMILIAR = "an unfamiliar module"
_NOT_PLANNED = "a source the plan cannot reproduce"
_NEVER = "a BatchNorm on batch statistics"
_StepKind = Tuple[nn.Module, int, Any, Optional[type], Any]


def _step_kind(capture: Capture, source: BiasSource) -> "_StepKind | str":
    """``(module, call, activation, product node, normalisation)`` for a source a module
    hook can reproduce, else the reason it cannot."""
    activation = product_node = normalisation = None
    origin = capture.origin(source)
    if origin is not None:
        module, call = origin
        activation = activation_settings(module)
        normalisation = normalisation_settings(module)
        if activation is not None:
            if source.op != activation[0] or source.intercept.dense is None:
                return _NOT_PLANNED
        elif normalisation is not None:
            if source.op != normalisation_op(normalisation) or source.intercept.dense is None:
                return _NOT_PLANNED
        elif source.op not in _OPS.get(type(module), ()) or source.intercept.channel_vector is None:
            return _UNFAMILIAR
        elif isinstance(module, _BATCH_NORMS) and source.intercept.input_scale is None:
            return _NEVER  # batch statistics: the intercept needs forward-mode AD
    else:
        returned = capture.output_origin(source)
        if returned is None:
            inside = _batch_norm_act_call(capture, source)
            if inside is None:
                return _IN_FORWARD
            module, call = inside
            return module, call, activation, product_node, normalisation
        module, call, product_node = returned
    return module, call, activation, product_node, normalisation


def _is_timm_batch_norm_act(module: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` without a drop layer: ``F.batch_norm`` on the module's
    own parameters and statistics, then its ``act`` child (recognised without importing
    timm; a subclass may override ``forward``)."""
    kind = type(module)
    return (
        kind.__name__ == "BatchNormAct2d"
        and kind.__module__ == "timm.layers.norm_act"
        and isinstance(module, nn.BatchNorm2d)
        and type(getattr(module, "drop", None)) is nn.Identity
        and isinstance(getattr(module, "act", None), nn.Module)
    )


def _batch_norm_act_call(capture: Capture, source: BiasSource) -> Optional[Tuple[nn.Module, int]]:
    """The call of a timm ``BatchNormAct2d`` in eval mode whose own forward made ``source``
    (its BatchNorm), or ``None``."""
    start = capture.frame(source)
    position = None if start is None else capture.call_position(start)
    if position is None or source.op != "batch_norm":
        return None
    module = capture.module_calls[position]
    if (
        not _is_timm_batch_norm_act(module)
        or source.intercept.channel_vector is None
        or source.intercept.input_scale is None  # batch statistics
    ):
        return None
    return module, position


# The autograd nodes of a BatchNorm in eval mode, by device and backend.
_BATCH_NORM_NODES = frozenset(
    {
        "NativeBatchNormBackward0",
        "CudnnBatchNormBackward0",
        "MiopenBatchNormBackward0",
        "NativeBatchNormLegitNoTrainingBackward0",
    }
)


def _batch_norm_node(output: Tensor, module: Any) -> Any:
    """The autograd node of ``module``'s BatchNorm under its output: the output's own node
    or one to three nodes down the first input (the ``act`` child's); the node must have
    read this module's running mean. ``None`` when there is no such node."""
    node = output.grad_fn
    mean = module.running_mean
    for _ in range(4):
        if node is None:
            return None
        if type(node).__name__ in _BATCH_NORM_NODES:
            saved = getattr(node, "_saved_running_mean", None)
            if not isinstance(saved, Tensor) or mean is None or saved.data_ptr() != mean.data_ptr():
                return None
            return node
        edges = node.next_functions
        node = edges[0][0] if edges else None
    return None


@dataclass
class _Regions:
    """Module calls replayed as one term each, for sources no module hook can reach.

    For any module call ``M`` that maps its graph inputs ``a`` to its output ``y``, the
    intercept terms of every operation inside it add up to

        <df/dy, y> - <J_M^T df/dy, a>                                   (eq. 1 on ``M``)

    and both gradients are what the backward pass carries across the call's boundary
    (docs/math.md). A *region* is a call whose sources are all left to that identity:

    - an **opaque** region is the innermost call running an operation written in a
      ``forward`` (attention's matmuls, softmax, ``scaled_dot_product_attention``) or an
      unfamiliar module, when nothing inside it is a spatial map and every source inside
      it is its own or a leaf module's: its whole inside is one term (the outermost such
      call, if they nest);
    - a **frame** is such a call that holds spatial sources or sources deeper down (a
      transformer's encoder adding the position embedding), or the model itself (ViT's
      class token): its term is its identity minus those of its *holes*, the calls it
      makes directly that contain sources, which keep their own steps.

    ``boundaries`` gives each call's weight in ``sum_c w_c (<df/dy_c, y_c> - <J^T, a_c>)``:
    ``+1`` for a region, ``-1`` for a hole, ``0`` (no boundary) for both. A region's term
    goes to eq. 1's sum only, never to eq. 4's map: every source it covers must be
    non-spatial, as the trace found. The delta still checks every step outside the
    regions (a hole's identity is independent of its steps' closed forms).
    """

    absorbed: AbstractSet[int]  # ids of the sources a region covers
    # By the order in which the call started: its position in the call sequence (the
    # order calls returned) and its weight.
    boundaries: Dict[int, Tuple[int, int]]

    @classmethod
    def plan(cls, capture: Capture, kinds: Dict[int, "_StepKind | str"]) -> Optional["_Regions"]:
        candidates = [s for s in capture.sources if kinds[id(s)] in (_IN_FORWARD, _UNFAMILIAR)]
        if not candidates:
            return cls(frozenset(), {})
        collector = capture.collector
        if (
            capture.other_inputs
            or getattr(collector, "selected", None) is not None
            or not callable(getattr(collector, "on_term", None))
        ):
            return None  # several inputs, a layer filter, or a collector without region terms
        parents = capture.call_parents
        frames = {id(s): capture.frame(s) for s in capture.sources}

        def ancestors(call: Optional[int]) -> List[int]:
            chain: List[int] = []
            while call is not None:
                chain.append(call)
                call = parents.get(call)
            return chain

        chains = {id(s): ancestors(frames[id(s)]) for s in capture.sources}
        spatial_under = {c for s in capture.sources if s.spatial for c in chains[id(s)]}
        # Calls with a source two or more calls down (a transformer's encoder, a block):
        # frames, so that the steps of their layers stay checked by the delta.
        deep_under = {c for s in capture.sources for c in chains[id(s)][2:]}
        opaque, framing = set(), set()
        for source in candidates:
            call = frames[id(source)]
            if call is None:
                return None  # outside every module of the model
            if call in spatial_under or call in deep_under or parents.get(call) is None:
                framing.add(call)
            else:
                opaque.add(call)
        # The outermost of nested opaque calls; nothing inside an opaque call is a frame.
        opaque = {c for c in opaque if not any(a in opaque for a in ancestors(c)[1:])}
        framing = {c for c in framing if not any(a in opaque for a in ancestors(c))}
        if framing & opaque:
            return None
        holes = set()
        for source in capture.sources:
            chain = chains[id(source)]
            for child, parent in zip(chain, chain[1:]):
                if parent in framing:
                    holes.add(child)
        absorbed = set()
        for source in capture.sources:
            chain = chains[id(source)]
            if any(c in opaque for c in chain) or (chain and chain[0] in framing):
                absorbed.add(id(source))
        for source in capture.sources:
            if id(source) in absorbed and (source.spatial or kinds[id(source)] == _NEVER):
                return None  # a region's term has no map, or no per-example split
        boundaries: Dict[int, Tuple[int, int]] = {}
        for call in opaque | framing | holes:
            weight = int(call in opaque or call in framing) - int(call in holes)
            if weight:
                returned = capture.call_position(call)
                if returned is None or not capture.call_batch_first.get(call, False):
                    return None  # no boundary, or its examples are not along axis 0
                boundaries[call] = (returned, weight)
        return cls(frozenset(absorbed), boundaries)


def _with_intercept(template: BiasSource, intercept: Intercept) -> BiasSource:
    # A shallow copy (dataclasses.replace re-runs __init__ and its checks).
    source = BiasSource.__new__(BiasSource)
    source.__dict__.update(template.__dict__)
    source.intercept = intercept
    return source


def _foreach_pairs(
    op: Callable[..., Any], tensors: List[Tensor], others: List[Optional[Tensor]]
) -> None:
    """``op(tensors[i], others[i])`` in place for every ``i`` whose ``others[i]`` is set."""
    pairs = [(t, o) for t, o in zip(tensors, others) if o is not None]
    if pairs:
        op([t for t, _ in pairs], [o for _, o in pairs])


# torch.cat on the CPU copies its inputs one at a time (about 1.7 us each) when the result
# has this many elements or more and several threads are set, and in one serial kernel
# below it: 208 BatchNorm vectors of MobileNet-V2 took 360 us at 2 threads, 50 us at one.
_SERIAL_CAT_ELEMENTS = 1 << 15


def _concatenated(columns: List[List[Tensor]], per_column: int) -> Tensor:
    """``torch.cat`` of the columns' tensors in order, in parts below
    ``_SERIAL_CAT_ELEMENTS`` elements (``per_column``: the most elements in one column)."""
    if per_column * len(columns) < _SERIAL_CAT_ELEMENTS:
        return torch.cat([t for column in columns for t in column])
    # Parts of half the limit on average: a column's layers differ in size.
    parts_per_column = -(-per_column // (_SERIAL_CAT_ELEMENTS // 2))
    parts = []
    for column in columns:
        count = -(-len(column) // parts_per_column)
        for start in range(0, len(column), max(count, 1)):
            parts.append(torch.cat(column[start : start + count]))
    return torch.cat(parts)


def _flat_batch_norm_vectors(
    inputs: Tensor, sizes: Tuple[int, ...], eps: List[Any], convs: List[Any]
) -> List[Tuple[Optional[Tensor], ...]]:
    """:meth:`CapturePlan.batch_norm_vectors` from ``inputs``, the concatenated running
    variances, running means, weights, biases and folded convolutions' biases (one dtype,
    affine layers); ``inputs`` itself is left as it is."""
    total = sum(sizes)
    with_conv = [i for i, conv in enumerate(convs) if conv is not None]
    conv_total = sum(sizes[i] for i in with_conv)
    var, mean, weight, bias, conv_bias = torch.split_with_sizes(
        inputs, [total, total, total, total, conv_total]
    )
    # scale = gamma / sqrt(var + eps); effective bias = beta - mean * scale (seed 3.2)
    if eps.count(eps[0]) == len(eps):
        scale = var.add(float(eps[0]))
    else:
        per_layer = torch.tensor([float(e) for e in eps], dtype=var.dtype, device=var.device)
        scale = var.add(per_layer.repeat_interleave(torch.tensor(sizes, device=var.device)))
    scale.rsqrt_().mul_(weight)
    effective = bias.addcmul(mean, scale, value=-1)
    scales = torch.split_with_sizes(scale, sizes)
    effectives = torch.split_with_sizes(effective, sizes)
    folded: Sequence[Optional[Tensor]] = [None] * len(sizes)
    blocks: Sequence[Optional[Tensor]] = [None] * len(sizes)
    if len(with_conv) == len(sizes):
        product = conv_bias.mul(scale)
        folded = torch.split_with_sizes(product, sizes)
        blocks = torch.split_with_sizes(product.add(effective), sizes)
    elif with_conv:
        conv_biases = torch.split_with_sizes(conv_bias, [sizes[i] for i in with_conv])
        products = torch._foreach_mul(conv_biases, [scales[i] for i in with_conv])
        sums = torch._foreach_add([effectives[i] for i in with_conv], products)
        folded, blocks = list(folded), list(blocks)
        for i, product_i, total_i in zip(with_conv, products, sums):
            folded[i], blocks[i] = product_i, total_i
    return list(zip(scales, effectives, folded, blocks))


def _foreach_batch_norm_vectors(
    modules: List[Any], convs: List[Any]
) -> List[Tuple[Optional[Tensor], ...]]:
    """The same vectors in multi-tensor kernels, one list entry per layer (non-affine layers,
    mixed dtypes or devices)."""
    scales = list(
        torch._foreach_add([bn.running_var for bn in modules], [float(bn.eps) for bn in modules])
    )
    torch._foreach_rsqrt_(scales)
    _foreach_pairs(torch._foreach_mul_, scales, [bn.weight for bn in modules])
    effective = list(torch._foreach_mul([bn.running_mean for bn in modules], scales))
    torch._foreach_neg_(effective)
    _foreach_pairs(torch._foreach_add_, effective, [bn.bias for bn in modules])
    folded: List[Optional[Tensor]] = [None] * len(modules)
    blocks: List[Optional[Tensor]] = [None] * len(modules)
    with_conv = [i for i, conv in enumerate(convs) if conv is not None]
    if with_conv:
        products = torch._foreach_mul(
            [convs[i].bias for i in with_conv], [scales[i] for i in with_conv]
        )
        sums = torch._foreach_add([effective[i] for i in with_conv], products)
        for i, product, total in zip(with_conv, products, sums):
            folded[i], blocks[i] = product, total
    return list(zip(scales, effective, folded, blocks))


# Ids of the per-module hooks that graph replays hold at this moment (any thread's): not
# the user's, so no plan's hook check may count them.
_OWN_MODULE_HOOKS: set = set()


def _hook_key(module: nn.Module) -> Any:
    if not (module._forward_hooks or module._forward_pre_hooks):
        return None
    # tuple(dict) copies the keys in one C call: another thread's replay may add or remove
    # its hooks on the same module meanwhile, which a Python loop over the dict would not
    # survive.
    forward, pre = tuple(module._forward_hooks), tuple(module._forward_pre_hooks)
    if _OWN_MODULE_HOOKS:
        forward = tuple(k for k in forward if k not in _OWN_MODULE_HOOKS)
        pre = tuple(k for k in pre if k not in _OWN_MODULE_HOOKS)
    return (forward, pre) if forward or pre else None


def _global_hook_key() -> Any:
    from torch.nn.modules import module as module_file

    # This package's own hooks (another thread's capture or replay) are not the user's.
    return (
        # Keys copied in one C call first (another thread's replay adds and removes its
        # global hooks meanwhile).
        tuple(k for k in tuple(module_file._global_forward_hooks) if k not in _OWN_GLOBAL_HOOKS),
        tuple(
            k for k in tuple(module_file._global_forward_pre_hooks) if k not in _OWN_GLOBAL_HOOKS
        ),
    )


@dataclass(frozen=True)
class _Graph:
    """A plan's autograd graph, as a hooked replay that fitted the plan found it.

    A replay of a plan without regions finds its Conv, Linear and BatchNorm steps in the
    graph after the forward pass instead of in a global module hook during it. Only the
    modules of the other steps (activations, normalisations, returned products, timm's
    BatchNormAct2d: the plan's ``module_steps``) get a forward hook of their own, which
    handles their calls as the hooked replay does. Every other module call then takes
    torch's fast path, as under Saliency (a global hook puts every call on the slow
    path), and the graph is read once (about 2 us per node). Its guard is the graph:

    - every node, in one deterministic walk from the output (``_graph_nodes``), has the
      type it had: any operation added, removed or reordered shows, wherever it is (an
      operation with an intercept would be a source the plan does not have);
    - every convolution node has a bias exactly where it had one (a bias added to a
      layer is a source; a Linear's shows as ``AddmmBackward0`` for ``MmBackward0``);
    - each layer step's node read its own module's weight (and a BatchNorm's running
      mean; a bias that requires a gradient shows in the node's edge:
      ``_step_node_matches``), so a forward routed to another module of the same type
      and shape is seen, and its output has the planned shape (``_output_shape``: a
      stride changed in place, or a size taken from an argument's value, would change
      which layers are spatial);
    - each module step's module was called as often as planned, each call fitted its step
      as in the hooked replay (attributes, shapes, node types), and its output's node is
      where it was in the walk (a module used at another place shows);
    - as for the hooked replay, every planned module still has its forward hooks and the
      global hooks are the same.

    A plan keeps the hooked replay where the graph cannot show which module ran
    (``_graph_cannot_tell``: tied weights, a layer called twice, a leaf module of a kind
    that may have an intercept), under autocast (nodes save cast weights), and where a
    Linear runs on more than two dimensions (its node is not an ``addmm``). Not seen: a
    bias swapped in for the call only (``torch.func.functional_call`` inside a module's
    forward) that requires no gradient, and weights tied after the plan learned its
    graph; ``reuse_capture=False`` traces every call.
    """

    types: Tuple[type, ...]  # the type of each node, in the walk's order
    # Where each step's node (the autograd node of its module call's output) is in the
    # walk; ``None`` for a step whose output does not reach the selected output (its
    # gradient is zero: it has a source but no term).
    step_positions: Tuple[Optional[int], ...]
    # (position, has a bias) for every convolution node.
    convolution_biases: Tuple[Tuple[int, bool], ...]


def _graph_nodes(root: Any) -> List[Any]:
    """Every autograd node under ``root``, each once, depth first in ``next_functions``'
    order (the same operations give the same list)."""
    # Host time: most of it is torch making each node's Python object (about 2 us per
    # node); a generator expression per node would add a third.
    nodes: List[Any] = []
    seen: set = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        for fn, _ in node.next_functions:
            if fn is not None:
                pending.append(fn)
    return nodes


def _is_convolution_node(node: Any) -> bool:
    return type(node).__name__ == "ConvolutionBackward0"


def _convolution_has_bias(node: Any) -> bool:
    # The bias's saved size: (C,) with a bias; without one, (0,) on current torch (None
    # on some). A bias of no elements adds nothing either way.
    sizes = node._saved_bias_sym_sizes_opt
    return sizes is not None and tuple(sizes) != (0,)


def _step_node_matches(node: Any, module: nn.Module) -> bool:
    """Whether autograd ``node`` is the operation of planned layer ``module``: it saved
    this module's weight (and a BatchNorm's running mean, in evaluation)."""
    # Parameters and buffers read from their dicts: Module.__getattr__ costs a microsecond
    # per read, and this runs for every step of every call.
    try:
        if isinstance(module, _BATCH_NORMS):
            return (
                node._saved_running_mean is module._buffers.get("running_mean")
                and node._saved_weight is module._parameters.get("weight")
                and not getattr(node, "_saved_training", False)
            )
        if isinstance(module, _CONVOLUTIONS):
            return (
                _is_convolution_node(node)
                and node._saved_weight is module._parameters.get("weight")
                and _convolution_has_bias(node)
                and _bias_edge_fits(node.next_functions[2][0], module)
            )
        if isinstance(module, nn.Linear):
            # addmm(bias, x, weight.t()): the saved factor is a view of the weight.
            weight = module.weight
            saved = node._saved_mat2
            return (
                type(node).__name__ == "AddmmBackward0"
                and saved is not None
                and saved.data_ptr() == weight.data_ptr()
                and tuple(saved.shape) == tuple(weight.shape)[::-1]
                and _bias_edge_fits(node.next_functions[0][0], module)
            )
    except (AttributeError, RuntimeError):
        # No such saved value (another kind of node), or one freed by a backward pass.
        return False
    return False


def _bias_edge_fits(edge: Any, module: nn.Module) -> bool:
    """Where the bias the node added requires a gradient, its edge shows which tensor it
    was (the module's own, not one swapped in for the call, as ``functional_call`` does);
    a bias that requires none leaves no edge to check."""
    variable = getattr(edge, "variable", None)
    return variable is None or variable is module._parameters.get("bias")


def _output_shape(node: Any) -> Optional[List[int]]:
    """The shape of the first output of the operation that made ``node`` (what its
    backward pass expects as gradient), or ``None`` where torch does not show it."""
    try:
        return node._input_metadata[0].shape
    except (AttributeError, IndexError, RuntimeError):
        return None


# Leaf modules whose calls have no intercept whatever their attributes: a graph replay does
# not see non-step calls, so any other leaf module (a padding's fill value, a module of
# unknown kind) could be swapped for another with the same operations and an intercept.
_INTERCEPT_FREE_LEAVES: Tuple[type, ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Upsample,
)
# The same for other libraries' modules, by (module path, class name), without importing
# them: torchvision's stochastic depth (the identity in evaluation) and Permute.
_INTERCEPT_FREE_LIBRARY_LEAVES = frozenset(
    {
        ("torchvision.ops.stochastic_depth", "StochasticDepth"),
        ("torchvision.ops.misc", "Permute"),
    }
)


def _intercept_free_leaf(module: nn.Module) -> bool:
    kind = type(module)
    return isinstance(module, _INTERCEPT_FREE_LEAVES) or (
        (kind.__module__, kind.__name__) in _INTERCEPT_FREE_LIBRARY_LEAVES
    )


def _graph_cannot_tell(plan: "CapturePlan") -> bool:
    """Whether the graph cannot show which module ran where, so the plan must keep the
    hooked replay (which checks every module call):

    - a Conv/Linear/BatchNorm module called more than once (its nodes saved the same
      weight, so they cannot tell its calls apart);
    - a call of a leaf module that is neither a step, a Conv/Linear/BatchNorm layer nor of a
      kind without intercept (``_INTERCEPT_FREE_LEAVES``);
    - a tensor shared by two parameters or buffers of the model (tied weights: a node
      showing the weight would not show whose bias it added).
    """
    alive = [call() for call in plan.calls]
    modules = [m for m in alive if m is not None]
    if len(modules) != len(alive):
        return True
    layers = [m for m in modules if isinstance(m, (*_CONVOLUTIONS, nn.Linear, *_BATCH_NORMS))]
    if len({id(m) for m in layers}) != len(layers):
        return True
    for module, step in zip(modules, plan.step_at):
        if step is None and not isinstance(module, (*_CONVOLUTIONS, nn.Linear, *_BATCH_NORMS)):
            # ``is None``: an empty Sequential child is falsy but still a child.
            leaf = next(iter(module.children()), None) is None
            if leaf and not _intercept_free_leaf(module):
                return True
    # The outermost call returns last: the model (or the outermost module the forward ran).
    root = modules[-1]
    seen: set = set()
    tensors: List[Tensor] = [t for _, t in root.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in root.named_buffers(remove_duplicate=False)]
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key in seen:
            return True
        seen.add(key)
    return False


class Replay:
    """The plan's sources found again in one forward pass, by module hooks during it or
    in its autograd graph after it (see ``_Graph``): the surface of ``Capture``."""

    def __init__(
        self,
        plan: CapturePlan,
        inputs: Tensor,
        collector: Collector,
        *,
        capture_gradients: bool = False,
    ) -> None:
        self.plan = plan
        self.inputs = inputs
        self.collector = collector
        self.sources: List[BiasSource] = []
        self.failed_ops: List[str] = []
        self.matched = True
        self._handles: List[Any] = []
        self._hooks: List[Any] = []
        self._next = 0
        self._started = 0
        # A collector that ignores on_source (the eq. 4 collector) is not called per step.
        self._sources_wanted = getattr(collector, "wants_sources", True)
        self._linear_parts: Dict[int, Tensor] = {}
        # Region boundaries of this pass: per open call (by start), the autograd nodes of
        # its input copies; per finished call, those and its outputs' nodes (the guard's
        # walk); and every tensor a boundary term reads, with its version then.
        self._open: Dict[int, List[Any]] = {}
        self._closed: List[Tuple[List[Any], List[Any]]] = []
        self._read: List[Tuple[Tensor, int]] = []
        # Small layers whose gradient the backward pass captures instead of a hook: their
        # sources and autograd edges, in the order of the forward pass.
        self._capture = capture_gradients and gradient_edges_supported()
        # Not for a differentiable backward pass (its terms are part of a graph).
        self._workspace = thread_workspace() if capture_gradients else None
        if self._workspace is not None and not _any_autocast_enabled():
            # (Under autocast the terms come in another dtype than the input's.)
            self._workspace.reserve(plan.largest_term, inputs.dtype, inputs.device)
        self._captured: List[BiasSource] = []
        self.gradient_edges: List[Any] = []
        # The graph replay serves collectors that read nothing at the forward pass (the
        # eq. 4 collector), without a differentiable backward pass (training's collectors
        # read each source's output and keep graphs: they keep the module hooks).
        by_graph = capture_gradients and not self._sources_wanted
        self._graph = plan.graph if by_graph else None
        # Each step's autograd node, while a hooked replay learns the plan's graph.
        self._learning: Optional[Dict[int, Any]] = (
            {} if by_graph and plan.graph is None and plan.graph_eligible else None
        )
        self.mode = "graph" if self._graph is not None else "hooks"
        # A graph replay's hooks on the modules of its module steps, and the sources those
        # steps made, by step.
        self._module_handles: List[Any] = []
        self._observed: Dict[int, BiasSource] = {}
        self._anchors: Dict[int, Any] = {}  # the module steps' output nodes, by step
        # The inputs that activation terms read in the backward pass (``holds_input``),
        # with their versions then and their steps: none may change before the backward pass.
        self._held_inputs: List[Tuple[Tensor, int, int]] = []
        # Small activations outside the maps whose gradient the backward pass captures:
        # (source, settings, module, input, output, output version), their closed-form
        # intercepts formed once the gradients are in (``_deferred_intercepts``).
        self._deferred: List[
            Tuple[BiasSource, Tuple[Any, ...], nn.Module, Tensor, Tensor, int]
        ] = []

    def __enter__(self) -> "Replay":
        if _global_hook_key() != self.plan.global_hooks:
            raise ReplayMismatch("global module hooks were added or removed since the trace")
        batch_norm = self.plan.batch_norm_vectors()
        if batch_norm is None:
            raise ReplayMismatch(
                "a planned BatchNorm is gone, training, or lost its folded convolution's bias"
            )
        self._batch_norm = batch_norm
        if self._graph is not None:
            if not self.plan.hooks_unchanged():
                raise ReplayMismatch("a planned module is gone or its forward hooks changed")
            # The other steps are found in the graph (prepare_backward).
            self._install_module_step_hooks()
            return self
        # One global forward hook rather than one per module: it sees every module call,
        # so the guard compares the whole call sequence with the trace's, and it costs
        # less than registering and removing a handle per module.
        self._handles.extend(
            install_global_module_hooks(
                self._on_input if self.plan.read_first or self.plan.boundary_starts else None,
                self._on_output,
            )
        )
        return self

    def _install_module_step_hooks(self) -> None:
        """Hooks on the modules of the plan's module steps only, each calling ``_observe``
        for the step its call makes (a module may be called several times)."""
        owner = threading.get_ident()
        try:
            for reference, steps, reads_first in self.plan.module_hooks:
                module = reference()
                if module is None:
                    raise ReplayMismatch("a planned module is gone")
                counter = [0]

                def on_output(
                    module: nn.Module,
                    args: Any,
                    output: Any,
                    steps: Tuple[Optional[int], ...] = steps,
                    counter: List[int] = counter,
                ) -> None:
                    if threading.get_ident() != owner:
                        return  # another thread's forward pass through the same model
                    k = counter[0]
                    counter[0] = k + 1
                    if k >= len(steps):
                        self.matched = False
                        return
                    index = steps[k]
                    if index is not None and self.matched:
                        self._observe(index, module, args, output)

                handle = module.register_forward_hook(on_output)
                _OWN_MODULE_HOOKS.add(handle.id)
                self._module_handles.append(handle)
                if reads_first:

                    def on_input(module: nn.Module, args: Any) -> None:
                        if threading.get_ident() == owner:
                            self._read_first(module, args)

                    handle = module.register_forward_pre_hook(on_input)
                    _OWN_MODULE_HOOKS.add(handle.id)
                    self._module_handles.append(handle)
        except BaseException:
            self._remove_module_hooks()
            raise

    def __exit__(self, *exc: Any) -> None:
        self._remove_module_hooks()
        held, self._held_inputs = self._held_inputs, []
        if exc[0] is None:
            changed = tuple(index for t, version, index in held if t._version != version)
            if changed:
                # The term would read the changed values (the node saved only the output).
                self.remove_gradient_hooks()
                raise ActivationInputChanged(changed)
        if self._graph is not None:
            # A call more than planned, or one that did not fit its step, shows here; a call
            # fewer leaves its step unmade (prepare_backward) or changes the graph's nodes.
            if exc[0] is None and not self.matched:
                self.remove_gradient_hooks()
                raise ReplayMismatch(
                    "a module of a planned activation, normalisation or product was called "
                    "more often than planned, or a call did not fit its step"
                )
            return
        if exc[0] is None and (not self.matched or self._next != len(self.plan.calls)):
            self.remove_gradient_hooks()
            raise ReplayMismatch(
                f"the forward pass made {self._next} module calls, the plan {len(self.plan.calls)}"
                + ("" if self.matched else "; they differ in order, module or output shape")
            )
        if exc[0] is None and self.plan.boundary_starts:
            problem = self._boundary_problem()
            # What the check read (boundary tensors, region nodes) is not kept alive
            # through the backward pass.
            self._read.clear()
            self._closed.clear()
            if problem is not None:
                self.remove_gradient_hooks()
                raise ReplayMismatch(problem)

    def prepare_backward(self, output: Tensor) -> None:
        """Called with the selected output before the backward pass. A graph replay finds
        and checks its steps here (raising :class:`ReplayMismatch` when the graph is not
        the plan's); a hooked replay of an eligible plan records the graph for later ones."""
        if self._graph is not None:
            self._replay_graph(output)
        elif self._learning is not None:
            self._learn_graph(output)

    def _learn_graph(self, output: Tensor) -> None:
        plan, learned = self.plan, self._learning
        self._learning = None
        if not self.matched or output.grad_fn is None or learned is None:
            return
        if len(learned) != len(plan.steps) or _graph_cannot_tell(plan):
            plan.graph_eligible = False
            return
        nodes = _graph_nodes(output.grad_fn)
        position = {node: i for i, node in enumerate(nodes)}
        positions: List[Optional[int]] = []
        for index in range(len(plan.steps)):
            node = learned[index]
            at = position.get(node)
            if at is not None and index not in plan.module_steps:
                module = plan.calls[plan.step_call[index]]()
                if (
                    module is None
                    or not _step_node_matches(node, module)
                    or _output_shape(node) != plan._step_shapes[index]
                ):
                    plan.graph_eligible = False  # a layer's node does not show its module
                    return
            positions.append(at)
        try:
            biases = tuple(
                (i, _convolution_has_bias(node))
                for i, node in enumerate(nodes)
                if _is_convolution_node(node)
            )
        except (AttributeError, RuntimeError):  # a torch whose nodes do not show the bias
            plan.graph_eligible = False
            return
        plan.graph = _Graph(
            types=tuple(map(type, nodes)),
            step_positions=tuple(positions),
            convolution_biases=biases,
        )

    def _replay_graph(self, output: Tensor) -> None:
        plan, graph = self.plan, self._graph
        assert graph is not None
        root = output.grad_fn
        if root is None:
            raise ReplayMismatch("the selected output has no autograd graph")
        nodes = _graph_nodes(root)
        if len(nodes) != len(graph.types) or tuple(map(type, nodes)) != graph.types:
            raise ReplayMismatch("the forward pass made other operations than the plan's")
        for position, had_bias in graph.convolution_biases:
            if _convolution_has_bias(nodes[position]) != had_bias:
                raise ReplayMismatch("a convolution gained or lost a bias since the trace")
        collector = self.collector
        captured = self._capture
        limit = _CAPTURED_ELEMENTS
        found: Dict[int, BiasSource] = {}
        module_steps = plan.module_steps
        walked: Optional[set] = None
        for index, at in enumerate(graph.step_positions):
            if index in module_steps:
                # Made by its module's hook during the forward pass; its output's node must
                # be where it was (the same module call at the same place in the graph).
                anchor = self._anchors.get(index)
                if at is None:
                    walked = set(nodes) if walked is None else walked
                    fits = anchor is not None and anchor not in walked
                else:
                    fits = nodes[at] is anchor
                if not fits:
                    raise ReplayMismatch("a planned module call made another node of the graph")
                continue
            module = plan.calls[plan.step_call[index]]()
            node = None if at is None else nodes[at]
            if module is None or (node is not None and not _step_node_matches(node, module)):
                raise ReplayMismatch("a planned layer's operation read another module's parameters")
            if node is not None and _output_shape(node) != plan._step_shapes[index]:
                # The same operations with another output shape (a stride or a pooling
                # size changed in place, a size taken from an argument's value): the
                # planned layout (which layers are spatial) may not hold.
                raise ReplayMismatch("a planned layer's output has another shape")
            source = plan.source_for(index, module, self._batch_norm)
            if source is None:
                raise ReplayMismatch("a planned layer lost its bias or statistics")
            found[index] = source
            if node is None or plan.steps[index].folded_into is not None:
                continue
            if captured and plan._step_elements[index] <= limit:
                self._captured.append(source)
                self.gradient_edges.append(_GradientEdge(node, 0))
            else:
                self._hooks.append(
                    node.register_prehook(
                        lambda grads, source=source: _deliver(
                            collector.on_gradient, source, grads[0]
                        )
                    )
                )
        # Every step's source in the plan's order (the forward pass's), as a hooked replay
        # lists them: the module steps' came from their hooks during the forward pass.
        found.update(self._observed)
        self._anchors.clear()  # nodes of this graph: not kept past the backward pass
        if len(found) != len(plan.steps):
            raise ReplayMismatch("a planned step was not made")
        self.sources = [found[index] for index in range(len(plan.steps))]

    def _boundary_problem(self) -> Optional[str]:
        """Why a region's identity would not hold for this pass, or ``None``.

        A term ``<df/dy, y> - <J^T df/dy, a>`` needs every graph tensor the call reads to
        be among the arguments the boundary copied (not a keyword argument, an attribute
        or a closure) and every value it reads unchanged until the backward pass.
        """
        if self._open:
            return "a region's module call did not return"
        for tensor, version in self._read:
            if tensor._version != version:
                return "a tensor at a region's boundary was changed in place"
        for outputs, inputs in self._closed:
            stops = set(inputs)
            seen: set = set()
            pending = [n for n in outputs if n is not None]
            while pending:
                node = pending.pop()
                if node in seen or node in stops:
                    continue
                seen.add(node)
                if getattr(node, "variable", None) is self.inputs:
                    return (
                        "a region's module call reads the network input other than through "
                        "its positional arguments"
                    )
                pending.extend(fn for fn, _ in node.next_functions if fn is not None)
        return None

    def _remove_module_hooks(self) -> None:
        remove_global_module_hooks(self._handles)
        for handle in self._module_handles:
            handle.remove()
            _OWN_MODULE_HOOKS.discard(handle.id)
        self._module_handles.clear()
        self._linear_parts.clear()

    def _read_first(self, module: nn.Module, args: Any) -> None:
        settings = self.plan.read_first.get(id(module))
        if settings is not None and args and isinstance(args[0], Tensor):
            if args[0]._base is not None or activation_backward_node(settings) is None:
                # An in-place activation is about to overwrite its input: g'(a) a now.
                # (Otherwise its node saves the input: the term comes from the backward pass.)
                self._linear_parts[id(module)] = activation_linear_part(settings, args[0])

    def _on_input(self, module: nn.Module, args: Any) -> Any:
        start = self._started
        self._started = start + 1
        self._read_first(module, args)
        boundary = self.plan.boundary_starts.get(start)
        if boundary is None or not self.matched:
            return None
        returned, weight = boundary
        if self.plan.calls[returned]() is not module:
            self.matched = False
            return None
        nodes: List[Any] = []
        self._open[start] = nodes
        # The call reads copies of its graph arguments; what flows back into them is
        # J^T df/dy (the call's own term enters with the opposite sign).
        return self._cross(args, -weight, nodes)

    def _cross(self, values: Any, weight: int, nodes: List[Any]) -> Any:
        """``values`` (a tensor, or a tuple or list of them) with every graph tensor ``t``
        replaced by a copy whose gradient ``g`` adds ``weight * <g, t>`` per example to the
        collector; one copy per distinct tensor (``attention(x, x, x)`` keeps its aliasing)."""
        copies: Dict[int, Tensor] = {}

        def cross(value: Any) -> Any:
            if not isinstance(value, Tensor) or not value.requires_grad:
                return value
            if value.grad_fn is None and value is not self.inputs:
                return value  # a parameter or another constant: part of the intercept
            copy = copies.get(id(value))
            if copy is None:
                copy = copies[id(value)] = value.clone()
                node = copy.grad_fn
                assert node is not None  # a copy of a tensor that requires grad
                nodes.append(node)
                self._read.append((value, value._version))
                self._hooks.append(node.register_prehook(self._term_hook(value, weight)))
            return copy

        if isinstance(values, (tuple, list)):
            return type(values)(cross(v) for v in values)
        return cross(values)

    def _term_hook(self, tensor: Tensor, weight: int) -> Callable[[Any], None]:
        batch = self.inputs.shape[0]
        collector: Any = self.collector
        held = _Held(tensor)  # see _identity_hook

        def hook(grads: Any) -> None:
            grad = grads[0]
            tensor = held.release()
            if grad is None:
                return
            with torch.no_grad():
                dtype = torch.promote_types(grad.dtype, torch.float32)
                term = torch.linalg.vecdot(
                    grad.reshape(batch, -1).to(dtype), tensor.detach().reshape(batch, -1).to(dtype)
                )
                collector.on_term(term if weight == 1 else term.mul_(weight))

        return hook

    def remove_gradient_hooks(self) -> None:
        """Detach every gradient hook this replay registered (and forget captured edges)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._captured = []
        self.gradient_edges = []
        self._anchors.clear()
        self._deferred.clear()

    def deliver_gradients(self, gradients: Sequence[Optional[Tensor]]) -> None:
        """Hand the collector the gradients that the backward pass captured at
        :attr:`gradient_edges` (in their order; ``None`` where none reached an edge).

        A collector with ``on_gradients`` receives them in one call, so that it can reduce
        layers of one resolution together (host time: one kernel per resolution instead
        of one Python hook and one kernel per layer); otherwise one ``on_gradient`` each.
        """
        if len(gradients) != len(self._captured):
            raise ValueError(
                f"expected {len(self._captured)} captured gradients, got {len(gradients)}"
            )
        if self._deferred:
            self._deferred_intercepts()
        pairs = [(s, g) for s, g in zip(self._captured, gradients) if g is not None]
        batch = getattr(self.collector, "on_gradients", None)
        # Captured only for a backward pass that is not differentiated (see
        # ``capture_gradients``): reduced as its hooks are, without recording a graph
        # (the caller runs the pass with gradients enabled; a bias parameter that
        # requires grad would make every map and term part of one, kept until it ends).
        with torch.no_grad():
            if batch is not None:
                batch(pairs)
            else:
                for source, grad in pairs:
                    self.collector.on_gradient(source, grad)

    def _deferred_intercepts(self) -> None:
        """The closed-form intercepts ``c = y - g'(a) a`` of the deferred activations (the
        trace's rule, so the same values), from the input and output kept since the forward
        pass; an output overwritten in place since is recomputed from the input, which the
        forward pass's end checked unchanged (in place: the node's own copy of it)."""
        deferred, self._deferred = self._deferred, []
        with torch.no_grad():
            for source, settings, module, a, y, version in deferred:
                if y._version != version:
                    # (A copy: an in-place module would overwrite the node's copy.)
                    y = module.forward(a.detach().clone())
                y = y.detach()
                source.intercept.dense = y - activation_linear_part(settings, a, y)

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        k = self._next
        self._next = k + 1
        if not self.matched:
            return None
        entries = self.plan.entries
        if k >= len(entries):
            self.matched = False
            return None
        call, hooks_at, index, had_bias, boundary = entries[k]
        if call() is not module:
            self.matched = False
            return None
        if (
            module._forward_hooks or module._forward_pre_hooks or hooks_at is not None
        ) and _hook_key(module) != hooks_at:
            self.matched = False  # a user hook added or removed: it may add an operation
            return None
        if index is not None:
            self._observe(index, module, args, output)
        elif had_bias is not None and (getattr(module, "bias", None) is not None) != had_bias:
            self.matched = False  # a bias added to (or removed from) a planned layer
        if boundary is None or not self.matched:
            return None
        start, weight = boundary
        inputs = self._open.pop(start, None)
        if inputs is None or not (
            isinstance(output, Tensor)
            or (
                isinstance(output, (tuple, list))
                and all(o is None or isinstance(o, Tensor) for o in output)
            )
        ):
            self.matched = False  # not the call that started, or an output with no boundary
            return None
        raw = output if isinstance(output, (tuple, list)) else (output,)
        self._closed.append(
            ([o.grad_fn for o in raw if isinstance(o, Tensor) and o.requires_grad], inputs)
        )
        return self._cross(output, weight, [])

    def _observe(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        """Check the output of the call that makes step ``index`` and hook its source."""
        plan = self.plan
        step = plan.steps[index]
        if not isinstance(output, Tensor) or output.shape != step.shape or not output.requires_grad:
            self.matched = False
            return
        backward_identity = gated = deferred = False
        held_input: Optional[Tensor] = None  # kept for the backward pass, version-checked
        deferred_input: Optional[Tensor] = None
        shrunk: Optional[Tuple[Tensor, Optional[Tensor], Tensor]] = None
        if step.activation is not None:
            if (
                activation_settings(module) != step.activation
                or not args
                or not isinstance(args[0], Tensor)
            ):
                self.matched = False  # an attribute changed (approximate, inplace, min_val...)
                return
            node_type = activation_backward_node(step.activation)
            if (
                node_type is not None
                and output._base is None
                and output.grad_fn is not None
                and type(output.grad_fn).__name__ == node_type
                and index not in plan.closed_form_steps
            ):
                # No intercept tensor: the backward pass hands over df/dy and J^T df/dy.
                backward_identity = True
                gated = activation_is_gated(step.activation)
                if (
                    self._capture
                    and not step.template.spatial
                    and output.numel() <= _CAPTURED_ELEMENTS
                    and args[0].shape == output.shape
                ):
                    # A squeeze-excitation gate: a Python hook would cost several times
                    # the few small kernels of its closed form, formed after the backward
                    # pass from the input and output kept until then. In place, the input
                    # is overwritten: the node's own copy of it is kept instead.
                    deferred = True
                    if step.activation[1]:
                        activation_node: Any = output.grad_fn
                        deferred_input = activation_node._saved_self
                    else:
                        held_input = deferred_input = args[0]
                elif activation_holds_input(step.activation):
                    held_input = args[0]
                if held_input is not None:
                    self._held_inputs.append((held_input, held_input._version, index))
                source = _with_intercept(step.template, Intercept(None, workspace=self._workspace))
            else:
                if activation_reads_input_first(step.activation):
                    linear_part = self._linear_parts.pop(id(module), None)
                else:
                    linear_part = activation_linear_part(step.activation, args[0], output)
                if linear_part is None:
                    self.matched = False
                    return
                intercept = Intercept(None, dense=output.detach() - linear_part)
                source = _with_intercept(step.template, intercept)
        elif step.normalisation is not None:
            if (
                normalisation_settings(module) != step.normalisation
                or not args
                or not isinstance(args[0], Tensor)
            ):
                self.matched = False  # eps or the number of groups changed
                return
            bias = None if step.normalisation[0] == "rms_norm" else module.bias
            if bias is not None and not isinstance(bias, Tensor):
                self.matched = False  # a bias that is not a tensor: not the planned module
                return
            # The statistics now (s = eps / (var + eps), small); the intercept is formed
            # only when the backward pass reaches the output, or not at all.
            _, beta, shrink = normalisation_parts(
                step.normalisation,
                args[0],
                output,
                bias,
                rstd=saved_layer_norm_rstd(step.normalisation, output),
            )
            shrunk = (args[0], beta, shrink)
            source = _with_intercept(step.template, Intercept(None))
        elif step.product_node is not None:
            node = output.grad_fn
            if type(node) is not step.product_node or not _both_factors_computed(node):
                self.matched = False  # the module no longer returns a product of two activations
                return
            # a * b is homogeneous of degree two: c = -ab (as the trace's rule), formed when
            # the backward pass reaches it rather than kept from the forward pass.
            source = _with_intercept(step.template, Intercept(None, workspace=self._workspace))
        else:
            planned_source = plan.source_for(index, module, self._batch_norm)
            if planned_source is None:
                self.matched = False
                return
            source = planned_source
        if self._graph is not None:
            self._observed[index] = source  # listed in order by prepare_backward
            self._anchors[index] = output.grad_fn
        else:
            self.sources.append(source)
        if self._sources_wanted:
            intercept = source.intercept
            # A BatchNorm inside a module: its own output is not at hand (the module's is
            # after its activation).
            intercept.output = None if step.batch_norm_inside else output
            self.collector.on_source(source)
            intercept.output = None
        if self._learning is not None:
            self._learning[index] = output.grad_fn
        if step.folded_into is not None:
            return  # reduced with the BatchNorm that reads it
        on_gradient: Callable[[BiasSource, Tensor], None] = self.collector.on_gradient
        node = output.grad_fn
        if step.batch_norm_inside:
            node = _batch_norm_node(output, module)
            if node is None:
                self.matched = False  # no BatchNorm of this module under its output
                return
        if shrunk is not None:
            on_gradient = _shrunk_delivery(on_gradient, output, module, *shrunk)
        if deferred:
            assert node is not None and deferred_input is not None and step.activation is not None
            self._deferred.append(
                (source, step.activation, module, deferred_input, output, output._version)
            )
            self._captured.append(source)
            self.gradient_edges.append(_GradientEdge(node, output.output_nr))
            return
        if backward_identity:
            assert node is not None
            self._hooks.append(
                node.register_hook(
                    _identity_hook(
                        on_gradient,
                        source,
                        node,
                        output,
                        module,
                        gated=gated,
                        held_input=held_input,
                    )
                )
            )
            return
        if step.product_node is not None:
            assert node is not None
            self._hooks.append(node.register_prehook(_product_hook(on_gradient, source, output)))
            return
        # Views: an in-place activation on a slice, LayerNorm2d's permuted output (the
        # trace's source is its base, the layer_norm output) and instance_norm's reshaped
        # one. A later in-place write to a view sends the gradient through its base's
        # node, never the view's: hook the base.
        through_base = output._base is not None and (
            (step.activation is not None and step.activation[1])
            or (
                step.normalisation is not None
                and step.normalisation[0] in ("channel_layer_norm", "instance_norm")
            )
        )
        if node is not None and not through_base:
            nr = 0 if step.batch_norm_inside else output.output_nr
            if self._capture and shrunk is None and output.numel() <= _CAPTURED_ELEMENTS:
                # The gradient the node receives (the sum over every reader of the output,
                # as a pre-hook sees it), captured by the backward pass itself.
                self._captured.append(source)
                self.gradient_edges.append(_GradientEdge(node, nr))
                return
            # A pre-hook on the node that made the output sees df/dy before any later
            # in-place operation's gradient, like a tensor hook registered now, at a third
            # of the cost.
            self._hooks.append(
                node.register_prehook(lambda grads: _deliver(on_gradient, source, grads[nr]))
            )
        else:
            self._hooks.append(
                register_gradient_hook(output, through_base, lambda grad: on_gradient(source, grad))
            )


# Layers whose output has at most this many elements are captured rather than hooked when
# the caller asks for it (Replay's ``capture_gradients``): host time dominates their
# reduction, and a captured gradient of this size costs at most 256 KB (float32) kept
# until the backward pass ends. A larger gradient is reduced by its hook while it is in
# cache, and freed.
_CAPTURED_ELEMENTS = 1 << 16

_GradientEdge: Any = getattr(torch.autograd.graph, "GradientEdge", None)
_any_autocast_enabled: Callable[[], bool] = getattr(
    torch._C, "_is_any_autocast_enabled", lambda: True
)
_EDGES_SUPPORTED: Optional[bool] = None


def gradient_edges_supported() -> bool:
    """Whether ``torch.autograd.grad`` takes autograd edges as ``inputs`` (torch >= 2.4),
    checked once on a two-operation graph."""
    global _EDGES_SUPPORTED
    if _EDGES_SUPPORTED is None:
        supported = False
        if _GradientEdge is not None:
            try:
                with torch.enable_grad():
                    leaf = torch.ones(2, requires_grad=True)
                    middle = leaf * 2
                    out = (middle * 3).sum()
                    assert middle.grad_fn is not None
                    (grad,) = torch.autograd.grad(out, [_GradientEdge(middle.grad_fn, 0)])
                supported = bool(torch.equal(grad, torch.full((2,), 3.0)))
            except (TypeError, RuntimeError, AttributeError):
                supported = False
        _EDGES_SUPPORTED = supported
    return _EDGES_SUPPORTED


def _identity_hook(
    on_gradient: Callable[[BiasSource, Tensor], None],
    source: BiasSource,
    node: Any,
    output: Tensor,
    module: nn.Module,
    gated: bool = False,
    held_input: Optional[Tensor] = None,
) -> Callable[[Any, Any], None]:
    """A post-hook on an element-wise activation's node that hands the collector ``df/dy``
    with the intercept given as ``(y, J^T df/dy, a)``: ``a`` is what the node saved (the
    original input, also in place) or ``held_input`` (the input of a node that saves its
    output: ``activation_holds_input``), ``y`` the output, unless something overwrote it
    since (then it is recomputed from ``a``). A ``gated`` activation's term needs no ``a``
    (``activation_is_gated``): ``(y, J^T df/dy, None)``."""
    version = output._version
    # The graph keeps this hook, and with it what it holds, until the caller drops the
    # output: held for the whole call, every activation's output would outlive the node
    # that reads it, and the backward pass could not reuse their memory.
    held = _Held(output)
    held_in = None if held_input is None else _Held(held_input)

    def hook(grad_inputs: Any, grad_outputs: Any) -> None:
        grad = grad_outputs[0]
        y = held.release()
        kept_input = None if held_in is None else held_in.release()
        if grad is None:
            return
        a: Optional[Tensor] = None
        if not gated:
            a = node._saved_self if kept_input is None else kept_input
        if y._version != version:  # overwritten in place after the activation
            original = node._saved_self if kept_input is None else kept_input
            with torch.no_grad():
                y = module.forward(original.detach().clone())
        input_grad = grad_inputs[0] if grad_inputs[0] is not None else torch.zeros_like(grad)
        source.intercept.backward_pair = (
            y.detach(),
            input_grad,
            None if a is None else a.detach(),
        )
        try:
            on_gradient(source, grad)
        finally:
            source.intercept.backward_pair = None

    return hook


class _Held:
    """A tensor that a gradient hook reads once: :meth:`release` hands it over and drops
    the reference, so that it is freed when the backward pass no longer needs it rather
    than when the graph (which keeps the hook) is freed."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Optional[Tensor]) -> None:
        self.tensor = tensor

    def release(self) -> Tensor:
        tensor = self.tensor
        if tensor is None:
            # A node runs once per backward pass, and the replay removes its hooks after
            # its own: a second call would be another backward pass through this graph.
            raise RuntimeError(
                "a FullGradient hook ran twice: a backward pass went through the graph of "
                "an attribution call before that call removed its hooks"
            )
        self.tensor = None
        return tensor


def _shrunk_delivery(
    on_gradient: Callable[[BiasSource, Tensor], None],
    output: Tensor,
    module: nn.Module,
    a: Tensor,
    beta: Optional[Tensor],
    shrink: Tensor,
) -> Callable[[BiasSource, Tensor], None]:
    """Hand a normalisation's gradient to the collector with ``(y, beta, s)``: ``y`` the
    output, or recomputed from the input (which the node keeps intact, or its backward
    would fail) when something overwrote the output in place since."""
    version = output._version
    held_output, held_input = _Held(output), _Held(a)  # see _identity_hook

    def deliver(source: BiasSource, grad: Tensor) -> None:
        y, x = held_output.release(), held_input.release()
        if y._version != version:
            with torch.no_grad():
                y = module.forward(x.detach())
        source.intercept.shrunk_output = (y.detach(), beta, shrink)
        try:
            on_gradient(source, grad)
        finally:
            source.intercept.shrunk_output = None

    return deliver


def _product_hook(
    on_gradient: Callable[[BiasSource, Tensor], None], source: BiasSource, output: Tensor
) -> Callable[[Any], None]:
    """A pre-hook on a product's node that hands the collector ``df/dy`` with ``c = -y``,
    ``y`` read now (or, when overwritten in place since, recomputed from the factors the
    node saved)."""
    version, node, nr = output._version, output.grad_fn, output.output_nr
    held = _Held(output)  # see _identity_hook

    def hook(grads: Any) -> None:
        grad = grads[nr]
        output = held.release()
        if grad is None:
            return
        with torch.no_grad():
            if output._version == version:
                y = output.detach()
            else:
                y = node._saved_self * node._saved_other  # type: ignore[union-attr]
        # c = -y is never formed: the collector negates after its sums (one pass fewer).
        source.intercept.negated_output = y
        try:
            on_gradient(source, grad)
        finally:
            source.intercept.negated_output = None

    return hook


def _both_factors_computed(node: Any) -> bool:
    """Whether both inputs of a product's autograd node come from other operations: a
    detached (or constant) factor has no next function, a parameter an AccumulateGrad."""
    return all(
        fn is not None and type(fn).__name__ != "AccumulateGrad" for fn, _ in node.next_functions
    )


def _deliver(
    on_gradient: Callable[[BiasSource, Tensor], None], source: BiasSource, grad: Optional[Tensor]
) -> None:
    if grad is not None:
        on_gradient(source, grad)


def call_signature(
    inputs: Tensor, additional_forward_args: Tuple[Any, ...], *options: Hashable
) -> Hashable:
    """What a plan is valid for: the input's shape, dtype and device, the autocast state,
    the extra arguments' types and shapes (values of plain constants), and ``options``."""
    device_type = inputs.device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type) if autocast else None
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4
        autocast, autocast_dtype = torch.is_autocast_enabled(), None
    extra = tuple(_argument_signature(a) for a in additional_forward_args)
    return (
        tuple(inputs.shape),
        inputs.dtype,
        inputs.device,
        autocast,
        autocast_dtype,
        extra,
        options,
    )


def _argument_signature(value: Any) -> Hashable:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value), value)
    return (type(value), id(value))


class PlanCache:
    """The plans of one attribution object, by :func:`call_signature`, least recently used out.

    A signature whose replay did not follow its plan twice is traced from then on.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._plans: "OrderedDict[Hashable, Optional[CapturePlan]]" = OrderedDict()
        self._mismatches: Dict[Hashable, int] = {}
        # Threads attributing with one model share its cache.
        self._lock = threading.Lock()

    def get(self, signature: Hashable) -> Optional[CapturePlan]:
        with self._lock:
            plan = self._plans.get(signature)
            if plan is not None:
                self._plans.move_to_end(signature)
            return plan

    def put(self, signature: Hashable, plan: Optional[CapturePlan]) -> None:
        with self._lock:
            if self._mismatches.get(signature, 0) >= 2:
                plan = None
            self._plans[signature] = plan
            self._plans.move_to_end(signature)
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)

    def mismatched(self, signature: Hashable) -> None:
        with self._lock:
            self._mismatches[signature] = self._mismatches.get(signature, 0) + 1
            self._plans.pop(signature, None)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._mismatches.clear()

    def __len__(self) -> int:
        return sum(plan is not None for plan in self._plans.values())


# Plans per model, shared by every FullGradient of that model (Captum code often builds the
# attribution object per batch). Plans hold weak references to modules and tensors derived
# from parameters, never the model itself, so an entry goes when its model goes.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, PlanCache]" = weakref.WeakKeyDictionary()
_PLANS_LOCK = threading.Lock()


def plans_for(model: Any) -> PlanCache:
    """The plan cache of ``model`` (a private one for a callable that is not a module)."""
    if not isinstance(model, nn.Module):
        return PlanCache()
    with _PLANS_LOCK:
        cache = _PLANS.get(model)
        if cache is None:
            cache = _PLANS[model] = PlanCache()
        return cache
