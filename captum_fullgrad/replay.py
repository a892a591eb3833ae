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
with one forward hook per module, reading each intercept from the module's current
parameters (so changed weights, biases or BatchNorm statistics are picked up).

A plan is made only when every source of the traced call came from the first operation of
a leaf module of one of the exact types ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
``nn.Linear`` or ``nn.BatchNorm1d/2d/3d`` in eval mode (subclasses may override
``forward``), and no operation failed. The replay checks, call by call, that the planned
modules run in the planned order with the planned output shapes; when they do not, it
raises :class:`ReplayMismatch` after the forward pass and before any backward pass, and the
caller traces the call instead. What the guard cannot see is a functional operation with
an intercept that a ``forward`` performs only for some input values; the completeness
delta that :class:`~captum_fullgrad.FullGradient` returns would show it, and
``FullGradient(..., reuse_capture=False)`` traces every call.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._intercepts import Intercept, _batch_norm_affine
from .capture import BiasSource, Capture, Collector

__all__ = ["CapturePlan", "PlanCache", "ReplayMismatch", "call_signature", "plans_for"]

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_OPS = {
    **{t: ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d") for t in _CONVOLUTIONS},
    nn.Linear: ("linear",),
    **{t: ("batch_norm",) for t in _BATCH_NORMS},
}


class ReplayMismatch(RuntimeError):
    """The forward pass did not call the planned modules in the planned order and shapes."""


@dataclass(frozen=True)
class _Step:
    """One planned source: what the trace knew of it, without any tensor of the model."""

    template: BiasSource  # the traced source, its intercept reduced to the layout
    shape: torch.Size
    # A convolution reduced with the BatchNorm at step ``folded_into`` (no hook of its own);
    # that BatchNorm has ``absorbs`` set to this convolution's step.
    folded_into: Optional[int] = None
    absorbs: Optional[int] = None


class CapturePlan:
    """Which module calls produce the bias sources of a traced call; replayable with hooks.

    Make one with :meth:`record` from a finished :class:`~captum_fullgrad.capture.Capture`;
    ``None`` means the network has a source that module hooks cannot reproduce.
    """

    def __init__(self, steps: Sequence[_Step], calls: Sequence[nn.Module], step_at: Sequence[Optional[int]]) -> None:
        self.steps: Tuple[_Step, ...] = tuple(steps)
        # Every module call of the traced forward pass, in the order the calls returned,
        # and the step (if any) that each call produces: the replay's guard. Weak
        # references: plans are cached per model and must not keep it alive.
        self.calls: Tuple["weakref.ref[nn.Module]", ...] = tuple(weakref.ref(m) for m in calls)
        self.step_at: Tuple[Optional[int], ...] = tuple(step_at)
        # Each step's source as last built, and for a BatchNorm the tensors and versions it
        # was built from: rebuilt only when a parameter or statistic is replaced or
        # modified in place, so that a steady replay launches no kernel of its own.
        self._sources: List[Optional[BiasSource]] = [None] * len(self.steps)
        self._keys: List[Any] = [None] * len(self.steps)

    def source_for(self, step: int, module: nn.Module) -> Optional[BiasSource]:
        """The source of ``step`` from the module's current parameters; ``None`` if it has none."""
        planned = self.steps[step]
        cached = self._sources[step]
        if not isinstance(module, _BATCH_NORMS):
            bias = module.bias
            if bias is None:
                return None
            if cached is not None and cached.intercept.channel_vector is bias:
                return cached  # the parameter itself: in-place changes are seen through it
            intercept = Intercept(None, channel_vector=bias, channel_dim=planned.template.intercept.channel_dim)
            return self._store(step, _with_intercept(planned.template, intercept), None)
        if module.training or module.running_mean is None or module.running_var is None:
            return None
        conv_bias = None
        if planned.absorbs is not None:
            conv = self._sources[planned.absorbs]
            assert conv is not None
            conv_bias = conv.intercept.channel_vector
        tensors = (module.running_mean, module.running_var, module.weight, module.bias, conv_bias)
        key = self._keys[step]
        if cached is not None and _unchanged(key, tensors, module.eps):
            return cached
        # Without gradient: a replay never differentiates through parameters.
        with torch.no_grad():
            scale, effective_bias = _batch_norm_affine(*tensors[:4], module.eps)
            intercept = Intercept(
                None, channel_vector=effective_bias, channel_dim=planned.template.intercept.channel_dim, input_scale=scale
            )
            source = _with_intercept(planned.template, intercept)
            if conv_bias is not None:
                source.folded_vector = conv_bias * scale
                source.block_vector = effective_bias + source.folded_vector
        key = (tensors, _state(tensors), module.eps)
        return self._store(step, source, key)

    def _store(self, step: int, source: BiasSource, key: Any) -> BiasSource:
        self._sources[step] = source
        self._keys[step] = key
        return source

    @classmethod
    def record(cls, capture: Capture) -> Optional["CapturePlan"]:
        """The plan of a traced call, or ``None`` when it cannot be replayed exactly."""
        if not isinstance(capture, Capture) or capture.failed_ops or not capture.sources or not capture.module_calls:
            return None
        steps: List[_Step] = []
        position: Dict[int, int] = {}
        step_at: List[Optional[int]] = [None] * len(capture.module_calls)
        for source in capture.sources:
            origin = capture.origin(source)
            if origin is None:
                return None  # an operation written in a forward
            module, call = origin
            if source.op not in _OPS.get(type(module), ()) or step_at[call] is not None:
                return None  # an unfamiliar module, or a second source in one call
            if source.intercept.channel_vector is None:
                return None
            if isinstance(module, _BATCH_NORMS) and source.intercept.input_scale is None:
                return None  # batch statistics: the intercept needs forward-mode AD
            position[id(source)] = len(steps)
            step_at[call] = len(steps)
            layout_only = Intercept(None, channel_dim=source.intercept.channel_dim)
            template = dataclasses.replace(source, intercept=layout_only, folded_vector=None, block_vector=None)
            steps.append(_Step(template=template, shape=source.shape))
        for conv, batch_norm in capture.folded_pairs():
            i, j = position[id(conv)], position[id(batch_norm)]
            steps[i] = dataclasses.replace(steps[i], folded_into=j)
            steps[j] = dataclasses.replace(steps[j], absorbs=i)
        return cls(steps, capture.module_calls, step_at)

    def replay(self, inputs: Tensor, collector: Collector) -> "Replay":
        """A context manager that finds this plan's sources in the forward pass it wraps."""
        return Replay(self, inputs, collector)


def _with_intercept(template: BiasSource, intercept: Intercept) -> BiasSource:
    # A shallow copy (dataclasses.replace re-runs __init__ and its checks).
    source = BiasSource.__new__(BiasSource)
    source.__dict__.update(template.__dict__)
    source.intercept = intercept
    return source


def _state(tensors: Tuple[Optional[Tensor], ...]) -> Tuple[Any, ...]:
    # The version counts in-place writes; the data pointer catches ``param.data = ...``
    # (``module.to``, ``module.cuda``), which leaves the version as it was.
    return tuple(None if t is None else (t._version, t.data_ptr()) for t in tensors)


def _unchanged(key: Any, tensors: Tuple[Optional[Tensor], ...], eps: float) -> bool:
    old_tensors, states, old_eps = key
    for old, new in zip(old_tensors, tensors):
        if old is not new:
            return False
    return old_eps == eps and states == _state(tensors)


class Replay:
    """The plan's module hooks around one forward pass (the surface of ``Capture``)."""

    def __init__(self, plan: CapturePlan, inputs: Tensor, collector: Collector) -> None:
        self.plan = plan
        self.inputs = inputs
        self.collector = collector
        self.sources: List[BiasSource] = []
        self.failed_ops: List[str] = []
        self.matched = True
        self._handles: List[Any] = []
        self._hooks: List[Any] = []
        self._next = 0

    def __enter__(self) -> "Replay":
        # One global forward hook rather than one per module: it sees every module call,
        # so the guard compares the whole call sequence with the trace's, and it costs
        # less than registering and removing a handle per module.
        self._handles.append(nn.modules.module.register_module_forward_hook(self._on_output))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove_module_hooks()
        if exc[0] is None and (not self.matched or self._next != len(self.plan.calls)):
            self.remove_gradient_hooks()
            raise ReplayMismatch(
                f"the forward pass made {self._next} module calls, the plan {len(self.plan.calls)}"
                + ("" if self.matched else "; they differ in order, module or output shape")
            )

    def _remove_module_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def remove_gradient_hooks(self) -> None:
        """Detach every gradient hook this replay registered."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _on_output(self, module: nn.Module, _args: Any, output: Any) -> None:
        k = self._next
        self._next = k + 1
        if not self.matched:
            return
        plan = self.plan
        if k >= len(plan.calls) or plan.calls[k]() is not module:
            self.matched = False
            return
        index = plan.step_at[k]
        if index is None:
            return
        step = plan.steps[index]
        if not isinstance(output, Tensor) or output.shape != step.shape or not output.requires_grad:
            self.matched = False
            return
        source = plan.source_for(index, module)
        if source is None:
            self.matched = False
            return
        self.sources.append(source)
        intercept = source.intercept
        intercept.output = output
        self.collector.on_source(source)
        intercept.output = None
        if step.folded_into is not None:
            return  # reduced with the BatchNorm that reads it
        on_gradient = self.collector.on_gradient
        node = output.grad_fn
        if output._base is None and node is not None:
            # A pre-hook on the node that made the output sees df/dy before any later
            # in-place operation's gradient, like a tensor hook registered now, at a third
            # of the cost. Views keep tensor hooks (their node is the view's).
            nr = output.output_nr
            self._hooks.append(node.register_prehook(lambda grads: _deliver(on_gradient, source, grads[nr])))
        else:
            self._hooks.append(output.register_hook(lambda grad: on_gradient(source, grad)))


def _deliver(on_gradient: Any, source: BiasSource, grad: Optional[Tensor]) -> None:
    if grad is not None:
        on_gradient(source, grad)


def call_signature(inputs: Tensor, additional_forward_args: Tuple[Any, ...], *options: Hashable) -> Hashable:
    """What a plan is valid for: the input's shape, dtype and device, the autocast state,
    the extra arguments' types and shapes (values of plain constants), and ``options``."""
    device_type = inputs.device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type) if autocast else None
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4
        autocast, autocast_dtype = torch.is_autocast_enabled(), None
    extra = tuple(_argument_signature(a) for a in additional_forward_args)
    return (tuple(inputs.shape), inputs.dtype, inputs.device, autocast, autocast_dtype, extra, options)


