"""LayerFullGradient: the full-Jacobian decomposition of a network from one layer onward.

Captum attributes a text model to its embedding layer's output (token ids cannot be
differentiated). Eq. 1 holds for the part of the network after any layer: with ``h`` the
layer's output (or input) and ``g`` running over the bias sources downstream of it,

    f(x) = <grad_h f, h> + sum_g <df/dy_g, c_g>                                   (eq. 1)

where everything that does not depend on ``h`` (the token ids, an attention mask, a
residual branch from before the layer) is a constant of the decomposition and so part of
the intercepts ``c_g``. :class:`LayerFullGradient` returns this decomposition mapped onto
the layer's layout: ``grad_h f * h`` per element plus each bias-Jacobian placed on the
positions of ``h`` it covers, so that the attribution sums to ``f(x)`` up to the
completeness gap, which is the convergence delta.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from captum.attr._utils.attribution import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from . import _validation
from .aggregation import (
    EQ4,
    SIGNED,
    MapCollector,
    input_term_map,
    signed_bias_attribution,
)
from .capture import Capture

__all__ = ["LayerFullGradient"]

_LAYER_POSTPROCESS = (SIGNED, EQ4)


class LayerFullGradient(LayerAttribution, GradientAttribution):
    r"""
    The full-Jacobian representation (Srinivas & Fleuret, eq. 1) of ``forward_func`` from
    ``layer`` onward, as a Captum layer attribution.

    With :math:`h` the layer's output (or input, ``attribute_to_layer_input=True``),

    .. math::
        f(x) = \langle \nabla_h f, h \rangle
               + \sum_{g \text{ after } h} \langle \partial f / \partial y_g, c_g \rangle

    exactly: the intercepts :math:`c_g` of every operation that reads :math:`h`, directly
    or not (biases, normalisations, GELU, attention products, position embeddings...),
    and of nothing before it. The attribution has the layer output's shape. With
    ``postprocess="signed"`` (the default) it is :math:`\nabla_h f \odot h` plus each
    bias-Jacobian placed on ``h``:

    - a source laid out like ``h`` (same rank and positions: a per-token ``(B, L, E')``
      tensor for ``layout="tokens"``, a ``(B, C', H', W')`` map for channels-first) is
      summed over its channels, split over the positions of ``h`` its cells cover (area
      overlap, exact for any size ratio) and evenly over ``h``'s channels;
    - every other source spreads evenly over all elements of ``h`` for its example: a
      pooled vector ``(B, E)``, the classifier, a sequence with extra tokens
      (``(B, L + 1, E)`` with a class token), attention-shaped terms ``(B, heads, L, L)``
      and the projections inside ``nn.MultiheadAttention`` (it works sequence-first, so
      their token axis is not followed).

    Per example the attribution sums to ``f(x) + delta``. ``attributions.sum(-1)`` for
    ``layout="tokens"`` gives one score per token. ``postprocess="eq4"`` gives the
    unsigned map of eq. 4 on the layer instead (``|grad_h f * h|`` plus the absolute
    channel-summed maps of the sources laid out like ``h``, resized bilinearly).

    Args:
        forward_func: the model, or any callable returning one tensor. A model in
            training mode is refused only when a mode-dependent module (BatchNorm,
            dropout with ``p > 0``, drop-path...) is training.
        layer: the module whose output (or input) is decomposed; it must run exactly once
            per forward pass and produce one floating-point tensor with a batch axis first.
        layout: ``"tokens"`` (``h`` is ``(B, L, E)``: ``L`` positions of ``E``
            channels, Captum's text layout) or ``"channels_first"`` (``(B, C, *spatial)``).
            ``None``: ``"tokens"`` for an ``nn.Embedding`` layer, else
            ``"channels_first"``. Default: None
        device_ids: accepted for Captum's signature; not used (no DataParallel support).

    Examples::

        >>> lfg = LayerFullGradient(classifier, classifier.embedding)
        >>> attributions, delta = lfg.attribute(token_ids, target=label,
        ...                                     return_convergence_delta=True)
        >>> per_token = attributions.sum(-1)                   # (B, L)
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: nn.Module,
        layout: Optional[str] = None,
        device_ids: Union[None, List[int]] = None,
    ) -> None:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"LayerFullGradient: layer must be an nn.Module, got {type(layer)}.")
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        if layout is None:
            layout = "tokens" if isinstance(layer, nn.Embedding) else "channels_first"
        self.layout = layout
        self._capture_layout = _validation.check_layout(layout, method="LayerFullGradient")

    @property
    def multiplies_by_inputs(self) -> bool:
        """True: the layer term of eq. 1 is ``grad_h f * h``."""
        return True

    def has_convergence_delta(self) -> bool:
        """True: eq. 1's gap from the layer onward, ``(<grad_h f, h> + bias terms) - f(x)``."""
        return True

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: _validation.TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        *,
        postprocess: str = SIGNED,
        internal_batch_size: Optional[int] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor]): the model's inputs, passed to
                        ``forward_func`` in order; integer token ids are fine (only the
                        layer's tensor is differentiated). Not modified.
            target (int, tuple, Tensor, or list, optional): output indices to explain, in
                        any of Captum's formats. Default: None
            additional_forward_args (Any, optional): further arguments of
                        ``forward_func`` after ``inputs`` (an attention mask...): constants
                        of the decomposition. Default: None
            return_convergence_delta (bool, optional): also return eq. 1's gap per example,
                        ``(<grad_h f, h> + every bias term after the layer) - f(x)``
                        (Captum's sign), ``(B,)``, at least float32. Default: False
            attribute_to_layer_input (bool, optional): decompose from the layer's input
                        (its first positional argument) instead of its output; the
                        layer's own intercepts then count. Default: False
            postprocess (str, optional): ``"signed"`` (eq. 1 placed on the layer) or
                        ``"eq4"`` (eq. 4's unsigned map on the layer). Default: "signed"
            internal_batch_size (int, optional): split the batch into chunks of this
                        size; results are identical. Default: None

        Returns:
            **attributions** (*Tensor*) of the layer output's (or input's) shape and, with
            ``return_convergence_delta``, the **delta** ``(B,)``.
        """
        method = "LayerFullGradient"
        _validation.check_postprocess(postprocess, _LAYER_POSTPROCESS, method=method)
        xs = inputs if isinstance(inputs, tuple) else (inputs,)
        if not xs or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in xs):
            raise TypeError(f"{method}: inputs must be a tensor or a tuple of tensors.")
        batch = xs[0].shape[0]
        if batch == 0 or any(t.shape[0] != batch for t in xs):
            raise ValueError(f"{method}: every input needs the same non-zero batch size.")
        target, extra, internal_batch_size = _validation.check_call(
            self.forward_func, target, additional_forward_args, internal_batch_size, method=method
        )
        chunk = internal_batch_size or batch
        maps, deltas = [], []
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            whole = start == 0 and stop == batch
            attribution, delta = self._attribute_batch(
                xs if whole else tuple(t[start:stop] for t in xs),
                target if whole else _validation.slice_target(target, start, stop, batch),
                extra if whole else _validation.slice_additional_args(extra, start, stop, batch),
                attribute_to_layer_input=attribute_to_layer_input,
                postprocess=postprocess,
            )
            maps.append(attribution)
            deltas.append(delta)
        attributions = maps[0] if len(maps) == 1 else torch.cat(maps)
        if return_convergence_delta:
            return attributions, deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        return attributions

    def _layer_tensor(
        self, xs: Tuple[Tensor, ...], extra: Tuple[Any, ...], to_input: bool
    ) -> Tensor:
        """The layer's output (or input) on ``xs``: one plain forward pass, no graph."""
        seen: List[Tensor] = []

        def keep(value: Any) -> None:
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(
                    "LayerFullGradient: the layer's "
                    + ("input" if to_input else "output")
                    + f" must be one floating-point tensor, got {type(value).__name__}"
                    + (f" of {value.dtype}" if isinstance(value, Tensor) else "")
                    + "."
                )
            seen.append(value.detach().clone())

        # Another thread may run the same model meanwhile: its calls are not ours.
        owner = threading.get_ident()
        if to_input:
            handle = self.layer.register_forward_pre_hook(
                lambda m, args: keep(args[0]) if threading.get_ident() == owner else None
            )
        else:
            handle = self.layer.register_forward_hook(
                lambda m, args, out: keep(out) if threading.get_ident() == owner else None
            )
        try:
            with torch.no_grad():
                self.forward_func(*xs, *extra)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(
                f"LayerFullGradient: the layer ran {len(seen)} times in one forward pass; "
                "it must run exactly once."
            )
        return seen[0]

    def _attribute_batch(
        self,
        xs: Tuple[Tensor, ...],
        target: _validation.TargetType,
        extra: Tuple[Any, ...],
        *,
        attribute_to_layer_input: bool,
        postprocess: str,
    ) -> Tuple[Tensor, Tensor]:
        method = "LayerFullGradient"
        batch = xs[0].shape[0]
        h = self._layer_tensor(xs, extra, attribute_to_layer_input).requires_grad_(True)
        if h.dim() < 2 or h.shape[0] != batch:
            raise ValueError(
                f"{method}: the layer's tensor has shape {tuple(h.shape)}; it needs the batch "
                f"axis ({batch}) first."
            )
        if self.layout == "tokens" and h.dim() != 3:
            raise ValueError(
                f"{method}: layout='tokens' needs a (B, L, E) layer tensor; got {tuple(h.shape)}."
            )

        # The second pass reads ``h`` in place of what the layer computes, so the capture
        # follows everything that depends on it and nothing before it.
        owner = threading.get_ident()
        if attribute_to_layer_input:
            handle = self.layer.register_forward_pre_hook(
                lambda m, args: (h, *args[1:]) if threading.get_ident() == owner else None
            )
        else:
            handle = self.layer.register_forward_hook(
                lambda m, args, out: h if threading.get_ident() == owner else None
            )
        collector = MapCollector(postprocess)
        try:
            with torch.enable_grad():
                with Capture(self.forward_func, h, collector, layout=self._capture_layout) as cap:
                    output = self.forward_func(*xs, *extra)
                try:
                    selected = _validation.select_output(output, target, batch, method=method)
                    (gradient,) = (
                        torch.autograd.grad(selected.sum(), h, allow_unused=True)
                        if selected.requires_grad
                        else (None,)
                    )
                finally:
                    cap.remove_gradient_hooks()
        finally:
            handle.remove()
        h = h.detach()
        gradient = torch.zeros_like(h) if gradient is None else gradient
        channel_dim = _validation.channel_axis(self.layout, h.dim())
        if postprocess == SIGNED:
            attribution = gradient * h
            bias = signed_bias_attribution(
                collector, h.shape, channel_dim, include_non_spatial=True
            )
        else:
            attribution = input_term_map(gradient, h, EQ4)
            spatial = [s for d, s in enumerate(h.shape) if d not in (0, channel_dim)]
            bias_map = collector.bias_map(spatial, "bilinear", False) if spatial else None
            bias = (
                None
                if bias_map is None
                else (bias_map / h.shape[channel_dim]).unsqueeze(channel_dim)
            )
        if bias is not None:
            attribution = attribution + bias.to(attribution.dtype)
        dtype = torch.promote_types(selected.dtype, torch.float32)
        claimed = (gradient * h).flatten(1).sum(1).to(dtype)
        if collector.bias_sum is not None:
            claimed = claimed + collector.bias_sum.to(dtype)
        delta = claimed - selected.detach().to(dtype)
        return attribution.detach(), delta
