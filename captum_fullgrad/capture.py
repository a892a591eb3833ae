"""Capture: every bias source of one forward pass, and its gradient during the backward pass.

The capture runs the model's forward pass under a :class:`torch.overrides.TorchFunctionMode`,
which sees every torch call, whether a module makes it (``nn.Conv2d``), a ``forward`` does
(squeeze-and-excitation's ``scale * x``, ``F.relu(x, inplace=True)``, ViT's
``x + pos_embedding``) or a plain function. For each call that reads a tensor depending on
the network input (a *graph tensor*) it asks :mod:`captum_fullgrad._intercepts` for the
intercept ``c_g`` of each output and registers a tensor hook on that output. During the
single backward pass the hook receives ``df/dy_g`` and hands ``(source, gradient)`` to a
*collector*, which reduces it at once (eq. 4 maps, the completeness sum) or keeps it (the
full bias-Jacobians of eq. 1). A hook registered on the output before any later in-place
operation receives the gradient of that output, not of what overwrote it (an in-place
activation would otherwise hand over its own gradient; see docs/math.md).

Module forward hooks give each source a readable name (the innermost module's qualified
name); they and the mode are removed when the capture ends, also on error.

:func:`forward_backward` meets a capture plan (:mod:`captum_fullgrad.replay`) through two
small protocols: a :class:`Recorder` is what records the sources of one forward pass (this
module's :class:`Capture`, or a plan's replay) and a :class:`Plan` makes one.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import checkpoint as torch_checkpoint

from . import _intercepts
from ._intercepts import CHANNELS_FIRST, CHANNELS_LAST, Intercept, op_name

_PERMUTATIONS = ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t")
_RESHAPES = ("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten")
_CONV_NAMES = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
    }
)


# Ids of the global module hooks this package has installed (its captures and replays).
# Other threads' captures install them too; a replay's guard must not take them for a
# user's hooks, or a concurrent call would disable a plan for good.
_OWN_GLOBAL_HOOKS: set = set()


def install_global_module_hooks(
    pre_hook: Any = None, post_hook: Any = None, *, always_call: bool = False
) -> List[Any]:
    """Register global module hooks that only react to the calling thread's forward passes.

    ``torch.nn.modules.module``'s global hooks see every thread's module calls; a capture
    must ignore another thread running the same (or any) model at the same time.
    """
    owner = threading.get_ident()
    handles = []
    if pre_hook is not None:

        def own_pre_hook(module: nn.Module, args: Any) -> Any:
            # A returned value replaces the call's arguments (a replay's region boundaries).
            if threading.get_ident() == owner:
                return pre_hook(module, args)
            return None

        handles.append(nn.modules.module.register_module_forward_pre_hook(own_pre_hook))
    if post_hook is not None:

        def own_post_hook(module: nn.Module, args: Any, output: Any) -> Any:
            # A returned value replaces the call's output.
            if threading.get_ident() == owner:
                return post_hook(module, args, output)
            return None

        handles.append(
            nn.modules.module.register_module_forward_hook(own_post_hook, always_call=always_call)
        )
    _OWN_GLOBAL_HOOKS.update(handle.id for handle in handles)
    return handles


def remove_global_module_hooks(handles: List[Any]) -> None:
    for handle in handles:
        handle.remove()
        _OWN_GLOBAL_HOOKS.discard(handle.id)
    handles.clear()


@dataclass(eq=False)
class BiasSource:
    """One bias source of eq. 1: an operation output ``y_g`` and its intercept ``c_g``.

    Attributes:
        name: readable unique name: the module's qualified name for the bias of a leaf
            module (``features.0``), ``module:op`` for an operation written in a
            ``forward`` (``features.1.0.block.2:mul``), with ``#k`` appended when the same
            name occurs more than once in a forward pass (a module called twice).
        module: qualified name of the innermost module running the operation
            (``""`` for the root or a plain function).
        op: the operation (``conv2d``, ``batch_norm``, ``silu``, ``mul``...).
        index: order of creation in the forward pass.
        shape: shape of the output.
        channel_dim: axis of the output holding channels when the output has the network
            input's layout (channels-first or channels-last), else ``None``.
        spatial: whether the output is a spatial map of the input (eq. 4's set ``L``): it
            has the input's rank, a known layout and more than one spatial position.
        block: name of the linear block the source belongs to; a BatchNorm reading a
            convolution's output directly shares the convolution's block (the paper's
            conv-BN blocks).
        intercept: the intercept (see :class:`captum_fullgrad._intercepts.Intercept`).
    """

    name: str
    module: str
    op: str
    index: int
    shape: torch.Size
    channel_dim: Optional[int]
    spatial: bool
    block: str
    intercept: Intercept = field(repr=False)
    # The axis of the output that runs over the examples. It may hold ``k`` slices per
    # example with the example outermost (Swin's windows, ``(B * windows, ...)``): example
    # ``i // k`` owns slice ``i``. ``None`` only for a single example, whose operation mixed
    # that axis into another: the whole tensor then belongs to it.
    batch_dim: Optional[int] = 0
    batch_size: Optional[int] = None  # the number of examples; None: the batch axis's size
    # Set by a capture whose collector folds conv-BN pairs: the convolution's bias mapped
    # through the BatchNorm, ``b_conv * gamma / sqrt(var + eps)``; the convolution's own
    # hook is then not registered.
    folded_vector: Optional[Tensor] = field(default=None, repr=False)
    # ``channel_vector + folded_vector``, when the recorder has it at hand (a replay keeps
    # it across calls); otherwise computed at backward time.
    block_vector: Optional[Tensor] = field(default=None, repr=False)
    # The channel vector last contracted by :meth:`channel_summed` as the rows of a batched
    # product, ``(vector, batch, rows)``, made without gradient recording from the storage
    # the vector still has: a replay hands the same vector every call, and a view and an
    # expansion cost about 6 us per layer on a slow host.
    _contraction_rows: Optional[Tuple[Tensor, int, Tensor]] = field(
        default=None, repr=False, init=False
    )

    def broadcast_intercept(self) -> Tensor:
        """The intercept as a tensor broadcastable to :attr:`shape`."""
        intercept = self.intercept
        if intercept.channel_vector is not None and intercept.channel_dim is not None:
            view = [1] * len(self.shape)
            view[intercept.channel_dim] = -1
            return intercept.channel_vector.reshape(view)
        if intercept.negated_output is not None:
            return -intercept.negated_output
        if intercept.shrunk_output is not None:
            return _intercepts.shrunk_intercept(*intercept.shrunk_output)
        if intercept.dense is None:
            raise RuntimeError(f"captum_fullgrad: the source `{self.name}` has no intercept")
        return intercept.dense

    def bias_jacobian(self, grad: Tensor) -> Tensor:
        """``df/dy_g * c_g``, shaped like the output (seed eq. 1)."""
        negated = self.intercept.negated_output
        if negated is not None:
            return torch.mul(grad, _cast(negated, grad.dtype)).neg_()  # c = -y
        shrunk = self.intercept.shrunk_output
        if shrunk is not None:
            return grad * _cast(_intercepts.shrunk_intercept(*shrunk), grad.dtype)
        pair = self.intercept.backward_pair
        if pair is not None:
            return _pair_term(grad, *pair)
        return grad * _cast(self.broadcast_intercept(), grad.dtype)

    def per_example_sum(self, grad: Tensor) -> Tensor:
        """``<df/dy_g, c_g>`` for each example: this source's term of eq. 1, shape ``(B,)``."""
        if self.batch_dim != 0 or (
            self.batch_size is not None and self.shape[0] != self.batch_size
        ):
            return self.per_example_total(self.bias_jacobian(grad))
        if self.intercept.channel_vector is not None:
            channel_dim = self.intercept.channel_dim
            reduce_dims = [d for d in range(grad.dim()) if d not in (0, channel_dim)]
            per_channel = grad.sum(reduce_dims) if reduce_dims else grad
            vector = self.intercept.channel_vector
            # ``Tensor.to`` costs a dispatch even when the dtype is the same.
            return per_channel @ (vector if vector.dtype == grad.dtype else vector.to(grad.dtype))
        shrunk = self.intercept.shrunk_output
        if shrunk is not None and grad.dim() > 1:
            # A normalisation over the last axis (a transformer's LayerNorm on tokens, which
            # is not a spatial map): its channel sums without forming the dense intercept.
            summed = _shrunk_channel_sum(grad, shrunk, grad.dim() - 1)
            if summed is not None:
                return summed.reshape(grad.shape[0], -1).sum(1)
        return self.bias_jacobian(grad).flatten(1).sum(1)

    def per_example_total(self, bias_jacobian: Tensor) -> Tensor:
        """Sum a bias-Jacobian of this source over everything but its batch axis, ``(B,)``."""
        if self.batch_dim is None:
            return bias_jacobian.sum().reshape(1)
        along_batch = bias_jacobian.movedim(self.batch_dim, 0)
        return along_batch.reshape(self.batch_size or along_batch.shape[0], -1).sum(1)

    def folded_channel_vector(self, vector: Tensor) -> Tensor:
        """``vector`` (this source's channel vector) plus a folded convolution's share."""
        if self.folded_vector is None:
            return vector
        return self.block_vector if self.block_vector is not None else vector + self.folded_vector

    def channel_summed(
        self, grad: Tensor, include_folded: bool = False, out: Optional[Tensor] = None
    ) -> Tensor:
        """``sum_c f^b_{l,c}``: the bias-Jacobian summed over channels, ``(B, *spatial)``.

        ``include_folded`` adds a folded convolution's share (see :attr:`folded_vector`).
        ``out``, a contiguous tensor of the result's shape and the gradient's dtype, receives
        the result (gradient recording off): the reductions write it directly, without a
        temporary.
        """
        channel_dim = self.channel_dim
        assert channel_dim is not None
        intercept = self.intercept
        vector = intercept.channel_vector
        if vector is not None and intercept.channel_dim == channel_dim:
            # The common case (every conv, linear and BatchNorm layer, once per layer and
            # call): its host time matters at small batches, so checks come cheapest first.
            if include_folded and self.folded_vector is not None:
                vector = self.folded_channel_vector(vector)
            # The vector goes to the gradient's dtype (bf16 under autocast) rather than the
            # gradient to float32: a full-size conversion per layer would cost more than
            # the reduction itself.
            if vector.dtype != grad.dtype:
                vector = vector.to(grad.dtype)
            shape = grad.shape
            rank = len(shape)
            if channel_dim == rank - 1:
                return grad @ vector if out is None else torch.matmul(grad, vector, out=out)
            if channel_dim == 1 and grad.is_contiguous():
                if shape[0] == 1:
                    # One example: a matrix-vector product on the (positions, C) view
                    # dispatches less than matmul's batched broadcast (host time is what
                    # counts at batch 1).
                    positions = grad.numel() // shape[1]
                    rows = grad.as_strided((positions, shape[1]), (1, positions))
                    if out is not None:
                        torch.mv(rows, vector, out=out.view(positions))
                        return out
                    return torch.mv(rows, vector).view(1, *shape[2:])
                # Contract the channel axis without materialising grad * bias: a batched
                # product with the vector expanded (no copy) dispatches less than
                # matmul's broadcast of a 1-D operand (about 6 us fewer per layer).
                batch, channels = shape[0], shape[1]
                cached = self._contraction_rows
                if torch.is_grad_enabled():
                    # A differentiable reduction (training's penalties): rows recorded now,
                    # never rows made without gradient recording.
                    rows = vector.view(1, 1, channels).expand(batch, 1, channels)
                elif (
                    cached is not None
                    and cached[0] is vector
                    and cached[1] == batch
                    # ``param.data = ...`` and ``Module.to`` keep the Parameter and give it
                    # new storage: the kept rows would view the old values.
                    and cached[2].data_ptr() == vector.data_ptr()
                ):
                    rows = cached[2]
                else:
                    rows = vector.view(1, 1, channels).expand(batch, 1, channels)
                    self._contraction_rows = (vector, batch, rows)
                columns = grad.view(batch, channels, -1)
                if out is not None:
                    torch.bmm(rows, columns, out=out.view(batch, 1, -1))
                    return out
                return torch.bmm(rows, columns).view(batch, *shape[2:])
            if not grad.is_contiguous():
                # Channels-last memory (a model in torch.channels_last): contract the
                # channel axis where it is stored last, instead of copying to NCHW.
                moved = grad.movedim(channel_dim, -1)
                if moved.is_contiguous():
                    return moved @ vector if out is None else torch.matmul(moved, vector, out=out)
            summed = torch.matmul(vector, grad.flatten(2)).view(shape[0], *shape[2:])
            return summed if out is None else out.copy_(summed)
        workspace = intercept.workspace
        negated = intercept.negated_output
        if negated is not None:
            # -sum_c g*y: the sign on the summed map, not on a full-size tensor (exact).
            step = _slice_step(grad, (negated,), channel_dim)
            if step is None:
                product = _product(grad, negated, workspace)
                return _channel_sum(product, channel_dim, out).neg_()
            return _sliced_channel_sum(
                _product, (grad, negated), channel_dim, step, workspace, out
            ).neg_()
        pair = intercept.backward_pair
        if pair is not None:
            step = _slice_step(grad, pair, channel_dim)
            if step is None:
                return _channel_sum(_pair_term(grad, *pair, workspace), channel_dim, out)
            return _sliced_channel_sum(_pair_term, (grad, *pair), channel_dim, step, workspace, out)
        shrunk = intercept.shrunk_output
        if shrunk is not None:
            shrunk_sum = _shrunk_channel_sum(grad, shrunk, channel_dim)
            if shrunk_sum is not None:
                return shrunk_sum if out is None else out.copy_(shrunk_sum)
        return _channel_sum(self.bias_jacobian(grad), channel_dim, out)


def _channel_sum(term: Tensor, channel_dim: int, out: Optional[Tensor]) -> Tensor:
    return term.sum(channel_dim) if out is None else torch.sum(term, channel_dim, out=out)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``: ``Tensor.to`` dispatches even when the dtype is already
    right (about 2.5 us on the CPU, three times per activation term)."""
    return tensor if tensor.dtype is dtype else tensor.to(dtype)


def _pair_term(
    grad: Tensor,
    y: Tensor,
    input_grad: Tensor,
    a: Optional[Tensor],
    workspace: Optional["Workspace"] = None,
) -> Tensor:
    """An element-wise op's bias-Jacobian from its backward pass (diagonal J):
    ``g * (y - J a) = g * y - (J^T g) * a``, formed in ``workspace``'s memory when it
    has some for it (the result is then only valid until the workspace's next use)."""
    dtype = grad.dtype
    out = None if workspace is None else workspace.like(grad)
    if a is None:
        # Gated (hardtanh): J^T g is g or 0 exactly, and y = a where it is g, so
        # g * y - (J^T g) * a = (g - J^T g) * y, bit for bit, in two passes.
        if out is None:
            return torch.sub(grad, _cast(input_grad, dtype)).mul_(_cast(y, dtype))
        return torch.sub(grad, _cast(input_grad, dtype), out=out).mul_(_cast(y, dtype))
    # One full-size temporary.
    product = grad * _cast(y, dtype) if out is None else torch.mul(grad, _cast(y, dtype), out=out)
    return product.addcmul_(_cast(input_grad, dtype), _cast(a, dtype), value=-1)


def _product(grad: Tensor, y: Tensor, workspace: Optional["Workspace"] = None) -> Tensor:
    out = None if workspace is None else workspace.like(grad)
    if out is None:
        return torch.mul(grad, _cast(y, grad.dtype))
    return torch.mul(grad, _cast(y, grad.dtype), out=out)


class Workspace:
    """Memory reused for the full-size temporaries of element-wise terms, call after call.

    A replayed activation or product term is formed in a temporary the size of the layer
    (or of a slice of it) and reduced over the channels at once. On the CPU each fresh
    temporary of a few megabytes is new memory to the C allocator, which returns it to the
    system when the heap shrinks and faults it in page by page the next time: MobileNet-V2
    at 96 px, batch 4, spent about 4 ms of a 75 ms call in page faults that Saliency does
    not incur (docs/benchmarks.md). One buffer per dtype, grown to the largest temporary
    (at most ``_SLICE_ELEMENTS`` elements, 8 MB of float32), is kept instead: one per
    thread (:func:`thread_workspace`), shared by every plan and model, since a thread runs
    one backward pass at a time. Accelerators' caching allocators make fresh memory cheap:
    CPU only.
    """

    def __init__(self, limit: Optional[int] = None) -> None:
        self.limit = _SLICE_ELEMENTS if limit is None else limit
        self._buffers: Dict[torch.dtype, Tensor] = {}
        # Views of the buffers by (dtype, shape): a layer's shape recurs on every call,
        # and slicing and viewing anew would cost about 12 us each time.
        self._views: Dict[Tuple[torch.dtype, torch.Size], Tensor] = {}

    def reserve(self, count: int, dtype: torch.dtype, device: torch.device) -> None:
        """Grow the ``dtype`` buffer to ``count`` elements (at most :attr:`limit`) now: a
        replay calls this before its forward pass with its largest term, so that the
        buffer is not grown, step by step, in the memory its backward pass frees."""
        count = min(count, self.limit)
        buffer = self._buffers.get(dtype)
        if device.type == "cpu" and count > 0 and (buffer is None or buffer.numel() < count):
            self._buffers[dtype] = torch.empty(count, dtype=dtype, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != dtype}

    def like(self, tensor: Tensor) -> Optional[Tensor]:
        """Contiguous memory shaped like ``tensor`` (its dtype, on the CPU), or ``None``
        where the workspace does not serve it: another device, a non-contiguous layout
        (channels-last: the product then keeps the operands' layout), more elements than
        :attr:`limit`, or gradient recording on (an ``out=`` result cannot be
        differentiated)."""
        if not tensor.is_cpu or not tensor.is_contiguous() or torch.is_grad_enabled():
            return None
        key = (tensor.dtype, tensor.shape)
        view = self._views.get(key)
        if view is not None:
            return view
        count = tensor.numel()
        if count > self.limit:
            return None
        buffer = self._buffers.get(tensor.dtype)
        if buffer is None or buffer.numel() < count:
            # The device named: a default device set by the caller must not move it.
            buffer = self._buffers[tensor.dtype] = torch.empty(
                count, dtype=tensor.dtype, device=tensor.device
            )
            self._views = {k: v for k, v in self._views.items() if k[0] != tensor.dtype}
        view = self._views[key] = buffer[:count].view(tensor.shape)
        return view


_WORKSPACES = threading.local()


def thread_workspace() -> Workspace:
    """This thread's :class:`Workspace`: kept from call to call, freed with the thread."""
    workspace = getattr(_WORKSPACES, "value", None)
    if workspace is None:
        workspace = _WORKSPACES.value = Workspace()
    return workspace


# Above this many elements an element-wise term is formed and channel-summed a few
# examples at a time (8 MB of float32 per slice): its full-size temporary would otherwise
# add an activation-sized block to the backward pass's peak memory.
_SLICE_ELEMENTS = 1 << 21


def _slice_step(
    grad: Tensor, others: Tuple[Optional[Tensor], ...], channel_dim: int
) -> Optional[int]:
    """How many entries of the leading axis an element-wise term of ``grad`` and ``others``
    is formed for at a time, or ``None`` for all at once: a small term, a single entry, or
    operands not all shaped like ``grad``."""
    count = grad.shape[0] if grad.dim() > 1 else 0
    total = grad.numel()
    if (
        total <= _SLICE_ELEMENTS
        or count < 2
        or channel_dim % grad.dim() == 0
        or any(t is not None and t.shape != grad.shape for t in others)
    ):
        return None
    step = max(1, _SLICE_ELEMENTS // (total // count))
    return step if step < count else None


def _sliced_channel_sum(
    term: Callable[..., Tensor],
    operands: Tuple[Optional[Tensor], ...],
    channel_dim: int,
    step: int,
    workspace: Optional[Workspace] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``term(*operands).sum(channel_dim)`` formed ``step`` entries of the leading axis at a
    time (each position's channel sum is the same either way: the slices only split the
    other axes), each slice's temporary in ``workspace`` when given; into ``out`` when
    given."""
    first = operands[0]
    assert first is not None
    count = first.shape[0]
    parts = []
    for start in range(0, count, step):
        slice_term = term(
            *(None if t is None else t[start : start + step] for t in operands), workspace
        )
        if out is None:
            parts.append(slice_term.sum(channel_dim))
        else:
            torch.sum(slice_term, channel_dim, out=out[start : start + step])
    return torch.cat(parts) if out is None else out


def _shrunk_channel_sum(
    grad: Tensor, shrunk: Tuple[Tensor, Optional[Tensor], Tensor], channel_dim: int
) -> Optional[Tensor]:
    """``sum_c g (y - (y - beta) s)`` as ``(1 - s) sum_c g y + s sum_c g beta`` when ``s`` is
    constant along the channels (LayerNorm over channels, RMSNorm, LayerNorm2d) and ``beta``
    a channel vector: no full-size intercept, one product pass and a matrix-vector product.
    ``None`` otherwise (GroupNorm, InstanceNorm: ``s`` varies with the channel)."""
    y, beta, shrink = shrunk
    rank = grad.dim()
    channel_dim = channel_dim % rank
    if shrink.dim() != rank or shrink.shape[channel_dim] != 1:
        return None
    if beta is not None:
        padded = [1] * (rank - beta.dim()) + list(beta.shape)
        if len(padded) != rank or any(n != 1 for d, n in enumerate(padded) if d != channel_dim):
            return None  # a bias along other axes (LayerNorm over several)
    dtype = grad.dtype
    s = _cast(shrink, dtype).squeeze(channel_dim)
    total = torch.mul(grad, _cast(y, dtype)).sum(channel_dim).mul_(1 - s)
    if beta is not None:
        vector = _cast(beta.reshape(-1), dtype)
        if channel_dim == rank - 1:
            with_beta = grad @ vector
        else:
            with_beta = torch.matmul(grad.movedim(channel_dim, -1), vector)
        total.addcmul_(with_beta, s)
    return total


def register_gradient_hook(output: Tensor, inplace: bool, hook: Callable[[Tensor], None]) -> Any:
    """A hook receiving ``df/d output`` once, for the output's current version.

    An in-place operation on a view (``F.silu(y[:, :2], inplace=True)``) writes into its
    base: later operations that read the base send their gradient through the base's
    node, never through the view's, so the hook goes on the base, and the gradient is cut
    to the view's elements.
    """
    base = output._base
    if inplace and base is not None and _dense(base):
        size, stride, offset = (
            output.size(),
            output.stride(),
            output.storage_offset() - base.storage_offset(),
        )
        base_size, base_stride = base.size(), base.stride()

        def cut(grad: Tensor) -> None:
            if (
                grad.stride() != base_stride
            ):  # lay it out like the base, whose strides the view's are in
                grad = torch.empty_strided(
                    base_size, base_stride, dtype=grad.dtype, device=grad.device
                ).copy_(grad)
            hook(grad.as_strided(size, stride, grad.storage_offset() + offset))

        return base.register_hook(cut)
    return output.register_hook(hook)


def _dense(tensor: Tensor) -> bool:
    """Whether the elements fill the storage span without gaps or overlaps, in a standard order."""
    if tensor.is_contiguous():
        return True
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return tensor.dim() in formats and tensor.is_contiguous(memory_format=formats[tensor.dim()])


class Collector(Protocol):
    """Receives each bias source at forward time and its output gradient at backward time.

    During ``on_source`` (and only then) ``source.intercept.output`` is the operation's
    output tensor; the capture releases it right after, since a source that kept it would
    close a reference cycle through its own gradient hook. The hooks are removed when the
    backward pass of :func:`forward_backward` returns, so a later backward pass through a
    ``create_graph=True`` result does not call the collector again.
    """

    def on_source(self, source: BiasSource) -> None: ...

    def on_gradient(self, source: BiasSource, grad: Tensor) -> None: ...


class Recorder(Protocol):
    """What records the bias sources of one forward pass: the traced :class:`Capture` or a
    plan's :class:`~captum_fullgrad.replay.Replay`.

    A context manager around the forward pass; on exit ``sources`` holds every source in
    the order the forward pass made them, each hooked so that the collector receives its
    gradient during the backward pass, and ``failed_ops`` names every operation whose
    intercept is missing. :meth:`remove_gradient_hooks` detaches those hooks once the
    backward pass is done (or abandoned).

    Sources may instead be listed in ``gradient_edges`` (autograd edges, one per source):
    the backward pass then computes their gradients as it computes the input's, and
    :meth:`deliver_gradients` hands them to the collector.

    :meth:`prepare_backward` receives the selected output before the backward pass; a
    replay that finds its sources in the autograd graph fills ``sources`` there (and may
    raise :class:`~captum_fullgrad.replay.ReplayMismatch`).
    """

    sources: List[BiasSource]
    failed_ops: List[str]

    @property
    def gradient_edges(self) -> Sequence[Any]: ...

    def deliver_gradients(self, gradients: Sequence[Optional[Tensor]]) -> None: ...

    def prepare_backward(self, output: Tensor) -> None: ...

    def __enter__(self) -> "Recorder": ...

    def __exit__(self, *exc: Any) -> None: ...

    def remove_gradient_hooks(self) -> None: ...


class Plan(Protocol):
    """What replays a traced call (:class:`~captum_fullgrad.replay.CapturePlan`)."""

    def replay(
        self, inputs: Tensor, collector: Collector, *, capture_gradients: bool = False
    ) -> Recorder: ...


class _GraphTracker:
    """Which tensors depend on the network input, their layout and their batch axis.

    Keyed by ``id`` with a weak reference to rule out reused ids; parameters and buffers
    are never graph tensors, even when they require grad (training uses). The batch axis
    is followed through transposes (``nn.MultiheadAttention`` works sequence-first) and
    through reshapes that fold more slices into it with the example outermost (windowed
    attention), so that every term of eq. 1 can be split per example.
    """

    def __init__(self) -> None:
        self._entries: Dict[int, Tuple[weakref.ref, Optional[str], Optional[int]]] = {}

    def add(self, tensor: Tensor, layout: Optional[str], batch_dim: Optional[int]) -> None:
        self._entries[id(tensor)] = (weakref.ref(tensor), layout, batch_dim)

    def get(self, value: Any) -> Optional[Tuple[weakref.ref, Optional[str], Optional[int]]]:
        entry = self._entries.get(id(value))
        if entry is not None and entry[0]() is value:
            return entry
        return None

    def contains(self, value: Any) -> bool:
        return self.get(value) is not None

    def layout(self, value: Any) -> Optional[str]:
        entry = self.get(value)
        return entry[1] if entry is not None else None

    def batch_dim(self, value: Any) -> Optional[int]:
        entry = self.get(value)
        return entry[2] if entry is not None else None


class _Mode(TorchFunctionMode, _intercepts.Context):
    def __init__(self, capture: "Capture") -> None:
        super().__init__()
        self.capture = capture

    def is_graph(self, value: Any) -> bool:
        return isinstance(value, Tensor) and self.capture.tracker.contains(value)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        graph_inputs = self._graph_inputs(args, kwargs)
        if not graph_inputs:
            return func(*args, **kwargs)
        return self.capture._process(self, func, args, kwargs, graph_inputs)

    def _graph_inputs(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Tensor]:
        tracker = self.capture.tracker
        found: List[Tensor] = []
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                if tracker.contains(value):
                    found.append(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, Tensor) and tracker.contains(item):
                        found.append(item)
        return found


class Capture:
    """Record the bias sources of one forward pass of ``forward_func`` on ``inputs``.

    Use as a context manager around the forward pass; the input tensor must be the one the
    forward pass reads (the capture tracks what depends on it by identity).

    Args:
        forward_func: the model (an ``nn.Module`` gives readable names) or any callable.
        inputs: the network input ``x`` (a tensor that requires grad).
        collector: receives sources and their gradients.
        layout: the input's layout, ``"channels_first"`` (images) or ``"channels_last"``
            (``(B, L, E)`` token tensors); sources laid out like it are spatial maps.
        other_inputs: further network inputs that the decomposition differentiates
            (Captum's tuple of inputs); ``inputs`` is the one whose layout the maps follow.
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        inputs: Tensor,
        collector: Collector,
        *,
        layout: str = CHANNELS_FIRST,
        other_inputs: Sequence[Tensor] = (),
    ) -> None:
        self.forward_func = forward_func
        self.inputs = inputs
        self.layout = layout
        self.other_inputs = tuple(other_inputs)
        self.collector = collector
        self.tracker = _GraphTracker()
        self.sources: List[BiasSource] = []
        self.failed_ops: List[str] = []
        self._module_stack: List[Tuple[str, bool, List[int], int, nn.Module, int]] = []
        # For a CapturePlan: every module call in the order the calls returned (forward
        # hooks' order), and for each source made by the first operation of a leaf
        # module, that module and the position of its call in ``module_calls``.
        self.module_calls: List[nn.Module] = []
        self._call_positions: Dict[int, int] = {}
        self._origins: Dict[BiasSource, Tuple[nn.Module, int]] = {}
        # Products of two graph tensors that a module returns (squeeze-and-excitation's
        # ``scale * x``): their intercept, ``-y``, is a function of the module's output.
        self._product_outputs: Dict[int, Tuple[weakref.ref, BiasSource]] = {}
        self._output_origins: Dict[BiasSource, Tuple[nn.Module, int, type]] = {}
        # For a plan's regions (operations written in a forward, replayed as one term per
        # module call): the innermost module call of every source, the call that made each
        # call, and whether every graph tensor a call received and returned has its
        # examples along axis 0 (the per-example sums of a region's term need it). Calls
        # are keyed by the order in which they started.
        self._frames: Dict[BiasSource, Optional[int]] = {}
        self.call_parents: Dict[int, Optional[int]] = {}
        self.call_batch_first: Dict[int, bool] = {}
        self._handles: List[Any] = []
        self._conv_outputs: Dict[int, Tuple[weakref.ref, int, str, BiasSource]] = {}
        self._hooks: Dict[BiasSource, Any] = {}
        self._folded: Dict[int, Tuple[weakref.ref, BiasSource, BiasSource]] = {}
        self._conv_uses: Dict[int, int] = {}
        self._fold_conv_bn = bool(getattr(collector, "fold_conv_batch_norm", False))
        self._mode: Optional[_Mode] = None
        self._input_rank = inputs.dim()
        self._batch_size = inputs.shape[0]

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Capture":
        self.tracker.add(self.inputs, self.layout, 0)
        for other in self.other_inputs:
            self.tracker.add(other, self.layout if other.shape == self.inputs.shape else None, 0)
        try:
            self._install_module_hooks()
            self._mode = _Mode(self)
            self._mode.__enter__()
        except BaseException:
            self._remove_module_hooks()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
                self._mode = None
        finally:
            self._remove_module_hooks()
        if exc[0] is None:
            self._finalise_names()

    # ------------------------------------------------------------------ names
    def _install_module_hooks(self) -> None:
        if not isinstance(self.forward_func, nn.Module):
            return
        # Two global hooks instead of two per submodule: registering ~120 handles per call
        # cost more than a VGG-16 forward pass on the host. Modules outside the model
        # (another model called from its forward) are not named after.
        names = {
            id(module): (name, next(module.children(), None) is None)
            for name, module in self.forward_func.named_modules()
        }
        stack = self._module_stack
        calls = self.module_calls
        positions = self._call_positions
        products = self._product_outputs
        output_origins = self._output_origins
        origins = self._origins
        parents = self.call_parents
        batch_first = self.call_batch_first
        started = [0]

        def pre_hook(module: nn.Module, _args: Any) -> None:
            # Every call counts (a replay counts calls the same way), named or not.
            start = started[0]
            started[0] += 1
            entry = names.get(id(module))
            if entry is not None:
                parents[start] = stack[-1][5] if stack else None
                batch_first[start] = self._batch_first(_args)
                stack.append((entry[0], entry[1], [0], id(module), module, start))

        def post_hook(module: nn.Module, _args: Any, _output: Any) -> None:
            calls.append(module)
            if id(module) not in names:
                return
            # Pop up to and including this module; tolerates a forward that raised.
            while stack:
                popped = stack.pop()
                if popped[3] == id(module):
                    positions[popped[5]] = len(calls) - 1
                    if not self._batch_first(_output):
                        batch_first[popped[5]] = False
                    if products and isinstance(_output, Tensor):
                        entry = products.get(id(_output))
                        source = entry[1] if entry is not None and entry[0]() is _output else None
                        if (
                            source is not None
                            and source not in origins
                            and source not in output_origins
                        ):
                            # The innermost module, and the autograd node a replay must find.
                            output_origins[source] = (module, popped[5], type(_output.grad_fn))
                    break

        self._handles.extend(install_global_module_hooks(pre_hook, post_hook, always_call=True))

    def _remove_module_hooks(self) -> None:
        remove_global_module_hooks(self._handles)
        self._module_stack.clear()

    def _batch_first(self, value: Any) -> bool:
        """Whether every graph tensor in ``value`` (a tensor, or a tuple or list of them)
        has its examples along axis 0, each owning a whole number of rows."""
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, Tensor) and self.tracker.contains(item):
                if (
                    self.tracker.batch_dim(item) != 0
                    or item.dim() == 0
                    or item.shape[0] % self._batch_size
                ):
                    return False
        return True

    def _base_name(self, op: str) -> Tuple[str, str, Optional[Tuple[nn.Module, int]]]:
        if not self._module_stack:
            return "", op, None
        module, is_leaf, count, _, obj, call = self._module_stack[-1]
        count[0] += 1
        if is_leaf and count[0] == 1:
            return module, module, (obj, call)
        return module, f"{module}:{op}" if module else op, None

    def _finalise_names(self) -> None:
        counts: Dict[str, int] = {}
        for source in self.sources:
            counts[source.name] = counts.get(source.name, 0) + 1
        seen: Dict[str, int] = {}
        for source in self.sources:
            if counts[source.name] > 1:
                k = seen.get(source.name, 0)
                seen[source.name] = k + 1
                source.name = f"{source.name}#{k}"
        # Blocks were marked with the creating convolution's index; name them after it.
        for source in self.sources:
            source.block = (
                self.sources[int(source.block[1:])].name
                if source.block.startswith("@")
                else source.name
            )

    # ------------------------------------------------------------------ ops
    def _process(
        self,
        mode: _Mode,
        func: Callable,
        args: Sequence[Any],
        kwargs: Dict[str, Any],
        graph_inputs: List[Tensor],
    ) -> Any:
        inplace = _intercepts.is_inplace(func, args, kwargs)
        if inplace and self._folded:
            # About to overwrite a folded convolution output: hook its current version first.
            self._unfold(graph_inputs)
        result = _intercepts.apply_rule(mode, func, args, kwargs)
        if result.failed:
            self.failed_ops.append(result.failed)
        value = result.value
        if (
            result.intercepts
            and isinstance(value, Tensor)
            and value._base is not None
            and not inplace
            and not any(value._base is t or value._base is t._base for t in graph_inputs)
        ):
            # A view of a temporary inside the op (instance_norm reshapes to one batch):
            # a hook on such a view does not survive a later in-place op on it (an
            # in-place ReLU rebases it), so hand the model a plain tensor instead.
            value = value.clone()
            for intercept in result.intercepts:
                intercept.output = value
        produced = args[0] if value is None else value
        outputs = mode.graph_outputs(produced)
        if not outputs:
            return value  # metadata (.dim(), .shape) and non-differentiable reads
        # A differentiable read of a convolution output: counts against conv-BN folding.
        if self._conv_outputs:
            self._count_conv_uses(graph_inputs)
        if self._folded and not inplace:
            self._unfold(graph_inputs)
        batch_dims = self._infer_batch_dims(func, args, kwargs, graph_inputs, outputs)
        layout = self._infer_layout(func, args, kwargs, graph_inputs, outputs, result.layout)
        for output, batch_dim in zip(outputs, batch_dims):
            usable = (
                output.dim() == self._input_rank
                and batch_dim == 0
                and output.shape[0] == self._batch_size
            )
            self.tracker.add(output, layout if usable else None, batch_dim)
        op = op_name(func)
        for intercept in result.intercepts:
            self._add_source(op, intercept, graph_inputs, inplace)
        return value

    def _infer_batch_dims(
        self,
        func: Callable,
        args: Sequence[Any],
        kwargs: Dict[str, Any],
        graph_inputs: List[Tensor],
        outputs: List[Tensor],
    ) -> List[Optional[int]]:
        """The batch axis of each output: followed through permutations and reshapes, else
        kept where it fits. An axis may hold several slices per example, example outermost."""
        batch = self._batch_size
        source = graph_inputs[0]
        source_dim = self.tracker.batch_dim(source)
        extent = (
            source.shape[source_dim]
            if source_dim is not None and source.dim() > source_dim
            else None
        )
        name = getattr(func, "__name__", "")
        if name in _PERMUTATIONS and source_dim is not None:
            perm = _permutation(name, source.dim(), args[1:], kwargs)
            if perm is not None:
                return [perm.index(source_dim)] * len(outputs)
        if source_dim is not None and name in ("stack", "unsqueeze"):
            # A new axis at ``dim``: the batch axis moves right when it is not before it.
            dim = (
                (args[1] if len(args) > 1 else kwargs.get("dim", 0))
                if name == "stack"
                else (args[1] if len(args) > 1 else kwargs.get("dim"))
            )
            if isinstance(dim, int):
                dim = dim % (source.dim() + 1)
                moved = source_dim + (1 if source_dim >= dim else 0)
                if all(o.dim() > moved and o.shape[moved] == extent for o in outputs):
                    return [moved] * len(outputs)
        if source_dim is not None:
            removed = _removed_dims(name, source.dim(), args[1:], kwargs)
            if removed and source_dim not in removed:
                # Indexing an axis before the batch axis away (``q, k, v = qkv[0], qkv[1], ...``).
                moved = source_dim - sum(1 for d in removed if d < source_dim)
                if all(o.dim() > moved and o.shape[moved] == extent for o in outputs):
                    return [moved] * len(outputs)
        dims: List[Optional[int]] = []
        for output in outputs:
            if (
                source_dim is not None
                and output.dim() == source.dim()
                and output.shape[source_dim] == extent
            ):
                dims.append(source_dim)
            elif output.dim() > 0 and output.shape[0] == batch:
                dims.append(0)
            elif (
                name in _RESHAPES
                and source_dim == 0
                and output.dim() > 0
                and output.shape[0] % batch == 0
            ):
                # Row-major: each example's elements stay contiguous, so the first axis
                # holds a whole number of slices per example, the example outermost.
                dims.append(0)
            else:
                dims.append(None)
        return dims

    def _infer_layout(
        self,
        func: Callable,
        args: Sequence[Any],
        kwargs: Dict[str, Any],
        graph_inputs: List[Tensor],
        outputs: List[Tensor],
        forced: Optional[str],
    ) -> Optional[str]:
        if forced is not None:
            return forced
        same_rank = [t for t in graph_inputs if t.dim() == self._input_rank]
        if not same_rank:
            return None
        # Prefer an operand shaped like the output, then one with its spatial size: in
        # ``s * x`` with a (N, C, 1, 1) gate ``s``, the output's layout is ``x``'s,
        # whichever operand comes first.
        out_shape = outputs[0].shape
        laid_out = [(t, self.tracker.layout(t)) for t in same_rank]
        source = next((t for t, layout in laid_out if layout and t.shape == out_shape), None)
        if source is None:
            source = next(
                (
                    t
                    for t, layout in laid_out
                    if layout
                    and len(out_shape) == t.dim()
                    and _spatial_shape(t.shape, layout) == _spatial_shape(out_shape, layout)
                ),
                same_rank[0],
            )
        layout = self.tracker.layout(source)
        name = getattr(func, "__name__", "")
        if name in _PERMUTATIONS and layout:
            perm = _permutation(name, source.dim(), args[1:], kwargs)
            if perm is None:
                return None
            n = source.dim()
            to_last = [0, *range(2, n), 1]
            to_first = [0, n - 1, *range(1, n - 1)]
            if perm == list(range(n)):
                return layout
            if layout == CHANNELS_FIRST and perm == to_last:
                return CHANNELS_LAST
            if layout == CHANNELS_LAST and perm == to_first:
                return CHANNELS_FIRST
            return None
        out = outputs[0]
        if layout is not None and out.dim() == source.dim():
            spatial_in = _spatial_shape(source.shape, layout)
            spatial_out = _spatial_shape(out.shape, layout)
            if spatial_in == spatial_out:
                return layout
        return None

    def _add_source(
        self, op: str, intercept: Intercept, graph_inputs: List[Tensor], inplace: bool = False
    ) -> None:
        output = intercept.output
        if output is None:
            raise RuntimeError(f"captum_fullgrad: an intercept of `{op}` lost its output tensor")
        module, name, origin = self._base_name(op)
        layout = self.tracker.layout(output)
        batch_dim = self.tracker.batch_dim(output)
        if batch_dim is None and self._batch_size != 1:
            # Its share of f(x) cannot be split per example: report, never guess.
            self.failed_ops.append(f"{name} (no batch axis)")
            warnings.warn(
                f"captum_fullgrad: the output of `{name}` has no batch axis the capture could "
                "follow; "
                "its intercept is missing and the completeness delta shows the gap. Attribute one "
                "example at a time (internal_batch_size=1) for an exact decomposition.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if output.dim() == self._input_rank and layout is not None:
            channel_dim = 1 if layout == CHANNELS_FIRST else output.dim() - 1
            spatial = any(s > 1 for s in _spatial_shape(output.shape, layout))
        else:
            channel_dim, spatial = None, False
        index = len(self.sources)
        block = name
        if op == "batch_norm" and graph_inputs:
            entry = self._conv_outputs.get(id(graph_inputs[0]))
            if (
                entry is not None
                and entry[0]() is graph_inputs[0]
                and entry[1] == graph_inputs[0]._version
            ):
                block = entry[2]
        source = BiasSource(
            name=name,
            module=module,
            op=op,
            index=index,
            shape=output.shape,
            channel_dim=channel_dim,
            spatial=spatial,
            block=block,
            intercept=intercept,
            batch_dim=batch_dim,
            batch_size=self._batch_size,
        )
        if op in _CONV_NAMES:
            # A BatchNorm reading exactly this tensor joins this convolution's block.
            self._conv_outputs[id(output)] = (
                weakref.ref(output),
                output._version,
                f"@{index}",
                source,
            )
            source.block = f"@{index}"
        self.sources.append(source)
        self._frames[source] = self._module_stack[-1][5] if self._module_stack else None
        if origin is not None:
            self._origins[source] = origin
        elif op == "mul" and intercept.dense is not None:
            self._product_outputs[id(output)] = (weakref.ref(output), source)
        self.collector.on_source(source)
        # The hook closes over the source; the source must not hold the output tensor, or
        # tensor -> hook -> source -> tensor is a cycle Python's collector cannot see
        # through autograd, and every activation would leak.
        intercept.output = None
        self._hooks[source] = register_gradient_hook(output, inplace, self._hook_for(source))
        if (
            op == "batch_norm"
            and intercept.input_scale is not None
            and self._fold_conv_bn
            and graph_inputs
        ):
            self._fold_into_batch_norm(graph_inputs[0], source)

    def _count_conv_uses(self, graph_inputs: List[Tensor]) -> None:
        for tensor in graph_inputs:
            entry = self._conv_outputs.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                self._conv_uses[id(tensor)] = self._conv_uses.get(id(tensor), 0) + 1

    def origin(self, source: BiasSource) -> Optional[Tuple[nn.Module, int]]:
        """The leaf module whose first operation made ``source`` and the position of that
        call in :attr:`module_calls`; ``None`` for an operation written in a ``forward``."""
        entry = self._origins.get(source)
        if entry is None or entry[1] not in self._call_positions:
            return None
        return entry[0], self._call_positions[entry[1]]

    def output_origin(self, source: BiasSource) -> Optional[Tuple[nn.Module, int, type]]:
        """For a product of two graph tensors that a module returned: the innermost such
        module, the position of that call in :attr:`module_calls` and the type of the
        autograd node that made the output; else ``None``."""
        entry = self._output_origins.get(source)
        if entry is None or entry[1] not in self._call_positions:
            return None
        return entry[0], self._call_positions[entry[1]], entry[2]

    def frame(self, source: BiasSource) -> Optional[int]:
        """The innermost module call running the operation that made ``source`` (keyed by
        the order calls started; ``None`` outside any module of the model)."""
        return self._frames.get(source)

    def call_position(self, start: int) -> Optional[int]:
        """The position in :attr:`module_calls` of the call that was the ``start``-th to
        begin (``None`` when it did not return)."""
        return self._call_positions.get(start)

    def folded_pairs(self) -> List[Tuple[BiasSource, BiasSource]]:
        """The (convolution, BatchNorm) pairs reduced as one at the end of the forward pass."""
        return [(conv, batch_norm) for _, conv, batch_norm in self._folded.values()]

    def remove_gradient_hooks(self) -> None:
        """Detach every tensor hook this capture registered."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    # The trace hooks every source: it captures no gradient (see Recorder).
    gradient_edges: Sequence[Any] = ()

    def deliver_gradients(self, gradients: Sequence[Optional[Tensor]]) -> None:
        if gradients:
            raise ValueError("a traced capture captures no gradients")

    def prepare_backward(self, output: Tensor) -> None:
        """Nothing to do: the trace hooked every source during the forward pass."""

    def _hook_for(self, source: BiasSource) -> Callable[[Tensor], None]:
        collector = self.collector
        return lambda grad: collector.on_gradient(source, grad)

    def _fold_into_batch_norm(self, conv_output: Tensor, batch_norm: BiasSource) -> None:
        """One reduction for a conv-BN pair: in eval, df/dz_conv = gamma / sqrt(var + eps) df/dy_bn.

        Exact only while the convolution's output feeds nothing but this BatchNorm;
        :meth:`_unfold` restores the convolution's own hook as soon as anything else reads it.
        """
        entry = self._conv_outputs.get(id(conv_output))
        if entry is None or entry[0]() is not conv_output or entry[1] != conv_output._version:
            return
        if self._conv_uses.get(id(conv_output), 0) != 1 or not batch_norm.spatial:
            return  # something besides this BatchNorm read it: keep the convolution's hook
        conv = entry[3]
        scale = batch_norm.intercept.input_scale  # set for an eval BatchNorm only
        if conv.intercept.channel_vector is None or conv.folded_vector is not None or scale is None:
            return
        handle = self._hooks.pop(conv, None)
        if handle is None:
            return
        handle.remove()
        batch_norm.folded_vector = conv.intercept.channel_vector * scale
        self._folded[id(conv_output)] = (weakref.ref(conv_output), conv, batch_norm)

    def _unfold(self, graph_inputs: List[Tensor]) -> None:
        for tensor in graph_inputs:
            entry = self._folded.get(id(tensor))
            if entry is None or entry[0]() is not tensor:
                continue
            _, conv, batch_norm = self._folded.pop(id(tensor))
            batch_norm.folded_vector = None
            # Registered before the op that reads (or overwrites) it runs: right version.
            self._hooks[conv] = tensor.register_hook(self._hook_for(conv))


def _spatial_shape(shape: Sequence[int], layout: str) -> Tuple[int, ...]:
    return tuple(shape[2:]) if layout == CHANNELS_FIRST else tuple(shape[1:-1])


def _removed_dims(
    name: str, rank: int, args: Sequence[Any], kwargs: Dict[str, Any]
) -> Optional[List[int]]:
    """The input axes that integer indexing removes (``x[0]``, ``x[:, 1]``, ``select``...)."""
    if name == "__getitem__" and args:
        index = args[0] if isinstance(args[0], tuple) else (args[0],)
        if len(index) > rank or not all(
            isinstance(i, (int, slice)) and not isinstance(i, bool) for i in index
        ):
            return None  # None, Ellipsis, tensors and masks move axes in other ways
        return [d for d, i in enumerate(index) if isinstance(i, int)]
    if name in ("select", "unbind"):
        dim = args[0] if args else kwargs.get("dim", 0)
        return [dim % rank] if isinstance(dim, int) and rank > 0 else None
    return None


def _permutation(
    name: str, rank: int, args: Sequence[Any], kwargs: Dict[str, Any]
) -> Optional[List[int]]:
    try:
        if name == "t":
            return [1, 0] if rank == 2 else list(range(rank))
        if name == "permute":
            dims = (
                args[0]
                if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size))
                else args
            )
            dims = list(dims) if dims else list(kwargs.get("dims", ()))
            return [d % rank for d in dims]
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = (list(args) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2]
            perm = list(range(rank))
            a, b = a % rank, b % rank
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        if name in ("movedim", "moveaxis"):
            source, destination = (list(args) + [kwargs.get("source"), kwargs.get("destination")])[
                :2
            ]
            source = [source] if isinstance(source, int) else list(source)
            destination = [destination] if isinstance(destination, int) else list(destination)
            placed: List[Optional[int]] = [None] * rank
            for s, d in zip(source, destination):
                placed[d % rank] = s % rank
            rest = iter(i for i in range(rank) if i not in {s % rank for s in source})
            return [p if p is not None else next(rest) for p in placed]
    except (TypeError, IndexError, ValueError):
        return None
    return None


@dataclass
class Pass:
    """What one captured forward and backward pass produced."""

    inputs: Any  # the detached copy of the input that was differentiated (a tuple for several)
    output: Tensor  # selected output per example, (B,)
    input_gradient: Any  # grad_x f, the input's shape (a tuple for several inputs)
    sources: List[BiasSource]
    failed_ops: List[str]
    # What recorded the sources: the Capture (a CapturePlan can be made from it) or the
    # plan's replay.
    recorder: Optional[Recorder] = None


# What torch.utils.checkpoint raises when a recomputation saves other tensors than the
# forward pass did (torch >= 2.1).
_CHECKPOINT_ERRORS: Tuple[type[BaseException], ...] = tuple(
    e
    for e in (getattr(torch_checkpoint, "CheckpointError", None),)
    if isinstance(e, type) and issubclass(e, BaseException)
)


def forward_backward(
    forward_func: Callable[..., Any],
    inputs: Any,
    select: Callable[[Any], Tensor],
    additional_forward_args: Tuple[Any, ...],
    collector: Collector,
    create_graph: bool = False,
    plan: Optional[Plan] = None,
    *,
    reference: int = 0,
    layout: str = CHANNELS_FIRST,
) -> Pass:
    """One forward pass under capture, then one backward pass to the input.

    ``plan`` (a :class:`captum_fullgrad.replay.CapturePlan`) replaces the traced capture
    by its replay with module hooks; the replay raises
    :class:`~captum_fullgrad.replay.ReplayMismatch` after the forward pass, before any
    backward, when the forward pass did not follow the plan.

    The input is copied (``detach().clone()``) so that the caller's tensor, its
    ``requires_grad`` flag and its ``.grad`` stay as they were; ``torch.autograd.grad``
    accumulates nothing into any ``.grad``. Gradients are enabled even under
    ``torch.no_grad()`` (Captum's ``sensitivity_max`` calls explanations that way).
    ``create_graph=True`` keeps the backward pass differentiable (training uses).

    A tuple of ``inputs`` (Captum's several inputs) is passed to ``forward_func`` in order
    and differentiated together; the maps follow ``inputs[reference]``'s ``layout``, and
    the pass's ``inputs`` and ``input_gradient`` are tuples too.
    """
    several = isinstance(inputs, tuple)
    copies = []
    for tensor in inputs if several else (inputs,):
        x = tensor.detach().clone()
        if create_graph and tensor.requires_grad:
            # Keep the caller's graph for double backpropagation (the penalty is then a
            # function of whatever produced ``inputs``).
            x = tensor.clone()
        copies.append(x.requires_grad_(True))
    x = copies[reference]
    others = [c for i, c in enumerate(copies) if i != reference]
    with torch.enable_grad():
        recorder: Recorder = (
            Capture(forward_func, x, collector, layout=layout, other_inputs=others)
            if plan is None
            # A replay may have the backward pass capture small layers' gradients rather
            # than hook them (see Replay.gradient_edges); not for a differentiable
            # backward pass, whose collectors keep graphs.
            else plan.replay(x, collector, capture_gradients=not create_graph)
        )
        with recorder as capture:
            output = forward_func(*copies, *additional_forward_args)
        try:
            selected = select(output)
            # A replay may find its sources in the graph now (raising ReplayMismatch
            # before any backward pass when the graph is not the plan's).
            capture.prepare_backward(selected)
            gradients: List[Optional[Tensor]] = [None] * len(copies)
            if selected.requires_grad:
                edges = capture.gradient_edges
                try:
                    everything = torch.autograd.grad(
                        selected.sum(),
                        [*copies, *edges],
                        create_graph=create_graph,
                        allow_unused=True,
                    )
                except _CHECKPOINT_ERRORS as error:
                    raise RuntimeError(
                        "captum_fullgrad: the model recomputes part of its forward pass in "
                        "the backward pass (activation checkpointing, torch.utils.checkpoint), "
                        "and the traced capture's intercepts are not recomputed with it. "
                        "Turn checkpointing off for attribution (timm: "
                        "model.set_grad_checkpointing(False))."
                    ) from error
                gradients = list(everything[: len(copies)])
                if edges:
                    capture.deliver_gradients(everything[len(copies) :])
        finally:
            capture.remove_gradient_hooks()
    filled = [torch.zeros_like(c) if g is None else g for c, g in zip(copies, gradients)]
    if not create_graph:
        copies = [c.detach() for c in copies]
    return Pass(
        inputs=tuple(copies) if several else copies[0],
        output=selected if create_graph else selected.detach(),
        input_gradient=tuple(filled) if several else filled[0],
        sources=capture.sources,
        failed_ops=capture.failed_ops,
        recorder=capture,
    )
