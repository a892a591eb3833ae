"""FullGradient: the full-Jacobian saliency map (eq. 4) as a Captum attribution."""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from . import _validation
from .aggregation import (
    EQ4,
    NEURIPS2019,
    POSTPROCESS_MODES,
    SIGNED,
    MapCollector,
    interpolation_mode,
    minmax_rescale,
    signed_bias_attribution,
)
from .capture import BiasSource, forward_backward
from .replay import (
    ActivationInputChanged,
    CapturePlan,
    ReplayMismatch,
    call_signature,
    plans_for,
)

__all__ = ["FullGradient"]


class FullGradient(GradientAttribution):
    r"""
    Full-Jacobian saliency (Srinivas & Fleuret, "Full-Jacobian Representation of Neural
    Networks", eq. 4), with the completeness gap of eq. 1 as its convergence delta.

    A network's output decomposes exactly into its input-gradient term and the sum of its
    bias-Jacobians (eq. 1):

    .. math::
        f(x) = \nabla_x f(x)^T x + \sum_g \langle \partial f / \partial y_g, c_g \rangle

    where :math:`g` runs over every bias source: explicit biases, BatchNorm's effective
    bias and the intercept :math:`c_g = g(a) - J_g(a)\,a` of each operation that is not
    positively homogeneous of degree one (SiLU, GELU, ReLU6, LayerNorm, products of
    activations such as squeeze-and-excitation...). The saliency map (eq. 4) is

    .. math::
        S_f(x) = |\nabla_x f(x) \odot x| + \sum_{l \in L}
                 \mathrm{resize}\Big|\sum_{c \in c_l} f^b_l(x)_c\Big|

    with :math:`L` the spatial layers (a convolution directly followed by BatchNorm is one
    block whose bias-Jacobians are summed before the absolute value) and ``resize``
    bilinear interpolation to the input size.

    The attribution has the input's shape (Captum's contract): the input term per
    channel, plus the bias term spread evenly over the input channels, so that
    ``attributions.sum(1)`` is eq. 4's single-channel map. ``postprocess="signed"`` gives
    eq. 1 itself as an attribution instead: its per-example sum is ``f(x)`` up to the
    completeness gap. One forward and one backward pass; every layer's gradient is
    reduced as it is produced.

    The convergence delta is eq. 1's gap over every bias source, in Captum's sign: what
    the decomposition claims minus the truth, ``(<grad_x f, x> + sum_g <df/dy_g, c_g>) -
    f(x)`` (no baseline: eq. 1 decomposes ``f(x)`` itself).

    Args:
        forward_func: the model (its submodule names select layers), or any callable
            returning one tensor. A model in training mode is refused only when a module
            of a mode-dependent kind is training (BatchNorm, dropout, drop-path: the list
            is in :mod:`captum_fullgrad._mode`); otherwise it runs as in eval mode.
        layers: the layers whose bias-Jacobians enter the map (module names, modules, or
            source names such as ``"features.1.0.block.2:mul"``; a module includes its
            submodules). ``None`` takes every spatial bias source. The convergence delta
            always uses every source.
        reuse_capture: the first call for an input shape traces every torch operation of
            the forward pass; when all bias sources sit in ``Conv``, ``Linear`` and eval
            ``BatchNorm`` modules (VGG, ResNet, DenseNet...), later calls with the same
            input shape, dtype, device and extra-argument shapes find them again with
            plain module hooks, guarded by the planned module call order (see
            :mod:`captum_fullgrad.replay`), which removes most of the per-call host time.
            ``False`` traces every call: use it for a forward whose operations change
            with the input values, not only with its shape. Default: True
        layout: ``"channels_first"`` (images, ``(B, C, *spatial)``) or ``"tokens"``
            (``(B, L, E)`` token tensors in Captum's text layout: ``L`` positions of ``E``
            channels, so bias maps are per token). Default: "channels_first"

    Examples::

        >>> from captum.attr import NoiseTunnel
        >>> fullgrad = FullGradient(model.eval())
        >>> attributions, delta = fullgrad.attribute(images, target=labels,
        ...                                          return_convergence_delta=True)
        >>> smooth = NoiseTunnel(fullgrad).attribute(images, target=labels,
        ...                                          nt_type="smoothgrad", nt_samples=10)
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layers: Optional[Sequence[Union[str, nn.Module]]] = None,
        *,
        reuse_capture: bool = True,
        layout: str = "channels_first",
    ) -> None:
        GradientAttribution.__init__(self, forward_func)
        self.layers = _validation.layer_names(forward_func, layers)
        self.reuse_capture = reuse_capture
        self.layout = layout
        self._capture_layout = _validation.check_layout(layout, method="FullGradient")
        self._plans = plans_for(forward_func)

    @property
    def multiplies_by_inputs(self) -> bool:
        """True: the input term of eq. 1 is ``grad_x f * x`` (a global attribution)."""
        return True

    def has_convergence_delta(self) -> bool:
        """True: the delta is eq. 1's completeness gap, ``(<grad, x> + bias terms) - f(x)``."""
        return True

    def compute_convergence_delta(
        self,
        attributions: Union[Tensor, Tuple[Tensor, ...]],
        start_point: Union[None, int, float, Tensor, Tuple[Union[int, float, Tensor], ...]],
        end_point: Union[Tensor, Tuple[Tensor, ...]],
        target: _validation.TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        r"""Eq. 1's completeness gap at ``end_point``, the delta :meth:`attribute` returns.

        Captum's convergence delta compares ``sum(attributions)`` with
        ``f(end_point) - f(start_point)``. The full-Jacobian decomposes ``f(end_point)``
        itself, without a baseline (eq. 1), so this returns
        ``(<grad_x f, x> + sum of every bias term) - f(x)`` at ``x = end_point``, the same
        number as ``attribute(..., return_convergence_delta=True)``. ``attributions`` and
        ``start_point`` are not used; a non-zero ``start_point`` gets a warning, since the
        delta is not relative to it.
        """
        if start_point is not None and _nonzero(start_point):
            warnings.warn(
                "FullGradient.compute_convergence_delta ignores start_point: eq. 1 decomposes "
                "f(end_point) without a baseline.",
                UserWarning,
                stacklevel=2,
            )
        _, delta = self.attribute(
            end_point,
            target=target,
            additional_forward_args=additional_forward_args,
            return_convergence_delta=True,
        )
        return delta

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: _validation.TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        *,
        single_channel: bool = False,
        include_input_gradient: bool = True,
        postprocess: str = EQ4,
        interpolate_mode: str = "bilinear",
        align_corners: Optional[bool] = None,
        internal_batch_size: Optional[int] = None,
        bias_input: int = 0,
    ) -> Union[Tensor, Tuple[Tensor, ...], Tuple[Union[Tensor, Tuple[Tensor, ...]], Tensor]]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)`` (or ``(B, C, L)``,
                        ``(B, C, D, H, W)``; ``(B, L, E)`` with ``layout="tokens"``), or a
                        tuple of inputs passed to ``forward_func`` in order; a tuple in
                        gives a tuple out, one attribution per input. Not modified.
            target (int, tuple, Tensor, or list, optional): output indices to explain, in
                        any of Captum's formats: one int for all examples, a list or 1-D
                        tensor of one index per example, a tuple (or list of tuples) for
                        outputs with more than two dimensions. ``None`` when the model
                        returns one value per example. Default: None
            additional_forward_args (Any, optional): further arguments of
                        ``forward_func`` after ``inputs``; constants of the decomposition.
                        Default: None
            return_convergence_delta (bool, optional): also return eq. 1's completeness gap
                        per example, ``(B,)``: ``(sum of every input term + every bias
                        term) - f(x)``, Captum's sign (what the decomposition claims minus
                        the truth), in every ``postprocess`` mode and whatever ``layers``
                        and ``include_input_gradient`` select; at least float32.
                        Default: False
            single_channel (bool, optional): sum each attribution over its channel axis
                        (``(B, 1, H, W)``: eq. 4's map for ``"eq4"``). Default: False
            include_input_gradient (bool, optional): False gives the bias-Jacobian-only
                        map (the last column of the paper's Table 5). Default: True
            postprocess (str, optional): ``"eq4"`` (the seed paper: channel sum, then
                        absolute value, per conv-BN block), ``"neurips2019"`` (the
                        authors' FullGrad code: absolute value, per-example min-max rescale
                        of each layer over ``C x H x W``, then channel sum) or ``"signed"``
                        (eq. 1 itself as an attribution: ``grad_x f * x`` plus each
                        bias-Jacobian split over the input positions its cells cover, by
                        area overlap, and evenly over the channels; terms that are not
                        spatial maps spread evenly over the bias input. With every source
                        and the input term included, ``sum(attributions) - f(x)`` per
                        example is the delta). Default: "eq4"
            interpolate_mode (str, optional): how layer maps are resized to the input
                        for ``"eq4"`` and ``"neurips2019"``: ``"bilinear"``
                        (linear/trilinear for 1-D/3-D inputs), ``"bicubic"``,
                        ``"nearest"``, ``"area"``. Default: "bilinear"
            align_corners (bool, optional): passed to interpolation; ``None`` means False
                        for ``"eq4"`` and True for ``"neurips2019"`` (the authors' choice).
            internal_batch_size (int, optional): split the batch into chunks of this size
                        to bound memory; results are identical. Default: None
            bias_input (int, optional): which of several inputs receives the bias terms;
                        the maps follow its layout. Default: 0

        Returns:
            **attributions** (*Tensor* or *tuple[Tensor]*) of each input's shape (with
            ``single_channel`` the channel axis has size 1), and with
            ``return_convergence_delta`` the **delta** tensor ``(B,)``.
        """
        method = "FullGradient"
        xs, was_tuple = _validation.format_inputs(inputs, method=method)
        bias_input = _validation.check_bias_input(bias_input, len(xs), method=method)
        x = xs[bias_input]
        _validation.check_spatial_rank(x, method=method, layout=self.layout)
        target, extra, internal_batch_size = _validation.check_call(
            self.forward_func, target, additional_forward_args, internal_batch_size, method=method
        )
        _validation.check_postprocess(postprocess, POSTPROCESS_MODES, method=method)
        interpolation_mode(interpolate_mode, x.dim() - 2)
        if align_corners is None:
            align_corners = postprocess == NEURIPS2019

        batch = x.shape[0]
        chunk = internal_batch_size or batch
        parts: List[List[Tensor]] = []
        deltas = []
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            whole = start == 0 and stop == batch
            attributions, delta = self._attribute_batch(
                xs if whole else tuple(t[start:stop] for t in xs),
                target if whole else _validation.slice_target(target, start, stop, batch),
                extra if whole else _validation.slice_additional_args(extra, start, stop, batch),
                bias_input=bias_input,
                single_channel=single_channel,
                include_input_gradient=include_input_gradient,
                postprocess=postprocess,
                interpolate_mode=interpolate_mode,
                align_corners=align_corners,
            )
            parts.append(attributions)
            deltas.append(delta)
        joined = tuple(
            pieces[0] if len(pieces) == 1 else torch.cat(pieces) for pieces in zip(*parts)
        )
        result: Union[Tensor, Tuple[Tensor, ...]] = joined if was_tuple else joined[0]
        if return_convergence_delta:
            return result, (deltas[0] if len(deltas) == 1 else torch.cat(deltas))
        return result

    def _attribute_batch(
        self,
        xs: Tuple[Tensor, ...],
        target: _validation.TargetType,
        extra: Tuple[Any, ...],
        *,
        bias_input: int,
        single_channel: bool,
        include_input_gradient: bool,
        postprocess: str,
        interpolate_mode: str,
        align_corners: bool,
    ) -> Tuple[List[Tensor], Tensor]:
        x = xs[bias_input]
        several = len(xs) > 1
        others = tuple(t for i, t in enumerate(xs) if i != bias_input)

        def select(output: Any) -> Tensor:
            return _validation.select_output(output, target, x.shape[0], method="FullGradient")

        collector = MapCollector(postprocess, self._layer_filter())
        signature = (
            call_signature(
                x, others + extra, postprocess, self.layers, self.layout, bias_input, len(xs)
            )
            if self.reuse_capture
            else None
        )
        inputs: Any = xs if several else x

        def one_pass(collector: MapCollector, plan: Optional[CapturePlan]) -> Any:
            # A replay when ``plan`` is given, a trace otherwise.
            return forward_backward(
                self.forward_func,
                inputs,
                select,
                extra,
                collector,
                plan=plan,
                reference=bias_input,
                layout=self._capture_layout,
            )

        plan = self._plans.get(signature) if signature is not None else None
        plan_holds = False
        if plan is not None:
            if plan.collector_layout:
                collector.reserve(plan.collector_layout)
            try:
                run = one_pass(collector, plan)
            except ActivationInputChanged as changed:
                # The plan holds; those steps form their closed forms from the next call.
                plan.closed_form_steps.update(changed.steps)
                plan_holds = True
                plan = None
                collector = MapCollector(postprocess, self._layer_filter())
            except ReplayMismatch:
                self._plans.mismatched(signature)
                plan = None
                collector = MapCollector(postprocess, self._layer_filter())
        if plan is None:
            run = one_pass(collector, None)
            if signature is not None and not plan_holds:
                plan = CapturePlan.record(run.recorder)
                self._plans.put(signature, plan)
        if plan is not None:
            plan.collector_layout = collector.layout()
        self._check_layers_matched(run.sources)
        gradients = run.input_gradient if several else (run.input_gradient,)
        copies = run.inputs if several else (run.inputs,)
        channel_dim = _validation.channel_axis(self.layout, x.dim())

        attributions = []
        input_term: Optional[Tensor] = None
        for i, (gradient, copy) in enumerate(zip(gradients, copies)):
            # grad_x f * x, once: the input part of eq. 4 and of eq. 1's sum (the delta).
            product = gradient * copy
            summed = product.flatten(1).sum(1)
            input_term = summed if input_term is None else input_term + summed
            if not include_input_gradient:
                part = torch.zeros_like(copy)
            elif postprocess == SIGNED:
                part = product
            elif postprocess == NEURIPS2019:
                part = minmax_rescale(product.abs())
            else:
                part = product.abs_()  # no longer needed signed: the delta's sum is taken
            if i == bias_input:
                part = self._add_bias_part(
                    part,
                    collector,
                    channel_dim,
                    postprocess=postprocess,
                    interpolate_mode=interpolate_mode,
                    align_corners=align_corners,
                )
            if single_channel:
                part = part.sum(channel_dim if i == bias_input else min(1, part.dim() - 1), True)
            attributions.append(part.detach())

        # Eq. 1's gap over every source, Captum's sign; in float32 at least (under
        # autocast the output is bf16/fp16, whose rounding would hide real gaps).
        assert input_term is not None
        dtype = torch.promote_types(run.output.dtype, torch.float32)
        claimed = _as_dtype(input_term, dtype)
        bias_sum = collector.bias_sum
        if bias_sum is not None:
            claimed = claimed + _as_dtype(bias_sum, dtype)
        delta = claimed - _as_dtype(run.output, dtype)
        return attributions, delta.detach()

    def _add_bias_part(
        self,
        part: Tensor,
        collector: MapCollector,
        channel_dim: int,
        *,
        postprocess: str,
        interpolate_mode: str,
        align_corners: bool,
    ) -> Tensor:
        if postprocess == SIGNED:
            bias = signed_bias_attribution(
                collector, part.shape, channel_dim, include_non_spatial=self.layers is None
            )
            return part if bias is None else part + bias.to(part.dtype)
        spatial = [s for d, s in enumerate(part.shape) if d not in (0, channel_dim)]
        bias_map = collector.bias_map(spatial, interpolate_mode, align_corners)
        if bias_map is None:
            return part
        spread = (bias_map / part.shape[channel_dim]).unsqueeze(channel_dim)
        if spread.dtype != part.dtype:
            spread = spread.to(part.dtype)
        # ``part`` is this call's own fresh tensor (the input term's absolute value, its
        # rescale, or zeros): add in place, one allocation fewer.
        return part.add_(spread)

    def _layer_filter(self) -> Optional[Callable[[BiasSource], bool]]:
        if self.layers is None:
            return None
        layers = self.layers
        return lambda source: any(_matches(source, layer) for layer in layers)

    def _check_layers_matched(self, sources: List[BiasSource]) -> None:
        if self.layers is None:
            return
        spatial = [s for s in sources if s.spatial]
        for layer in self.layers:
            if not any(_matches(s, layer) for s in spatial):
                names = ", ".join(s.name for s in spatial[:12])
                raise ValueError(
                    f"FullGradient: layer {layer!r} has no spatial bias source; "
                    "spatial sources are: "
                    f"{names}{' ...' if len(spatial) > 12 else ''}."
                )


def _matches(source: BiasSource, layer: str) -> bool:
    """A layer choice names a source, its conv-BN block, its module or an ancestor module."""
    return (
        source.name == layer
        or source.block == layer
        or source.module == layer
        or source.module.startswith(layer + ".")
    )


def _as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # ``Tensor.to`` costs a dispatch even when nothing changes.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _nonzero(point: Any) -> bool:
    values = point if isinstance(point, tuple) else (point,)
    for value in values:
        if isinstance(value, Tensor):
            if bool((value != 0).any()):
                return True
        elif value:
            return True
    return False
