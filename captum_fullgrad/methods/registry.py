"""The method registry: one declaration per saliency method, and the one reader of method
lists (:func:`resolve_methods`).

:func:`register_method` takes a map function with its label, reference, parameter checks
and :class:`MethodTraits`; :class:`AttributionMethod` is a registered method, possibly
configured, whose call enforces the package's output convention (a non-negative
``(B, 1, H, W)`` float32 map, see :mod:`captum_fullgrad.methods`). The built-in methods
are declared in :mod:`captum_fullgrad.methods.builtin`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    overload,
)

import torch
from torch import Tensor

from .._mode import check_mode

__all__ = [
    "DEFAULT_TABLE5_METHODS",
    "AttributionMethod",
    "MapFunction",
    "MethodTraits",
    "MethodsSpec",
    "ParameterCheck",
    "available_methods",
    "get_method",
    "is_int_or_none",
    "is_non_negative",
    "is_one_of",
    "is_optional",
    "is_positive_int",
    "register_method",
    "resolve_methods",
    "unregister_method",
]

#: A saliency method: ``fn(model, inputs, target) -> (B, 1, H, W)`` non-negative map.
MapFunction = Callable[[Any, Tensor, Any], Tensor]
#: A check of one parameter value: raises ``ValueError("must be ..., got ...")`` when bad
#: (the registry prefixes the method's and the parameter's names).
ParameterCheck = Callable[[Any], None]
#: What :func:`resolve_methods` accepts: a comma-separated string, one method, or several.
MethodsSpec = Union[str, "AttributionMethod", Iterable[Union[str, "AttributionMethod"]]]

#: The columns of the seed paper's Table 5, in its order.
DEFAULT_TABLE5_METHODS: Tuple[str, ...] = (
    "guided_backprop",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "fullgrad",
    "fullgrad_bias",
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodTraits:
    """How a method behaves and what it costs, declared once where it is registered.

    Benchmarks, the demo and the evaluation suite read these instead of testing method
    names: a method whose :attr:`AttributionMethod.passes` exceeds one is "slow" (the
    benchmark caps its batch size), a stochastic one gets its sample count from
    ``samples_param``, smoke runs use ``fast_params``. The defaults describe a
    deterministic method of one forward and one backward pass per image (a gradient), so a
    user-registered method works without declaring anything.

    Attributes:
        stochastic: the map depends on random draws (two unseeded calls can differ).
        passes: forward-and-backward passes of the model per image (not counting the
            forward pass that resolves ``target=None``): a number, the name of the
            parameter that gives it (``"n_steps"``), or a function of the effective
            parameters (a mapping) returning it.
        cost_params: the parameters the method's time grows with (default: ``passes``
            when it names a parameter).
        fast_params: cheaper parameter values for smoke runs and tests (e.g.
            ``{"n_steps": 8}``); the evaluation suite's ``fast`` settings use them.
        samples_param: the parameter holding the number of random draws (stochastic
            methods), e.g. ``"nt_samples"``; a benchmark sets every stochastic method's
            sample count through it.
    """

    stochastic: bool = False
    passes: Union[int, str, Callable[[Mapping[str, Any]], int]] = 1
    cost_params: Tuple[str, ...] = ()
    fast_params: Mapping[str, Any] = field(default_factory=dict)
    samples_param: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.passes, str) and not self.cost_params:
            object.__setattr__(self, "cost_params", (self.passes,))
        object.__setattr__(self, "cost_params", tuple(self.cost_params))
        object.__setattr__(self, "fast_params", dict(self.fast_params))

    def __hash__(self) -> int:  # fast_params is a dict
        return hash((self.stochastic, self.passes, self.cost_params, self.samples_param))

    def passes_for(self, parameters: Mapping[str, Any]) -> int:
        """Forward-and-backward passes per image with these effective parameters."""
        if isinstance(self.passes, str):
            return int(parameters[self.passes])
        if callable(self.passes):
            return int(self.passes(parameters))
        return int(self.passes)


@dataclass(frozen=True)
class AttributionMethod:
    """A registered saliency method, possibly configured with non-default parameters.

    Call it as ``method(model, inputs, target=None)``. The wrapper enforces the output
    convention: ``target=None`` explains the predicted class (argmax of the model's
    output), gradients are enabled even under :func:`torch.no_grad`, and the result is
    checked to be a ``(B, 1, H, W)`` non-negative finite map, returned as float32,
    detached, on the input's device.

    Attributes:
        name: registry key, e.g. ``"integrated_gradients"``.
        label: short human-readable name for figure titles, e.g. ``"Integrated gradients"``.
        fn: the underlying function ``fn(model, inputs, target, **parameters)``.
        description: one line on what the map is.
        reference: the paper the method and its defaults follow.
        defaults: every parameter of ``fn`` and its default value.
        params: the parameters set for this variant (overriding ``defaults``).
        traits: cost and behaviour (:class:`MethodTraits`); also read through
            :attr:`stochastic`, :attr:`passes` and :attr:`cost_params`.
        validator: checks parameter overrides (``validator(params, effective)``, raising
            ``ValueError``); built by :func:`register_method` from its ``checks``.
    """

    name: str
    label: str
    fn: Callable[..., Tensor]
    description: str = ""
    reference: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    traits: MethodTraits = field(default_factory=MethodTraits)
    validator: Optional[Callable[[Mapping[str, Any], Mapping[str, Any]], None]] = field(
        default=None, compare=False, repr=False
    )

    @property
    def parameters(self) -> Dict[str, Any]:
        """The effective parameters: ``defaults`` updated with ``params``."""
        return {**self.defaults, **self.params}

    @property
    def stochastic(self) -> bool:
        """Whether the map depends on random draws (:attr:`MethodTraits.stochastic`)."""
        return self.traits.stochastic

    @property
    def passes(self) -> int:
        """Forward-and-backward passes per image with this variant's parameters."""
        return self.traits.passes_for(self.parameters)

    @property
    def cost_params(self) -> Tuple[str, ...]:
        """The parameters this method's time grows with (:attr:`MethodTraits.cost_params`)."""
        return self.traits.cost_params

    def configure(self, **params: Any) -> "AttributionMethod":
        """A copy of this method with some parameters changed (checked like :func:`get_method`)."""
        return _configured(self, {**self.params, **params}, params)

    def fast(self) -> "AttributionMethod":
        """This method with its cheap smoke-run settings (:attr:`MethodTraits.fast_params`)
        applied on top of its parameters; itself when it declares none."""
        fast = self.traits.fast_params
        return self.configure(**fast) if fast else self

    def __call__(self, model: Any, inputs: Tensor, target: Any = None) -> Tensor:
        """The ``(B, 1, H, W)`` map of ``inputs`` for ``target`` (None: the predicted class)."""
        x = _check_inputs(inputs, self.name)
        # Every method, one policy: a training BatchNorm would have its running statistics
        # updated by the forward passes below, dropout would make the map random.
        check_mode(model, method=self.name)
        with torch.enable_grad():
            target = _resolve_target(model, x, target)
            result = self.fn(model, x, target, **self.params)
        return _check_output(result, x, self.name)

    def __hash__(self) -> int:  # the parameter mappings are not hashable
        return hash((self.name, self.fn))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"AttributionMethod({self.name!r}{', ' + shown if shown else ''})"


