"""Decomposition: the full-Jacobian representation of eq. 1 for one batch.

For a network ``f`` and input ``x`` (seed paper, Proposition 2 and section 3.2)

    f(x) = <grad_x f(x), x> + sum_g <df/dy_g, c_g>                                   (eq. 1)

where ``g`` runs over every bias source: explicit biases, BatchNorm's effective bias and
the intercept ``c_g = g(a) - J_g(a) a`` of every operation that is not positively
homogeneous of degree one (see :mod:`captum_fullgrad._intercepts`). The bias-Jacobian of
source ``g`` is ``f^b_g = df/dy_g * c_g``, shaped like that operation's output.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor

from . import _validation
from ._mode import check_mode
from .capture import BiasSource, Pass, forward_backward

__all__ = ["FullJacobian", "full_jacobian"]


@dataclass
class FullJacobian:
    """The full-Jacobian of a batch: eq. 1's terms, each per example.

    Attributes:
        output: ``f(x)``, the selected output per example, ``(B,)``.
        inputs: the input ``x`` that was decomposed (a tuple when several inputs were).
        input_jacobian: ``grad_x f(x)``, the input's shape (a tuple, one per input, when
            several inputs were decomposed).
        bias_jacobians: ordered mapping from a readable source name (module qualified name;
            ``module:op`` for operations written in a ``forward``; ``#k`` for repeated calls)
            to ``f^b = df/dy * c``, shaped like that source's output.
        sources: the :class:`~captum_fullgrad.capture.BiasSource` of each name (operation,
            layout, whether it is spatial, its conv-BN block).
        completeness_delta: ``(<grad_x f, x> + sum of every bias-Jacobian) - f(x)`` per
            example (Captum's sign: what the decomposition claims minus the truth); zero
            up to rounding when every intercept is accounted for. At least float32.
        failed_ops: operations whose intercept could not be computed (their gap shows in
            ``completeness_delta``).
    """

    output: Tensor
    inputs: Any
    input_jacobian: Any
    bias_jacobians: "OrderedDict[str, Tensor]"
    sources: "OrderedDict[str, BiasSource]"
    completeness_delta: Tensor
    failed_ops: List[str] = field(default_factory=list)

    @property
    def input_term(self) -> Tensor:
        """``<grad_x f, x>`` per example, ``(B,)`` (summed over the inputs when several)."""
        terms = self.input_terms
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    @property
    def input_terms(self) -> Tuple[Tensor, ...]:
        """``<grad_{x_i} f, x_i>`` per example for each input ``x_i``, each ``(B,)``."""
        pairs = (
            zip(self.input_jacobian, self.inputs)
            if isinstance(self.inputs, tuple)
            else [(self.input_jacobian, self.inputs)]
        )
        return tuple((g * x).flatten(1).sum(1) for g, x in pairs)

    @property
    def bias_terms(self) -> "OrderedDict[str, Tensor]":
        """Each source's share of the output, ``sum(f^b)`` per example, ``(B,)``."""
        return OrderedDict(
            (name, self.sources[name].per_example_total(bj))
            for name, bj in self.bias_jacobians.items()
        )

    @property
    def blocks(self) -> "OrderedDict[str, Tuple[str, ...]]":
        """Linear blocks (a convolution and the BatchNorm reading its output) and their sources."""
        blocks: "OrderedDict[str, List[str]]" = OrderedDict()
        for name, source in self.sources.items():
            blocks.setdefault(source.block, []).append(name)
        return OrderedDict((block, tuple(names)) for block, names in blocks.items())

    def spatial_maps(self) -> "OrderedDict[str, Tensor]":
        """Channel-summed bias-Jacobians ``sum_c f^b_{l,c}`` of each spatial block.

        Each map is ``(B, *spatial)``.

        The maps of a conv-BN block are summed (the paper's Figure 1 and eq. 4 before the
        absolute value). Signed; their spatial sums are the blocks' shares of ``f(x)``.
        """
        maps: "OrderedDict[str, Tensor]" = OrderedDict()
        for name, source in self.sources.items():
            if not source.spatial:
                continue
            summed = self.bias_jacobians[name].sum(source.channel_dim)
            maps[source.block] = maps[source.block] + summed if source.block in maps else summed
        return maps

    def non_spatial_term(self) -> Tensor:
        """The share of ``f(x)`` from bias sources that are not spatial maps, ``(B,)``."""
        total = torch.zeros_like(self.output)
        for name, source in self.sources.items():
            if not source.spatial:
                total = total + source.per_example_total(self.bias_jacobians[name]).to(total.dtype)
        return total


class _KeepBiasJacobians:
    """Collector that keeps every bias-Jacobian at full size (memory: one tensor per source)."""

    def __init__(self) -> None:
        self.bias_jacobians: Dict[BiasSource, Tensor] = {}

    def on_source(self, source: BiasSource) -> None:
        pass

    def on_gradient(self, source: BiasSource, grad: Tensor) -> None:
        self.bias_jacobians[source] = source.bias_jacobian(grad)


def _assemble(run: Pass, kept: Dict[BiasSource, Tensor]) -> FullJacobian:
    bias_jacobians: "OrderedDict[str, Tensor]" = OrderedDict()
    sources: "OrderedDict[str, BiasSource]" = OrderedDict()
    several = isinstance(run.inputs, tuple)
    pairs = zip(run.input_gradient, run.inputs) if several else [(run.input_gradient, run.inputs)]
    total = sum((g * x).flatten(1).sum(1) for g, x in pairs)
    like = run.input_gradient[0] if several else run.input_gradient
    for source in run.sources:
        sources[source.name] = source
        if source in kept:
            bj = kept[source]
        else:
            # No gradient reached this output: it does not influence f(x).
            bj = torch.zeros(source.shape, dtype=like.dtype, device=like.device)
        bias_jacobians[source.name] = bj
        total = total + source.per_example_total(bj).to(total.dtype)
    dtype = torch.promote_types(run.output.dtype, torch.float32)
    return FullJacobian(
        output=run.output,
        inputs=run.inputs,
        input_jacobian=run.input_gradient,
        bias_jacobians=bias_jacobians,
        sources=sources,
        # Captum's sign; at least float32 (an autocast bf16 output would round real gaps).
        completeness_delta=total.to(dtype) - run.output.to(dtype),
        failed_ops=list(run.failed_ops),
    )


def full_jacobian(
    model: Callable[..., Any],
    inputs: Any,
    target: _validation.TargetType = None,
    additional_forward_args: Any = None,
    *,
    create_graph: bool = False,
    allow_training_mode: bool = False,
    bias_input: int = 0,
    layout: str = "channels_first",
) -> FullJacobian:
    """Decompose ``model``'s output on ``inputs`` into its full-Jacobian (eq. 1).

    One forward and one backward pass. Every bias source is captured wherever it is
    written (modules, functional code in ``forward``, products of activations such as
    squeeze-and-excitation, constants added or concatenated), including under in-place
    activations, modules called more than once and shared weights.

    Args:
        model: an ``nn.Module`` (names come from its submodules) or any callable
            ``model(*inputs, *additional_forward_args) -> Tensor``. A model in training
            mode is refused only when a module of a mode-dependent kind is training
            (BatchNorm, dropout, drop-path: see :mod:`captum_fullgrad._mode`).
        inputs: the input tensor ``x`` of shape ``(B, ...)``, or a tuple of inputs
            (Captum's several inputs; each gets its own input term). Not modified;
            gradients are taken with respect to copies.
        target: which output to decompose, in any of Captum's formats (an int, a list or
            tensor of one index per example, a tuple for outputs of more than two
            dimensions); ``None`` when the model returns one value per example.
        additional_forward_args: further arguments passed to ``model`` after ``inputs``;
            they are constants of the decomposition (their contribution appears as
            intercepts).
        create_graph: keep the result differentiable with respect to the parameters
            (double backpropagation, for training losses built from bias-Jacobians).
        allow_training_mode: skip the mode policy: decompose the model as it runs, also
            with training BatchNorm (batch statistics; its intercepts then couple the
            examples of the batch) or dropout (the decomposition of that random draw).
            For training losses.
        bias_input: with several inputs, the one whose layout decides which sources are
            spatial maps (see :meth:`FullJacobian.spatial_maps`). Default: 0
        layout: ``"channels_first"`` or ``"tokens"`` (``(B, L, E)``: ``E`` channels last).

    Returns:
        :class:`FullJacobian` with ``output``, ``input_jacobian``, ``bias_jacobians`` and
        ``completeness_delta`` (per example).
    """
    method = "full_jacobian"
    xs, was_tuple = _validation.format_inputs(inputs, method=method)
    bias_input = _validation.check_bias_input(bias_input, len(xs), method=method)
    capture_layout = _validation.check_layout(layout, method=method)
    if not allow_training_mode:
        check_mode(model, method=method)
    extra = _validation.format_additional_forward_args(additional_forward_args)
    target = _validation.target_on_host(target)
    collector = _KeepBiasJacobians()
    batch = xs[0].shape[0]
    run = forward_backward(
        model,
        xs if len(xs) > 1 else xs[0],
        lambda output: _validation.select_output(output, target, batch, method=method),
        extra,
        collector,
        create_graph=create_graph,
        reference=bias_input,
        layout=capture_layout,
    )
    return _assemble(run, collector.bias_jacobians)
