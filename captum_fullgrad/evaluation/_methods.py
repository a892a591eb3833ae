r"""The methods an evaluation scores: registered methods, plain callables and the controls.

:func:`resolve` turns what :func:`~captum_fullgrad.evaluation.evaluate` accepts (names,
:class:`~captum_fullgrad.methods.AttributionMethod` objects, ``(name, callable)`` pairs,
a mapping) into :class:`EvaluatedMethod` records, applying parameter overrides and
appending the controls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

from torch import Tensor

from captum_fullgrad.evaluation.controls import CONTROL_LABELS, CONTROL_NAMES, make_control

__all__ = ["EvaluatedMethod", "MethodSpec", "resolve"]

MethodSpec = Union[str, Any, Tuple[str, Callable[..., Tensor]]]
Methods = Union[None, Sequence[MethodSpec], Mapping[str, Callable[..., Tensor]]]


@dataclass
class EvaluatedMethod:
    """A method as the suite runs it: ``fn(model, inputs, target) -> (B, 1, H, W)``."""

    name: str
    label: str
    fn: Callable[..., Tensor]
    kind: str  # "method" or "control"
    parameters: Dict[str, Any]


def _control(name: str, seed: int) -> EvaluatedMethod:
    return EvaluatedMethod(name, CONTROL_LABELS[name], make_control(name, seed), "control", {})


def _specs(methods: Methods) -> List[Any]:
    from captum_fullgrad.methods import AttributionMethod, available_methods

    if methods is None:
        return list(available_methods())
    if isinstance(methods, Mapping):
        return list(methods.items())
    if isinstance(methods, (str, AttributionMethod)):
        return [methods]
    return list(methods)


def _is_pair(spec: Any) -> bool:
    return (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and callable(spec[1])
    )


def _is_control(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().lower().replace("-", "_") in CONTROL_NAMES


def _registered(
    specs: Sequence[Any], method_params: Mapping[str, Mapping[str, Any]]
) -> List[EvaluatedMethod]:
    """The registry's methods among ``specs``, configured by ``method_params``, in order
    (:func:`~captum_fullgrad.methods.resolve_methods`, the one reader of method lists)."""
    from captum_fullgrad.methods import get_method, resolve_methods

    named = [s for s in specs if not _is_control(s) and not _is_pair(s)]
    if named:
        methods = resolve_methods(named, params=method_params, unselected_params="ignore")
    else:
        methods = []
        for name in method_params:
            get_method(name)  # unknown names fail as they would with methods selected
    return [
        EvaluatedMethod(method.name, method.label, method, "method", dict(method.parameters))
        for method in methods
    ]


def resolve(
    methods: Methods,
    method_params: Mapping[str, Mapping[str, Any]],
    controls: bool,
    seed: int,
) -> List[EvaluatedMethod]:
    """The methods to evaluate, in order, with the controls last (unless listed).

    Raises:
        ValueError: unknown or repeated methods, ``method_params`` for unregistered
            methods, nothing to evaluate.
        TypeError: a spec that is neither a name, a method nor a ``(name, callable)``.
    """
    specs = _specs(methods)
    registered = iter(_registered(specs, method_params))
    resolved = []
    for spec in specs:
        if _is_control(spec):
            resolved.append(_control(spec.strip().lower().replace("-", "_"), seed))
        elif _is_pair(spec):
            resolved.append(EvaluatedMethod(spec[0], spec[0], spec[1], "method", {}))
        else:
            resolved.append(next(registered))
    if controls:
        present = {m.name for m in resolved}
        resolved += [_control(name, seed) for name in CONTROL_NAMES if name not in present]
    names = [m.name for m in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each method may appear once; repeated: {', '.join(repeated)}")
    if not resolved:
        raise ValueError("no method to evaluate")
    return resolved
