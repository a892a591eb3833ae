"""FullGradient: the full-Jacobian saliency map (eq. 4) as a Captum attribution."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from . import _validation
from .aggregation import EQ4, POSTPROCESS_MODES, MapCollector, input_term_map, interpolation_mode
from .capture import BiasSource, forward_backward
from .replay import CapturePlan, ReplayMismatch, call_signature, plans_for

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
    ``attributions.sum(1)`` is eq. 4's single-channel map. One forward and one backward
    pass; every layer's gradient is reduced as it is produced.

    Args:
        forward_func: the model, an ``nn.Module`` in eval mode (its submodule names
            select layers), or any callable returning one tensor.
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
    ) -> None:
        GradientAttribution.__init__(self, forward_func)
        self.layers = _validation.layer_names(forward_func, layers)
        self.reuse_capture = reuse_capture
        self._plans = plans_for(forward_func)

    def has_convergence_delta(self) -> bool:
        """True: the delta is eq. 1's completeness gap, ``f(x) - (<grad, x> + sum of bias-Jacobians)``."""
        return True

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
    ) -> Union[Tensor, Tuple[Tensor, ...], Tuple[Union[Tensor, Tuple[Tensor, ...]], Tensor]]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)`` (or ``(B, C, L)``,
                        ``(B, C, D, H, W)``), or a one-tensor tuple; a tuple in gives a
                        tuple out. Not modified.
            target (int, tuple, Tensor, or list, optional): output indices to explain, in
                        any of Captum's formats: one int for all examples, a list or 1-D
                        tensor of one index per example, a tuple (or list of tuples) for
                        outputs with more than two dimensions. ``None`` when the model
                        returns one value per example. Default: None
            additional_forward_args (Any, optional): further arguments of
                        ``forward_func`` after ``inputs``; constants of the decomposition.
                        Default: None
            return_convergence_delta (bool, optional): also return eq. 1's completeness gap
                        per example, ``(B,)``. Default: False
            single_channel (bool, optional): return the ``(B, 1, H, W)`` map of eq. 4
                        instead of the input-shaped attribution. Default: False
            include_input_gradient (bool, optional): False gives the bias-Jacobian-only
                        map (the last column of the paper's Table 5). Default: True
            postprocess (str, optional): ``"eq4"`` (the seed paper: channel sum, then
                        absolute value, per conv-BN block) or ``"neurips2019"`` (the
                        authors' FullGrad code: absolute value, per-example min-max rescale
                        of each layer over ``C x H x W``, then channel sum). Default: "eq4"
            interpolate_mode (str, optional): how layer maps are resized to the input:
                        ``"bilinear"`` (linear/trilinear for 1-D/3-D inputs), ``"bicubic"``,
                        ``"nearest"``, ``"area"``. Default: "bilinear"
            align_corners (bool, optional): passed to interpolation; ``None`` means False
                        for ``"eq4"`` and True for ``"neurips2019"`` (the authors' choice).
            internal_batch_size (int, optional): split the batch into chunks of this size
                        to bound memory; results are identical. Default: None

        Returns:
            **attributions** (*Tensor* or *tuple[Tensor]*) of the input's shape (or
            ``(B, 1, *spatial)`` with ``single_channel``), and with
            ``return_convergence_delta`` the **delta** tensor ``(B,)``.
        """
        method = "FullGradient"
        x, was_tuple = _validation.format_single_input(inputs, method=method)
        _validation.check_spatial_rank(x, method=method)
        _validation.check_eval_mode(self.forward_func, method=method)
        if postprocess not in POSTPROCESS_MODES:
            raise ValueError(
                f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}."
            )
        interpolation_mode(interpolate_mode, x.dim() - 2)
        if internal_batch_size is not None and internal_batch_size < 1:
            raise ValueError(
                f"internal_batch_size must be a positive integer, got {internal_batch_size}."
            )
        if align_corners is None:
            align_corners = postprocess != EQ4
        extra = _validation.format_additional_forward_args(additional_forward_args)
        target = _validation.target_on_host(target)

        batch = x.shape[0]
        chunk = internal_batch_size or batch
        maps, deltas = [], []
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            whole = start == 0 and stop == batch
            attribution, delta = self._attribute_batch(
                x if whole else x[start:stop],
                target if whole else _validation.slice_target(target, start, stop, batch),
                extra if whole else _validation.slice_additional_args(extra, start, stop, batch),
                single_channel=single_channel,
                include_input_gradient=include_input_gradient,
                postprocess=postprocess,
                interpolate_mode=interpolate_mode,
                align_corners=align_corners,
            )
            maps.append(attribution)
            deltas.append(delta)
        attributions = maps[0] if len(maps) == 1 else torch.cat(maps)
        result: Union[Tensor, Tuple[Tensor, ...]] = (attributions,) if was_tuple else attributions
        if return_convergence_delta:
            return result, (deltas[0] if len(deltas) == 1 else torch.cat(deltas))
        return result

    def _attribute_batch(
        self,
        x: Tensor,
        target: _validation.TargetType,
        extra: Tuple[Any, ...],
        *,
        single_channel: bool,
        include_input_gradient: bool,
        postprocess: str,
        interpolate_mode: str,
        align_corners: bool,
    ) -> Tuple[Tensor, Tensor]:
        def select(output: Any) -> Tensor:
            return _validation.select_output(output, target, x.shape[0], method="FullGradient")

        collector = MapCollector(postprocess, self._layer_filter())
        signature = (
            call_signature(x, extra, postprocess, self.layers) if self.reuse_capture else None
        )
        plan = self._plans.get(signature) if signature is not None else None
        if plan is not None:
            try:
                run = forward_backward(self.forward_func, x, select, extra, collector, plan=plan)
            except ReplayMismatch:
                self._plans.mismatched(signature)
                plan = None
                collector = MapCollector(postprocess, self._layer_filter())
        if plan is None:
            run = forward_backward(self.forward_func, x, select, extra, collector)
            if signature is not None:
                self._plans.put(signature, CapturePlan.record(run.recorder))
        self._check_layers_matched(run.sources)
        spatial = x.shape[2:]
        if include_input_gradient:
            input_part = input_term_map(run.input_gradient, run.inputs, postprocess)
        else:
            input_part = torch.zeros_like(x)
        bias_map = collector.bias_map(spatial, interpolate_mode, align_corners)
        if single_channel:
            attribution = input_part.sum(1, keepdim=True)
            if bias_map is not None:
                attribution = attribution + bias_map.unsqueeze(1).to(attribution.dtype)
        else:
            attribution = input_part
            if bias_map is not None:
                attribution = attribution + (bias_map / x.shape[1]).unsqueeze(1).to(
                    attribution.dtype
                )
        input_term = (run.input_gradient * run.inputs).flatten(1).sum(1)
        bias_sum = (
            collector.bias_sum if collector.bias_sum is not None else torch.zeros_like(input_term)
        )
        delta = run.output - (input_term + bias_sum.to(input_term.dtype)).to(run.output.dtype)
        return attribution.detach(), delta.detach()

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
                    f"FullGradient: layer {layer!r} has no spatial bias source; spatial sources are: "
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
