"""Checks shared by the public entry points: bad input gets a clear exception, nothing changes."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _select_targets
from torch import Tensor, nn

from ._mode import check_mode

TargetType = Union[None, int, Tuple[int, ...], Tensor, List[Any]]


def format_single_input(
    inputs: Union[Tensor, Tuple[Tensor, ...]], *, method: str
) -> Tuple[Tensor, bool]:
    """Return ``(tensor, was_tuple)`` for a tensor or a one-tensor tuple, else raise."""
    was_tuple = isinstance(inputs, tuple)
    if was_tuple:
        if len(inputs) != 1:
            raise ValueError(
                f"{method} attributes to a single input tensor; got a tuple of {len(inputs)} "
                "inputs. Pass the image tensor alone (or a one-tensor tuple) and the rest as "
                "additional_forward_args."
            )
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{method} expects a torch.Tensor input, got {type(inputs).__name__}.")
    if not inputs.is_floating_point():
        raise TypeError(
            f"{method} needs a floating-point input to differentiate; got dtype {inputs.dtype}."
        )
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(
            f"{method} needs a batch dimension with at least one example; got shape "
            f"{tuple(inputs.shape)}."
        )
    # On an accelerator the check would make the host wait for the device on every call
    # (it was the only synchronisation in FullGradient); there a NaN shows in the result.
    # A NaN or an Inf makes the sum non-finite; the sum is 30 times cheaper than
    # isfinite().all() on the CPU (0.2 against 5.8 ms for 8 x 3 x 224 x 224), and only a
    # non-finite sum (or a finite input whose sum overflows) takes the exact check.
    if (
        inputs.device.type == "cpu"
        and not math.isfinite(float(inputs.detach().sum()))
        and not torch.isfinite(inputs).all()
    ):
        raise ValueError(f"{method}: the input contains NaN or Inf values.")
    return inputs, was_tuple


def format_inputs(inputs: Any, *, method: str) -> Tuple[Tuple[Tensor, ...], bool]:
    """Return ``(tensors, was_tuple)`` for a tensor or a tuple of tensors (Captum's inputs).

    Every tensor must be floating point, finite (on the CPU) and share the batch size.
    """
    was_tuple = isinstance(inputs, tuple)
    tensors = inputs if was_tuple else (inputs,)
    if was_tuple and len(tensors) == 0:
        raise ValueError(f"{method}: got an empty tuple of inputs.")
    checked = tuple(format_single_input(t, method=method)[0] for t in tensors)
    sizes = {t.shape[0] for t in checked}
    if len(sizes) > 1:
        raise ValueError(
            f"{method}: the inputs have different batch sizes {[t.shape[0] for t in checked]}; "
            "every input needs one row per example."
        )
    return checked, was_tuple


def check_bias_input(bias_input: Any, count: int, *, method: str) -> int:
    """The index of the input that receives the bias terms, checked against ``count`` inputs."""
    if isinstance(bias_input, bool) or not isinstance(bias_input, int):
        raise TypeError(f"{method}: bias_input must be an int index, got {bias_input!r}.")
    if not -count <= bias_input < count:
        raise ValueError(f"{method}: bias_input={bias_input} is out of range for {count} input(s).")
    return bias_input % count


# Public layout names and the capture's: images are channels-first; ``(B, L, E)`` token
# tensors (Captum's text layout) hold their channels (the embedding) last.
LAYOUTS = {"channels_first": "cf", "tokens": "cl"}


def check_layout(layout: Any, *, method: str) -> str:
    """The capture's layout code for a public layout name."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"{method}: layout must be one of {tuple(LAYOUTS)}, got {layout!r} "
            "('tokens' reads a (B, L, E) tensor as L positions of E channels)."
        )
    return LAYOUTS[layout]


def channel_axis(layout: str, rank: int) -> int:
    """The channel axis of a tensor of ``rank`` in a public ``layout``."""
    return 1 if layout == "channels_first" else rank - 1


