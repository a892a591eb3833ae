"""Mode policy: which training-mode modules make an attribution differ from eval mode.

A Captum user's model is often left in training mode (``nn.Module``'s default, Captum's
own test models, the CIFAR tutorial's ``Net``) although nothing in it depends on the
mode: then ``model.train()`` and ``model.eval()`` compute the same function and an
attribution is the same in both. Only modules of a *mode-dependent kind* change what the
forward pass computes (and some change the model itself):

=================================================  =========================================
kind                                               training mode does
=================================================  =========================================
``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy     batch statistics (examples mix) and an
variants                                           update of the running statistics
``InstanceNorm*`` with ``track_running_stats``     instance statistics and an update of the
                                                   running statistics
``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,  random masks (when ``p > 0``)
``FeatureAlphaDropout``
``MultiheadAttention``, ``RNN``/``LSTM``/``GRU``   dropout inside (when ``dropout > 0``)
``RReLU``                                          a random slope
torchvision ``StochasticDepth``, timm ``DropPath`` random dropped residual branches (when
and ``DropBlock2d``                                their probability is ``> 0``)
=================================================  =========================================

:func:`check_mode` refuses a model in which such a module is training (``ValueError``
naming the modules; the model's mode is not touched) and lets everything else run, as it
would in eval mode. Randomness written in a custom ``forward`` and keyed on
``self.training`` (``F.dropout(x, p, self.training)``) cannot be seen from the module
tree: call ``model.eval()`` for such a model.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from torch import nn

__all__ = ["MODE_DEPENDENT_KINDS", "check_mode", "mode_dependent_training_modules"]

_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

# Drop-path and drop-block modules of torchvision and timm, known by class name (neither
# library is a dependency) and the attribute holding their probability.
_NAMED_KINDS = {
    "StochasticDepth": "p",
    "DropPath": "drop_prob",
    "DropBlock2d": "drop_prob",
}

MODE_DEPENDENT_KINDS: Tuple[str, ...] = (
    "BatchNorm (batch statistics, running-statistics update)",
    "InstanceNorm with track_running_stats",
    "Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout with p > 0",
    "MultiheadAttention, RNN, LSTM, GRU with dropout > 0",
    "RReLU",
    "StochasticDepth (torchvision), DropPath, DropBlock2d (timm) with probability > 0",
)


def _why(module: nn.Module) -> Optional[str]:
    """Why a training ``module`` would compute something else than in eval mode, or None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm uses batch statistics and updates its running statistics"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if module.track_running_stats:
            return "InstanceNorm with track_running_stats updates its running statistics"
        return None
    if isinstance(module, _DROPOUTS):
        return f"dropout with p={module.p}" if module.p > 0 else None
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return f"dropout={module.dropout} inside" if module.dropout > 0 else None
    if isinstance(module, nn.RReLU):
        return "RReLU draws a random slope"
    attribute = _NAMED_KINDS.get(type(module).__name__)
    if attribute is not None:
        probability = getattr(module, attribute, 0.0) or 0.0
        return f"drops with probability {probability}" if probability > 0 else None
    return None


def mode_dependent_training_modules(model: Any) -> List[Tuple[str, str]]:
    """``(qualified name, reason)`` of every training module of a mode-dependent kind."""
    if not isinstance(model, nn.Module):
        return []
    found = []
    for name, module in model.named_modules():
        if module.training:
            reason = _why(module)
            if reason is not None:
                found.append((name or type(module).__name__, reason))
    return found


def check_mode(model: Any, *, method: str) -> None:
    """Refuse ``model`` when a mode-dependent module is training; the model is not touched."""
    if not isinstance(model, nn.Module) or not _any_training(model):
        return
    found = mode_dependent_training_modules(model)
    if not found:
        return
    shown = "; ".join(f"{name} ({reason})" for name, reason in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    raise ValueError(
        f"{method} needs the model's mode-dependent modules in eval mode, but these are "
        f"training: {shown}{more}. Call model.eval() first; the model's mode was left unchanged."
    )


def _any_training(root: nn.Module) -> bool:
    # An explicit walk over ``_modules``: ``Module.modules()`` builds a memo set and nested
    # generators, a measurable share of a small model's attribution time. It runs on every
    # call (a flag or a submodule may change between calls), so it stays lean: children
    # are pushed in one ``extend`` and a registered ``None`` child is skipped when popped.
    stack: List[Optional[nn.Module]] = [root]
    pop, extend = stack.pop, stack.extend
    while stack:
        module = pop()
        if module is None:
            continue
        if module.training:
            return True
        children = module._modules
        if children:
            extend(children.values())
    return False
