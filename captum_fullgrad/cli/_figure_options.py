"""The figure options of ``compare``, ``decompose`` and ``demo``, and ``--param``.

``--overlay``, ``--alpha``, ``--dpi``, ``--cmap`` and ``--percentile`` reach
:func:`~captum_fullgrad.figures.comparison_grid`,
:func:`~captum_fullgrad.figures.decomposition_figure` and
:func:`~captum_fullgrad.figures.save_figure`. ``--param METHOD.KEY=VALUE`` (repeatable)
sets one parameter of one method; the method registry checks it
(:func:`captum_fullgrad.methods.resolve_methods`), so an unknown method or key, a bad value
or a method not selected is bad input (exit status 2), never ignored.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any, Dict, List, Optional, Sequence

from .._argtypes import positive_int
from ._common import CliError, bad_input

#: Default resolution of PNG figures (``captum_fullgrad.figures.DEFAULT_DPI``).
DEFAULT_DPI = 200


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _percentile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 100], got {text!r}") from None
    if not 0.0 < value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 100], got {text!r}")
    return value


def add_figure_options(parser: argparse.ArgumentParser, *, percentile: float = 99.0) -> None:
    """``--overlay``, ``--alpha``, ``--dpi``, ``--cmap`` and ``--percentile``."""
    group = parser.add_argument_group("figure options")
    group.add_argument(
        "--overlay",
        action="store_true",
        help="blend each map over its image instead of drawing the bare map",
    )
    group.add_argument(
        "--alpha",
        type=_alpha,
        default=0.5,
        help="weight of the map in an --overlay, in [0, 1] (default: 0.5)",
    )
    group.add_argument(
        "--dpi",
        type=positive_int,
        default=DEFAULT_DPI,
        help=f"resolution of PNG figures (default: {DEFAULT_DPI}; PDFs are vector)",
    )
    group.add_argument(
        "--cmap",
        default=None,
        help="Matplotlib colour map of the maps (default: inferno; RdBu_r for signed maps)",
    )
    group.add_argument(
        "--percentile",
        type=_percentile,
        default=percentile,
        help="each map is divided by this percentile of its values and clipped "
        f"(default: {percentile:g})",
    )


def colour_map(name: Optional[str]) -> Optional[str]:
    """``--cmap`` checked against Matplotlib's registered colour maps."""
    if name is None:
        return None
    from matplotlib import colormaps

    if name not in colormaps:
        close = [c for c in sorted(colormaps) if c.lower().startswith(name.lower()[:3])][:8]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise CliError(f"--cmap {name!r} is not a Matplotlib colour map{hint}")
    return name


def add_param_option(parser: argparse.ArgumentParser) -> None:
    """``--param METHOD.KEY=VALUE``, repeatable."""
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="set a parameter of one method, e.g. integrated_gradients.n_steps=20 or "
        "smoothgrad.nt_samples=10 (repeatable; values are read as Python literals, "
        "true/false/none, or else as text)",
    )


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_params(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``["integrated_gradients.n_steps=20"]`` -> ``{"integrated_gradients": {"n_steps": 20}}``."""
    params: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, equals, value = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not equals or not dot or not method.strip() or not name.strip():
            raise CliError(
                f"--param {item!r}: write METHOD.KEY=VALUE, e.g. integrated_gradients.n_steps=20"
            )
        # The registry's spelling of a method name (case-insensitive, "-" = "_"), so that
        # --param Integrated-Gradients.x and --param integrated_gradients.y meet in one entry.
        method = method.strip().lower().replace("-", "_")
        slot = params.setdefault(method, {})
        if name.strip() in slot:
            raise CliError(f"--param {item!r}: {method}.{name.strip()} is set twice")
        slot[name.strip()] = _value(value)
    return params


def methods(text: Optional[str], param_items: Sequence[str], default: Any = None) -> List[Any]:
    """The ``--methods`` list configured with every ``--param``, checked by the registry."""
    from ..methods import DEFAULT_TABLE5_METHODS, resolve_methods

    params = parse_params(param_items)
    with bad_input(ValueError, TypeError, prefix="--methods/--param: "):
        return resolve_methods(
            text, default=DEFAULT_TABLE5_METHODS if default is None else default, params=params
        )


#: Parameters that a figure's footnote states for each method (what changes its cost/look).
NOTED_PARAMETERS = {
    "integrated_gradients": ("n_steps",),
    "smoothgrad": ("nt_samples", "noise"),
    "smoothfullgrad": ("nt_samples", "noise"),
}


def parameters_note(configured: Sequence[Any], *, always: bool = False) -> Optional[str]:
    """One line naming the parameters set with ``--param`` (``always``: also the defaults of
    :data:`NOTED_PARAMETERS`), e.g. ``"Integrated gradients: n_steps=8."``; None if none."""
    parts = []
    for method in configured:
        shown = dict(method.params)
        if always:
            for key in NOTED_PARAMETERS.get(method.name, ()):
                shown.setdefault(key, method.parameters.get(key))
        if shown:
            values = ", ".join(f"{k}={v}" for k, v in shown.items())
            parts.append(f"{method.label}: {values}")
    return ("; ".join(parts) + ".") if parts else None