def check_internal_batch_size(value: Any, *, method: str) -> Optional[int]:
    """``None`` or a positive int; a bool or a float is refused, never rounded."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{method}: internal_batch_size must be a positive int or None, got {value!r}."
        )
    if value < 1:
        raise ValueError(f"{method}: internal_batch_size must be a positive int, got {value}.")
    return value


def check_postprocess(postprocess: Any, modes: Sequence[str], *, method: str) -> str:
    """``postprocess`` when it is one of ``modes``, the modes ``method`` supports."""
    if postprocess not in modes:
        raise ValueError(
            f"{method}: postprocess must be one of {tuple(modes)}, got {postprocess!r}."
        )
    return postprocess


def check_call(
    forward_func: Callable[..., Any],
    target: TargetType,
    additional_forward_args: Any,
    internal_batch_size: Any,
    *,
    method: str,
) -> Tuple[TargetType, Tuple[Any, ...], Optional[int]]:
    """The checks and conversions that every ``attribute`` of this package makes (FullGradient
    and LayerFullGradient): the mode policy on ``forward_func``, ``internal_batch_size``
    (:func:`check_internal_batch_size`), and the call's arguments in the form the batch loop
    slices.

    Returns:
        ``(target on the host, additional_forward_args as a tuple, internal_batch_size)``.
    """
    check_mode(forward_func, method=method)
    internal_batch_size = check_internal_batch_size(internal_batch_size, method=method)
    extra = format_additional_forward_args(additional_forward_args)
    return target_on_host(target), extra, internal_batch_size


def check_spatial_rank(inputs: Tensor, *, method: str, layout: str = "channels_first") -> None:
    if layout == "tokens":
        if inputs.dim() != 3:
            raise ValueError(
                f"{method}: layout='tokens' needs a (B, L, E) input; got shape "
                f"{tuple(inputs.shape)}."
            )
        return
    if inputs.dim() not in (3, 4, 5):
        raise ValueError(
            f"{method} makes a spatial saliency map (eq. 4) and needs an input of shape (B, C, L), "
            f"(B, C, H, W) or (B, C, D, H, W); got rank {inputs.dim()} with shape "
            f"{tuple(inputs.shape)}. "
            "For non-spatial inputs use captum_fullgrad.full_jacobian."
        )


def check_eval_mode(forward_func: Callable[..., Any], *, method: str) -> None:
    """The mode policy (:func:`captum_fullgrad._mode.check_mode`): refuse a model only when
    a module of a mode-dependent kind (BatchNorm, dropout, drop-path...) is training."""
    check_mode(forward_func, method=method)


def format_additional_forward_args(additional_forward_args: Any) -> Tuple[Any, ...]:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def select_output(output: Any, target: TargetType, batch_size: int, *, method: str) -> Tensor:
    """The scalar output per example that eq. 1 decomposes, shape ``(B,)``."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{method}: the model must return a tensor, got {type(output).__name__}; "
            "wrap it so that "
            "it returns the logits tensor."
        )
    if output.dim() == 0 or output.shape[0] != batch_size:
        raise ValueError(
            f"{method}: the model output has shape {tuple(output.shape)}, "
            "whose first dimension is not "
            f"the batch size {batch_size}."
        )
    if target is None:
        if output[0].numel() != 1:
            raise ValueError(
                f"{method}: the model output has shape {tuple(output.shape)}; "
                "pass `target` to choose "
                "which output to explain."
            )
        return output.reshape(batch_size)
    _check_target(target, output, batch_size, method=method)
    if isinstance(target, Tensor) and target.device != output.device:
        target = target.to(output.device, non_blocking=True)
    selected = _select_targets(output, target)
    if selected.numel() != batch_size:
        raise ValueError(
            f"{method}: target {target!r} selects {selected.numel()} values "
            "from an output of shape "
            f"{tuple(output.shape)}; it must select one value per example."
        )
    return selected.reshape(batch_size)


