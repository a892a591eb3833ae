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


def _one(spec: Any, method_params: Mapping[str, Mapping[str, Any]], seed: int) -> EvaluatedMethod:
    from captum_fullgrad.methods import AttributionMethod, get_method

    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key in CONTROL_NAMES:
            return _control(key, seed)
        method = get_method(key, **dict(method_params.get(key, {})))
    elif isinstance(spec, AttributionMethod):
        method = spec
        if spec.name in method_params:
            method = spec.configure(**dict(method_params[spec.name]))
    elif (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and callable(spec[1])
    ):
        return EvaluatedMethod(spec[0], spec[0], spec[1], "method", {})
    else:
        raise TypeError(
            "methods must be names, AttributionMethod objects or (name, callable) pairs, "
            f"got {spec!r}"
        )
    return EvaluatedMethod(method.name, method.label, method, "method", dict(method.parameters))


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
    from captum_fullgrad.methods import available_methods

    resolved = [_one(spec, method_params, seed) for spec in _specs(methods)]
    unknown = sorted(set(method_params) - set(available_methods()))
    if unknown:
        raise ValueError(
            f"method_params names unknown methods: {', '.join(unknown)}; "
            f"registered methods: {', '.join(available_methods())}"
        )
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