# --------------------------------------------------------------------------------------
# Checks of parameter values (ParameterCheck): one per parameter, declared at registration
# --------------------------------------------------------------------------------------


def is_positive_int(value: Any) -> None:
    """An integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")


def is_non_negative(value: Any) -> None:
    """A finite number >= 0 (not a bool)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(f"must be a finite number >= 0, got {value!r}")


def is_int_or_none(value: Any) -> None:
    """An integer or None (a seed)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"must be an integer or None, got {value!r}")


def is_one_of(*choices: Any) -> ParameterCheck:
    """A check that the value is one of ``choices``."""
    return _OneOf(choices)


def is_optional(check: ParameterCheck) -> ParameterCheck:
    """``check``, with None also accepted."""
    return _Optional(check)


# Checks and validators are small classes rather than closures, so that a configured
# method pickles (to worker processes, for instance) like its function does.
@dataclass(frozen=True)
class _OneOf:
    choices: Tuple[Any, ...]

    def __call__(self, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"must be one of {list(self.choices)}, got {value!r}")


@dataclass(frozen=True)
class _Optional:
    check: ParameterCheck

    def __call__(self, value: Any) -> None:
        if value is not None:
            self.check(value)


@dataclass(frozen=True)
class _Validator:
    """Checks a variant's overrides: each overridden parameter's check, then
    ``validate(**effective parameters)`` for rules that involve several parameters."""

    name: str
    checks: Mapping[str, ParameterCheck]
    validate: Optional[Callable[..., None]]

    def __call__(self, overrides: Mapping[str, Any], effective: Mapping[str, Any]) -> None:
        for parameter, value in overrides.items():
            check = self.checks.get(parameter)
            if check is None:
                continue
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {parameter} {exc}") from None
        if self.validate is not None:
            self.validate(**effective)


def _validator(
    name: str,
    checks: Mapping[str, ParameterCheck],
    validate: Optional[Callable[..., None]],
) -> Optional[_Validator]:
    if not checks and validate is None:
        return None
    return _Validator(name, dict(checks), validate)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

_REGISTRY: Dict[str, AttributionMethod] = {}


def _normalise_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("-", "_")


def _keyword_defaults(fn: Callable[..., Any]) -> Dict[str, Any]:
    """Parameters of ``fn`` beyond ``(model, inputs, target)`` that have defaults."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    defaults = {}
    for index, parameter in enumerate(signature.parameters.values()):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if index < 3 and parameter.kind != parameter.KEYWORD_ONLY:
            continue
        if parameter.default is not parameter.empty:
            defaults[parameter.name] = parameter.default
    return defaults