def _check_target(target: TargetType, output: Tensor, batch_size: int, *, method: str) -> None:
    if output.dim() < 2:
        raise ValueError(
            f"{method}: the model output has shape {tuple(output.shape)}, one value per example; "
            "leave `target` as None."
        )
    num_classes = output.shape[1]

    def check_index(value: int, where: str) -> None:
        if not 0 <= int(value) < num_classes:
            raise ValueError(
                f"{method}: target {where}{int(value)} is out of range for an output with "
                f"{num_classes} classes (valid: 0..{num_classes - 1})."
            )

    if isinstance(target, bool):
        raise TypeError(
            f"{method}: target must be an int, a tuple, a list or a tensor, not a bool."
        )
    if isinstance(target, int):
        check_index(target, "")
    elif isinstance(target, Tensor):
        if target.is_floating_point():
            raise TypeError(
                f"{method}: a target tensor must hold integer class indices, got {target.dtype}."
            )
        flat = target.reshape(-1)
        if flat.numel() not in (1, batch_size) or target.dim() > 1:
            raise ValueError(
                f"{method}: target tensor of shape {tuple(target.shape)} does not match the batch "
                f"size {batch_size}: give one index, or one per example."
            )
        if flat.numel() and (flat.min() < 0 or flat.max() >= num_classes):
            bad = flat[(flat < 0) | (flat >= num_classes)][0]
            check_index(int(bad), "index ")
    elif isinstance(target, list):
        if len(target) != batch_size:
            raise ValueError(
                f"{method}: target list has {len(target)} entries for a batch of "
                f"{batch_size} examples."
            )
        for item in target:
            if isinstance(item, int) and not isinstance(item, bool):
                check_index(item, "index ")
            elif isinstance(item, tuple):
                _check_tuple_target(item, output, method=method)
            else:
                raise TypeError(
                    f"{method}: a target list holds ints (one class per example) or tuples, "
                    f"not {type(item).__name__}."
                )
    elif isinstance(target, tuple):
        _check_tuple_target(target, output, method=method)
    else:
        raise TypeError(f"{method}: unsupported target type {type(target).__name__}.")


def _check_tuple_target(target: Tuple[Any, ...], output: Tensor, *, method: str) -> None:
    """A tuple indexes one output per example: one in-range index per non-batch axis."""
    if len(target) != output.dim() - 1:
        raise ValueError(
            f"{method}: target tuple {target} has {len(target)} indices for an output of shape "
            f"{tuple(output.shape)} (needs {output.dim() - 1})."
        )
    for axis, index in enumerate(target, start=1):
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{method}: target tuple {target} must hold ints.")
        if not 0 <= index < output.shape[axis]:
            raise ValueError(
                f"{method}: target tuple {target} is out of range on output axis {axis} "
                f"(size {output.shape[axis]}, valid: 0..{output.shape[axis] - 1})."
            )


def target_on_host(target: TargetType) -> TargetType:
    """A tensor target copied to the CPU once, before the forward pass.

    Its range check needs the output's class count; checking a CUDA tensor after the
    forward pass would stall the host between the forward and the backward pass.
    """
    if isinstance(target, Tensor):
        return target.detach().cpu()
    if isinstance(target, list) and any(isinstance(t, Tensor) for t in target):
        return [int(t) if isinstance(t, Tensor) and t.numel() == 1 else t for t in target]
    return target


def slice_target(target: TargetType, start: int, stop: int, batch_size: int) -> TargetType:
    """The part of a Captum target that applies to examples ``start:stop``."""
    if isinstance(target, list):
        return target[start:stop]
    if isinstance(target, Tensor) and target.numel() == batch_size and batch_size > 1:
        return target.reshape(-1)[start:stop]
    return target


def slice_additional_args(
    args: Tuple[Any, ...], start: int, stop: int, batch_size: int
) -> Tuple[Any, ...]:
    """Tensors with a batch dimension are sliced; everything else passes unchanged."""
    return tuple(
        a[start:stop] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch_size else a
        for a in args
    )


def layer_names(
    model: Any, layers: Optional[Sequence[Union[str, nn.Module]]]
) -> Optional[Tuple[str, ...]]:
    """Normalise a user's layer choice (names or modules) to qualified names."""
    if layers is None:
        return None
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
    names = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            match = [n for n, m in modules.items() if m is layer]
            if not match:
                raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model.")
            names.append(match[0])
        elif isinstance(layer, str):
            base = layer.split(":")[0].split("#")[0]
            if modules and base not in modules:
                close = [n for n in modules if n and (base in n or n in base)][:8]
                raise ValueError(
                    f"layer {layer!r} is not a module of the model"
                    + (f"; close names: {', '.join(close)}" if close else "")
                    + "."
                )
            names.append(layer)
        else:
            raise TypeError(f"layers must be module names or modules, got {type(layer).__name__}.")
    return tuple(names)
