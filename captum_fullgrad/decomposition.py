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
from .capture import BiasSource, Pass, forward_backward

__all__ = ["FullJacobian", "full_jacobian"]


@dataclass
class FullJacobian:
    """The full-Jacobian of a batch: eq. 1's terms, each per example.

    Attributes:
        output: ``f(x)``, the selected output per example, ``(B,)``.
        inputs: the input ``x`` that was decomposed.
        input_jacobian: ``grad_x f(x)``, the input's shape.
        bias_jacobians: ordered mapping from a readable source name (module qualified name;
            ``module:op`` for operations written in a ``forward``; ``#k`` for repeated calls)
            to ``f^b = df/dy * c``, shaped like that source's output.
        sources: the :class:`~captum_fullgrad.capture.BiasSource` of each name (operation,
            layout, whether it is spatial, its conv-BN block).
        completeness_delta: ``f(x) - (<grad_x f, x> + sum of every bias-Jacobian)`` per
            example; zero up to rounding when every intercept is accounted for.
        failed_ops: operations whose intercept could not be computed (their gap shows in
            ``completeness_delta``).
    """

    output: Tensor
    inputs: Tensor
    input_jacobian: Tensor
    bias_jacobians: "OrderedDict[str, Tensor]"
    sources: "OrderedDict[str, BiasSource]"
    completeness_delta: Tensor
    failed_ops: List[str] = field(default_factory=list)

    @property
    def input_term(self) -> Tensor:
        """``<grad_x f, x>`` per example, ``(B,)``."""
        return (self.input_jacobian * self.inputs).flatten(1).sum(1)

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
        """Channel-summed bias-Jacobians ``sum_c f^b_{l,c}`` of each spatial block, ``(B, *spatial)``.

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
    total = (run.input_gradient * run.inputs).flatten(1).sum(1)
    for source in run.sources:
        sources[source.name] = source
        if source in kept:
            bj = kept[source]
        else:
            # No gradient reached this output: it does not influence f(x).
            bj = torch.zeros(
                source.shape, dtype=run.input_gradient.dtype, device=run.input_gradient.device
            )
        bias_jacobians[source.name] = bj
        total = total + source.per_example_total(bj).to(total.dtype)
    return FullJacobian(
        output=run.output,
        inputs=run.inputs,
        input_jacobian=run.input_gradient,
        bias_jacobians=bias_jacobians,
        sources=sources,
        completeness_delta=run.output - total.to(run.output.dtype),
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
) -> FullJacobian:
    """Decompose ``model``'s output on ``inputs`` into its full-Jacobian (eq. 1).

    One forward and one backward pass. Every bias source is captured wherever it is
    written (modules, functional code in ``forward``, products of activations such as
    squeeze-and-excitation, constants added or concatenated), including under in-place
    activations, modules called more than once and shared weights.

    Args:
        model: an ``nn.Module`` (names come from its submodules) or any callable
            ``model(inputs, *additional_forward_args) -> Tensor``.
        inputs: the input tensor ``x`` of shape ``(B, ...)``, or a one-tensor tuple.
            Not modified; gradients are taken with respect to a copy.
        target: which output to decompose, in any of Captum's formats (an int, a list or
            tensor of one index per example, a tuple for outputs of more than two
            dimensions); ``None`` when the model returns one value per example.
        additional_forward_args: further arguments passed to ``model`` after ``inputs``;
            they are constants of the decomposition (their contribution appears as
            intercepts).
        create_graph: keep the result differentiable with respect to the parameters
            (double backpropagation, for training losses built from bias-Jacobians).
        allow_training_mode: decompose a model in training mode (BatchNorm then uses batch
            statistics, and its intercepts couple the examples of the batch).

    Returns:
        :class:`FullJacobian` with ``output``, ``input_jacobian``, ``bias_jacobians`` and
        ``completeness_delta`` (per example).
    """
    method = "full_jacobian"
    x, _ = _validation.format_single_input(inputs, method=method)
    if not allow_training_mode:
        _validation.check_eval_mode(model, method=method)
    extra = _validation.format_additional_forward_args(additional_forward_args)
    target = _validation.target_on_host(target)
    collector = _KeepBiasJacobians()
    run = forward_backward(
        model,
        x,
        lambda output: _validation.select_output(output, target, x.shape[0], method=method),
        extra,
        collector,
        create_graph=create_graph,
    )
    return _assemble(run, collector.bias_jacobians)
