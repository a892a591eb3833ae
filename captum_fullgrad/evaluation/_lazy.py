"""torch, imported on first use, so that the metric declarations read without it.

``captum-fullgrad evaluate --help`` lists one option per registered metric, so it imports
the modules that declare metrics; torch's import alone takes seconds. Those modules take
``torch`` (and ``F``, ``nn``) from here: :func:`lazy_module` proxies at run time, the real
modules for the type checker::

    from captum_fullgrad.evaluation._lazy import F, nn, no_grad, torch

A proxy imports its module on the first attribute read and from then on holds the
module's attributes itself, so a hot loop pays nothing. Decorators that would touch torch
when a module is imported (``@torch.no_grad()``) are written :func:`no_grad`.
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import TYPE_CHECKING, Any, Callable, TypeVar

__all__ = ["F", "lazy_module", "nn", "no_grad", "torch"]

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


class _LazyModule(types.ModuleType):
    """Stands for the module ``name`` until an attribute is read; then imports it."""

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self.__name__)
        if "_lazy_loaded" not in self.__dict__:
            # Later reads find the attributes here without coming back through __getattr__
            # (only names the module gains afterwards, or lacks, still do).
            self.__dict__.update(
                {k: v for k, v in vars(module).items() if k not in ("__name__", "__spec__")}
            )
            self.__dict__["_lazy_loaded"] = True
        return getattr(module, attribute)


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` that imports it on first use (see the module docstring)."""
    return _LazyModule(name)


def no_grad(fn: _Fn) -> _Fn:
    """``@torch.no_grad()`` without importing torch until ``fn`` is called."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# The names the metric modules import (``from ._lazy import torch``): one place, so that
# each module's import stays one line, real modules for the type checker.
if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn.functional as F
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")
    F = lazy_module("torch.nn.functional")