def _argument_signature(value: Any) -> Hashable:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value), value)
    return (type(value), id(value))


class PlanCache:
    """The plans of one attribution object, by :func:`call_signature`, least recently used first out.

    A signature whose replay did not follow its plan twice is traced from then on.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._plans: "OrderedDict[Hashable, Optional[CapturePlan]]" = OrderedDict()
        self._mismatches: Dict[Hashable, int] = {}

    def get(self, signature: Hashable) -> Optional[CapturePlan]:
        plan = self._plans.get(signature)
        if plan is not None:
            self._plans.move_to_end(signature)
        return plan

    def put(self, signature: Hashable, plan: Optional[CapturePlan]) -> None:
        if self._mismatches.get(signature, 0) >= 2:
            plan = None
        self._plans[signature] = plan
        self._plans.move_to_end(signature)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def mismatched(self, signature: Hashable) -> None:
        self._mismatches[signature] = self._mismatches.get(signature, 0) + 1
        self._plans.pop(signature, None)

    def clear(self) -> None:
        self._plans.clear()
        self._mismatches.clear()

    def __len__(self) -> int:
        return sum(plan is not None for plan in self._plans.values())


# Plans per model, shared by every FullGradient of that model (Captum code often builds the
# attribution object per batch). Plans hold weak references to modules and tensors derived
# from parameters, never the model itself, so an entry goes when its model goes.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, PlanCache]" = weakref.WeakKeyDictionary()


def plans_for(model: Any) -> PlanCache:
    """The plan cache of ``model`` (a private one for a callable that is not a module)."""
    if not isinstance(model, nn.Module):
        return PlanCache()
    cache = _PLANS.get(model)
    if cache is None:
        cache = _PLANS[model] = PlanCache()
    return cache