@overload
def register_method(
    name: str,
    fn: Callable[..., Tensor],
    label: Optional[str] = None,
    overwrite: bool = False,
    *,
    description: str = "",
    reference: str = "",
    checks: Optional[Mapping[str, ParameterCheck]] = None,
    validate: Optional[Callable[..., None]] = None,
    traits: Optional[MethodTraits] = None,
    stochastic: Optional[bool] = None,
    passes: Union[None, int, str, Callable[[Mapping[str, Any]], int]] = None,
    cost_params: Optional[Sequence[str]] = None,
    fast_params: Optional[Mapping[str, Any]] = None,
    samples_param: Optional[str] = None,
) -> AttributionMethod: ...


@overload
def register_method(
    name: str,
    fn: None = None,
    label: Optional[str] = None,
    overwrite: bool = False,
    *,
    description: str = "",
    reference: str = "",
    checks: Optional[Mapping[str, ParameterCheck]] = None,
    validate: Optional[Callable[..., None]] = None,
    traits: Optional[MethodTraits] = None,
    stochastic: Optional[bool] = None,
    passes: Union[None, int, str, Callable[[Mapping[str, Any]], int]] = None,
    cost_params: Optional[Sequence[str]] = None,
    fast_params: Optional[Mapping[str, Any]] = None,
    samples_param: Optional[str] = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]: ...


