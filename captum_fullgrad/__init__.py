"""captum-fullgrad: full-Jacobian (FullGrad) attributions for Captum.

The data path reads in one direction: the model's operations are captured
(:mod:`~captum_fullgrad.capture`; repeated calls replay a capture plan,
:mod:`~captum_fullgrad.replay`), decomposed into eq. 1's full-Jacobian
(:mod:`~captum_fullgrad.decomposition`), aggregated into eq. 4's saliency map
(:mod:`~captum_fullgrad.aggregation`) and offered as a Captum attribution
(:class:`FullGradient`; :class:`LayerFullGradient` from a layer onward).
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "FullGradient",
    "FullJacobian",
    "LayerFullGradient",
    "full_jacobian",
    "open_attributions",
    "__version__",
]

# The public names are imported on first use (PEP 562), so that ``import captum_fullgrad``
# (and with it ``captum-fullgrad --help``) does not load torch.
_LAZY = {
    "FullGradient": ".full_gradient",
    "FullJacobian": ".decomposition",
    "LayerFullGradient": ".layer_full_gradient",
    "full_jacobian": ".decomposition",
    "open_attributions": ".store",
}

if TYPE_CHECKING:  # pragma: no cover
    from .decomposition import FullJacobian, full_jacobian
    from .full_gradient import FullGradient
    from .layer_full_gradient import LayerFullGradient
    from .store import open_attributions


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> Any:
    return sorted([*globals(), *_LAZY])