def register_method(
    name: str,
    fn: Optional[Callable[..., Tensor]] = None,
    label: Optional[str] = None,
    overwrite: bool = False,
    *,
    description: str = "",
    reference: str = "",
    checks: Optional[Mapping[str, ParameterCheck]] = None,
    validate: Optional[Callable[..., None]] = None,
    traits: Optional[MethodTraits] = None,
    stochastic: Optional[bool] = None,
    passes: Union[None, int, str, Callable[[Mapping[str, Any]], int]] = None,
    cost_params: Optional[Sequence[str]] = None,
    fast_params: Optional[Mapping[str, Any]] = None,
    samples_param: Optional[str] = None,
) -> Any:
    """Add a saliency method to the registry: one declaration of everything about it.

    Called with ``fn`` it registers ``fn`` and returns the :class:`AttributionMethod`;
    without ``fn`` it is a decorator that registers the function it decorates and returns
    that function unchanged::

        @register_method("edges", label="Edges", checks={"power": is_non_negative})
        def edges(model, inputs, target, *, power=1.0): ...

    Args:
        name: registry key: lower-case letters, digits and underscores, starting with a
            letter (``"-"`` is read as ``"_"``; case is ignored).
        fn: ``fn(model, inputs, target, **parameters) -> Tensor`` returning a non-negative
            ``(B, 1, H, W)`` map. ``target`` is already resolved (an int, a ``(B,)``
            tensor or whatever the caller passed; ``None`` becomes the predicted class).
            Keyword parameters with defaults become the method's parameters, settable
            with ``get_method(name, param=value)``.
        label: title used in figures; default: ``name``.
        overwrite: replace an existing method of that name (built-ins included).
        description: one line on what the map shows.
        reference: where the method comes from.
        checks: ``{parameter: check}``; each check takes a value and raises
            ``ValueError("must be ..., got ...")`` when it is bad (see :func:`is_one_of`,
            :func:`is_positive_int`, :func:`is_non_negative`, :func:`is_optional`). They
            run when a variant sets the parameter, so a bad value fails at
            ``get_method``, not in the middle of a run.
        validate: optional ``validate(**parameters)`` for rules involving several
            parameters, run with the effective parameters of every configured variant.
        traits: cost and behaviour as one :class:`MethodTraits`; or give its fields as the
            keywords ``stochastic``, ``passes``, ``cost_params``, ``fast_params`` and
            ``samples_param`` (they override ``traits``' fields). Default: deterministic,
            one forward and one backward pass per image.

    Returns:
        The registered :class:`AttributionMethod` (with default parameters), or the
        decorator when ``fn`` is omitted.

    Raises:
        ValueError: bad name, the name is taken and ``overwrite`` is False, or the checks
            or traits name a parameter that ``fn`` does not have (or ``fast_params``
            fail the checks).
        TypeError: ``fn`` is not callable.
    """
    chosen: Dict[str, Any] = {
        key: value
        for key, value in (
            ("stochastic", stochastic),
            ("passes", passes),
            ("cost_params", cost_params),
            ("fast_params", fast_params),
            ("samples_param", samples_param),
        )
        if value is not None
    }
    if "passes" in chosen and "cost_params" not in chosen:
        chosen["cost_params"] = ()  # derived again from the new passes where it names one
    base = replace(traits if traits is not None else MethodTraits(), **chosen)

    def declare(function: Callable[..., Tensor]) -> AttributionMethod:
        return _register(
            name, function, label, overwrite, description, reference, checks or {}, validate, base
        )

    if fn is None:

        def decorator(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
            declare(function)
            return function

        return decorator
    return declare(fn)


def _register(
    name: str,
    fn: Callable[..., Tensor],
    label: Optional[str],
    overwrite: bool,
    description: str,
    reference: str,
    checks: Mapping[str, ParameterCheck],
    validate: Optional[Callable[..., None]],
    traits: MethodTraits,
) -> AttributionMethod:
    key = _normalise_name(name)
    if not _NAME_RE.match(key):
        raise ValueError(
            f"invalid method name {name!r}: use lower-case letters, digits and underscores, "
            "starting with a letter"
        )
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if key in _REGISTRY and not overwrite:
        raise ValueError(
            f"a method named {key!r} is already registered; pass overwrite=True to replace it"
        )
    defaults = _keyword_defaults(fn)
    _check_declared_names(key, defaults, checks, traits)
    method = AttributionMethod(
        name=key,
        label=label if label is not None else key,
        fn=fn,
        description=description,
        reference=reference,
        defaults=defaults,
        traits=traits,
        validator=_validator(key, checks, validate),
    )
    if traits.fast_params:
        method.fast()  # the cheap settings must pass the method's own checks
    _REGISTRY[key] = method
    return method


def _check_declared_names(
    key: str, defaults: Mapping[str, Any], checks: Mapping[str, Any], traits: MethodTraits
) -> None:
    """Every parameter named by the declaration is a parameter of the function."""
    named = [("checks", p) for p in checks]
    named += [("cost_params", p) for p in traits.cost_params]
    named += [("fast_params", p) for p in traits.fast_params]
    if isinstance(traits.passes, str):
        named.append(("passes", traits.passes))
    if traits.samples_param is not None:
        named.append(("samples_param", traits.samples_param))
    missing = [f"{where} names {p!r}" for where, p in named if p not in defaults]
    if missing:
        accepted = ", ".join(defaults) or "none"
        raise ValueError(
            f"method {key!r}: {'; '.join(missing)}, which is not a keyword parameter with a "
            f"default of its function (its parameters: {accepted})"
        )
    if not isinstance(traits.passes, (int, str)) and not callable(traits.passes):
        raise ValueError(
            f"method {key!r}: passes must be a number, a parameter name or a function, "
            f"got {traits.passes!r}"
        )


def unregister_method(name: str) -> None:
    """Remove a method from the registry (raises ValueError if unknown)."""
    key = _normalise_name(name)
    _lookup(key)
    del _REGISTRY[key]


def available_methods() -> List[str]:
    """Registered method names, built-ins first, in registration order."""
    return list(_REGISTRY)


def _lookup(key: str) -> AttributionMethod:
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {key!r}; registered methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def get_method(name: Union[str, AttributionMethod], **params: Any) -> AttributionMethod:
    """The registered method ``name``, configured with ``params`` (others keep their defaults).

    Args:
        name: a name from :func:`available_methods` (case-insensitive, ``-`` = ``_``), or
            an :class:`AttributionMethod`, returned as is (or reconfigured with ``params``).
        **params: parameter overrides, e.g. ``get_method("integrated_gradients", n_steps=20)``.

    Raises:
        ValueError: unknown method name (the message lists the registered names), unknown
            parameter name (the message lists the method's parameters), or a bad value.
    """
    if isinstance(name, AttributionMethod):
        return name.configure(**params) if params else name
    method = _lookup(_normalise_name(name))
    return _configured(method, params, params) if params else method


def _configured(
    method: AttributionMethod, params: Mapping[str, Any], changed: Mapping[str, Any]
) -> AttributionMethod:
    """``method`` with ``params`` as its overrides; ``changed`` (the new ones) are checked."""
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        accepted = ", ".join(method.defaults) or "none"
        raise ValueError(
            f"method {method.name!r} has no parameter {', '.join(repr(u) for u in unknown)}; "
            f"its parameters are: {accepted}"
        )
    if method.validator is not None:
        method.validator(changed, {**method.defaults, **params})
    # The registered method with these parameters: every other field is the registry's.
    return replace(method, params=dict(params))


def resolve_methods(
    spec: Optional[MethodsSpec],
    default: Optional[Sequence[Union[str, AttributionMethod]]] = DEFAULT_TABLE5_METHODS,
    *,
    params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    unselected_params: str = "error",
) -> List[AttributionMethod]:
    """The configured methods that a ``--methods`` value (or a list of methods) names.

    The one reader of method lists: the command line, the figures and the evaluation suite
    all call it, so the same names, normalisation and errors hold everywhere.

    Args:
        spec: a comma-separated string (``"fullgrad, Integrated-Gradients"``: names are stripped,
            case-insensitive, ``-`` = ``_``), one name or :class:`AttributionMethod`, a
            sequence of them, or None for ``default``.
        default: the methods when ``spec`` is None; None means every registered method.
        params: ``{method name: {parameter: value}}`` overrides applied to the selected
            methods (checked like :func:`get_method`).
        unselected_params: what to do when ``params`` names a registered method that is not
            selected: ``"error"`` (a command line's ``--param`` for a method left out is a
            mistake) or ``"ignore"`` (blanket settings such as the suite's ``fast``).

    Returns:
        The methods in the order given, each configured.

    Raises:
        ValueError: no method named, an unknown method (the message lists the registered
            ones), a method named twice, or bad ``params`` (unknown method or parameter,
            bad value, two keys naming the same method, or a method not selected when
            ``unselected_params="error"``).
        TypeError: an item that is neither a name nor an :class:`AttributionMethod`.
    """
    if unselected_params not in ("error", "ignore"):
        raise ValueError(
            f"unselected_params must be 'error' or 'ignore', got {unselected_params!r}"
        )
    if spec is None:
        items: List[Any] = list(available_methods() if default is None else default)
    elif isinstance(spec, str):
        items = [part for part in spec.split(",") if part.strip()]
    elif isinstance(spec, AttributionMethod):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise ValueError("give at least one method name, e.g. 'fullgrad,gradcam'")
    methods: List[AttributionMethod] = []
    for item in items:
        if not isinstance(item, (str, AttributionMethod)):
            raise TypeError(
                f"a method must be a name or an AttributionMethod, got {type(item).__name__}"
            )
        methods.append(get_method(item))
    names = [m.name for m in methods]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each method may appear once; repeated: {', '.join(repeated)}")
    overrides: Dict[str, Dict[str, Any]] = {}
    given_as: Dict[str, str] = {}  # normalised name -> the key the caller wrote
    for key, values in (params or {}).items():
        name = _normalise_name(key)
        if name in overrides:
            # Keeping one of the two dicts (or merging them) would hide a conflicting value.
            raise ValueError(
                f"params names method {name!r} twice, as {given_as[name]!r} and {key!r}; "
                "give its parameters under one key"
            )
        overrides[name], given_as[name] = dict(values), key
    for key in overrides:
        if key not in names:
            _lookup(key)  # unknown everywhere: the message lists the registered names
            if unselected_params == "error":
                raise ValueError(
                    f"parameters given for method {key!r}, which is not among the selected "
                    f"methods ({', '.join(names)})"
                )
    return [m.configure(**overrides[m.name]) if m.name in overrides else m for m in methods]


# --------------------------------------------------------------------------------------
# Conventions shared by every method
# --------------------------------------------------------------------------------------


def _check_inputs(inputs: Any, name: str) -> Tensor:
    if isinstance(inputs, tuple) and len(inputs) == 1:
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"method {name!r} expects an image tensor (B, C, H, W), got {type(inputs).__name__}"
        )
    if inputs.dim() != 4 or inputs.shape[0] == 0:
        raise ValueError(
            f"method {name!r} expects images of shape (B, C, H, W), got {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise TypeError(f"method {name!r} needs floating-point images, got dtype {inputs.dtype}")
    return inputs.detach()


def _resolve_target(model: Any, inputs: Tensor, target: Any) -> Any:
    """``None`` becomes the predicted class of each example (for models returning ``(B, K)``)."""
    if target is not None:
        return target
    with torch.no_grad():
        output = model(inputs)
    if isinstance(output, Tensor) and output.dim() == 2 and output.shape[1] > 1:
        return output.argmax(dim=1)
    return None


def _check_output(result: Any, inputs: Tensor, name: str) -> Tensor:
    if isinstance(result, tuple) and len(result) == 1:
        result = result[0]
    if not isinstance(result, Tensor):
        raise TypeError(f"method {name!r} returned {type(result).__name__}, expected a tensor")
    expected = (inputs.shape[0], 1, *inputs.shape[2:])
    if tuple(result.shape) != expected:
        raise ValueError(
            f"method {name!r} returned a map of shape {tuple(result.shape)}, expected {expected}"
        )
    result = result.detach().to(device=inputs.device, dtype=torch.float32)
    if not torch.isfinite(result).all():
        raise ValueError(f"method {name!r} returned NaN or infinite values")
    if (result < 0).any():
        raise ValueError(
            f"method {name!r} returned negative values; a saliency map must be non-negative "
            "(take .abs() or clamp(min=0))"
        )
    return result
