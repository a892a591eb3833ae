"""``captum-fullgrad evaluate``: the evaluation suite on generated scenes with object masks.

``add_arguments(parser)`` declares the options and ``run(args) -> int`` runs the suite
(:func:`captum_fullgrad.evaluation.evaluate`) and writes ``DIR/results.json``,
``DIR/results.md`` and the plots. The metric options come from the metric registry: one
``--KEY-n`` per registered metric that runs on a prefix of the images, and ``--metrics``.
Bad input raises :class:`~captum_fullgrad.cli._common.CliError` (one line, exit status 2
through the CLI's common path). ``python -m captum_fullgrad.evaluation.command [options]``
still runs this subcommand on its own (:mod:`captum_fullgrad.evaluation.command`).

Only models whose test images come with object masks can be evaluated: the bundled
``shapes`` network, on held-out synthetic scenes (:func:`captum_fullgrad.datasets.
synthetic_shapes`, seed 10000 by default; the network was trained on seed 0). Any other
model name is refused with exit status 2.

Cost: the sanity check recomputes every map once per randomised layer (11 times for
``shapes``) and max-sensitivity once per perturbation, so they run on the first
``--sanity-n`` / ``--sensitivity-n`` images only; ROAD (an iterative imputation per
removal level) on the first ``--road-n``, the infidelity on the first ``--infidelity-n``.
Every value in the outputs states the number of images it was computed on.
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._argtypes import add_runtime_options, method_parameter
from .._argtypes import non_negative_int as _non_negative_int
from .._argtypes import positive_int as _positive_int
from ._common import EXIT_OK, PROG, CliError, Command
from ._inputs import device as resolve_device
from ._inputs import load_model, progress
from ._outputs import output_directory

#: Held-out scenes: the bundled ``shapes`` network was trained on seed 0.
DEFAULT_DATA_SEED = 10_000
#: Images evaluated without --n (and without --maps).
DEFAULT_N = 500
#: Models with generated object masks.
MASKED_MODELS = ("shapes",)

HELP = (
    "score every saliency method (and three controls) with localisation, perturbation, ROAD, "
    "sanity and Captum metrics"
)
DESCRIPTION = (
    "Evaluate saliency methods on generated scenes with known object masks and write "
    "DIR/results.json (method -> metric -> mean with 95 % bootstrap CI and n), "
    "DIR/results.md (rankings, best in bold, where FullGrad wins and loses) and PNG plots "
    "(pixel perturbation, ROAD and sanity-check curves). Costly metrics run on the first "
    "--road-n, --infidelity-n, --sensitivity-n and --sanity-n images (one --KEY-n option per "
    "such metric of the registry). With --maps STORE the maps come from a store written by "
    "'captum-fullgrad attribute' (computed once, possibly on many GPUs) instead; the metrics "
    "that call the methods again (listed under --maps) still do, and say so. See "
    "docs/evaluation.md and docs/scale.md."
)
EPILOG = (
    "example: captum-fullgrad evaluate --n 100 --out eval-out "
    "--methods fullgrad,gradcam,smoothgrad --fast"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``captum-fullgrad evaluate`` on ``parser``.

    torch is not imported: the per-metric options come from the metric registry, whose
    declarations read without it (so ``evaluate --help`` is quick)."""
    parser.add_argument(
        "--model",
        default="shapes",
        help="model to explain; only models with generated object masks can be evaluated: "
        f"{', '.join(MASKED_MODELS)} (default: shapes)",
    )
    parser.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT (the bundled weights), a path to a state dict file, or 'random' "
        "(default: DEFAULT)",
    )
    parser.add_argument(
        "--n",
        type=_positive_int,
        default=None,
        help=f"images to generate and evaluate (default: {DEFAULT_N}, or every image of "
        "--maps STORE)",
    )
    parser.add_argument(
        "--maps",
        default=None,
        metavar="STORE",
        help="read the methods' maps from STORE, an attribution store written by "
        "'captum-fullgrad attribute --target label' for the same model, weights, scenes "
        "(--data-seed) and method parameters, instead of computing them; a mismatch is "
        "refused. Metrics that call the methods again still do: "
        + (", ".join(_recomputing_metrics()) or "none")
        + ". The controls are computed. See docs/scale.md",
    )
    parser.add_argument(
        "--out", default="evaluation-out", help="output directory (default: evaluation-out)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (default: every registered method); the controls "
        "uniform_random, blurred_random and sobel_edges are always added unless --no-controls",
    )
    parser.add_argument(
        "--no-controls", action="store_true", help="do not add the three control maps"
    )
    parser.add_argument(
        "--param",
        action="append",
        type=method_parameter,
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="set a method parameter, e.g. integrated_gradients.n_steps=20 (repeatable; "
        "overrides --fast)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the metrics' randomness and the controls (default: 0); the maps of "
        "--maps STORE drew their noise from attribute's own --seed, recorded in results.json",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=DEFAULT_DATA_SEED,
        help=f"seed of the generated scenes (default: {DEFAULT_DATA_SEED}, held out from training)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=50,
        help="images per method call and forward pass (default: 50)",
    )
    _add_metric_options(parser)
    parser.add_argument(
        "--fast",
        action="store_true",
        help="cheap settings for tests and smoke runs: integrated gradients with 8 steps, "
        "SmoothGrad and SmoothFullGrad with 4 samples, 3 ROAD levels, few perturbations and "
        "resamples",
    )
    add_runtime_options(parser)


def _add_metric_options(parser: argparse.ArgumentParser) -> None:
    """``--metrics`` and one ``--<key>-n`` per registered metric that runs on a prefix of
    the images, from the metric registry (the defaults are the published run's, which
    the metrics declare: ``EvaluationSettings()`` reads them from there too)."""
    from ..evaluation.metric import registered_metrics

    metrics = registered_metrics()
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics to run (default: all): " + ", ".join(m.key for m in metrics),
    )
    for metric in metrics:
        if not metric.images.subset:
            continue
        cost = " (recomputes every map)" if metric.recomputes_maps else ""
        parser.add_argument(
            metric.option,
            dest=f"{metric.key}_n",
            type=_non_negative_int,
            default=None,
            help=f"images (the first ones) for {metric.label}{cost}; 0 skips it "
            f"(default: {metric.images.default}, or a few with --fast; at most --n)",
        )


def _recomputing_metrics() -> List[str]:
    """Keys of the registered metrics that call the method again (not only read maps)."""
    from ..evaluation.metric import registered_metrics

    return [m.key for m in registered_metrics() if m.recomputes_maps]


def _image_counts(args: argparse.Namespace) -> Dict[str, int]:
    """Metric key -> images given by ``--<key>-n`` options."""
    from ..evaluation.metric import registered_metrics

    counts = {}
    for metric in registered_metrics():
        value = getattr(args, f"{metric.key}_n", None)
        if metric.images.subset and value is not None:
            counts[metric.key] = value
    return counts


def _check_model(name: str) -> str:
    key = name.strip().lower()
    if key in MASKED_MODELS:
        return key
    from ..models import list_models

    known = key in {m.lower() for m in list_models()}
    if known:
        raise CliError(
            f"--model {name!r}: evaluate needs images with ground-truth object masks, which are "
            f"only generated for: {', '.join(MASKED_MODELS)}"
        )
    raise CliError(
        f"--model {name!r}: unknown model; evaluate supports: {', '.join(MASKED_MODELS)}"
    )


def _methods(text: Optional[str]) -> Optional[List[str]]:
    """The ``--methods`` names (controls included), checked by the method registry's
    :func:`~captum_fullgrad.methods.resolve_methods`."""
    from ..evaluation.controls import CONTROL_NAMES
    from ..methods import resolve_methods

    if text is None:
        return None
    names = [n.strip().lower().replace("-", "_") for n in text.split(",") if n.strip()]
    if not names:
        raise CliError("--methods: give at least one method name, e.g. --methods fullgrad,gradcam")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CliError(f"--methods: each method may appear once; repeated: {', '.join(repeated)}")
    registered = [n for n in names if n not in CONTROL_NAMES]
    if registered:
        try:
            resolve_methods(registered)
        except (ValueError, TypeError) as exc:
            raise CliError(f"--methods: {exc}; controls: {', '.join(CONTROL_NAMES)}") from None
    return names


def _metrics(text: Optional[str]) -> Optional[List[str]]:
    from ..evaluation.run import select_metrics

    if text is None:
        return None
    keys = [k.strip().lower().replace("-", "_") for k in text.split(",") if k.strip()]
    try:
        select_metrics(keys)
    except ValueError as exc:
        raise CliError(f"--metrics: {exc}") from None
    return keys


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _method_params(items: List[str], base: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    from ..methods import resolve_methods

    params = {name: dict(values) for name, values in base.items()}
    for item in items:
        target, _, value = item.partition("=")
        method, _, name = target.partition(".")
        method = method.strip().lower().replace("-", "_")
        params.setdefault(method, {})[name.strip()] = _parse_value(value.strip())
    try:
        if params:
            resolve_methods(list(params), params=params)
    except (ValueError, TypeError) as exc:
        raise CliError(f"--param: {exc}") from None
    return params


def _command_line(args: argparse.Namespace) -> str:
    parts = [PROG, "evaluate", "--model", args.model]
    if args.weights != "DEFAULT":
        parts += ["--weights", args.weights]
    if getattr(args, "maps", None):
        parts += ["--maps", args.maps]
    if args.n is not None:  # run() sets it before recording the command
        parts += ["--n", str(args.n)]
    parts += [
        "--out",
        args.out,
        "--seed",
        str(args.seed),
        "--data-seed",
        str(args.data_seed),
    ]
    parts += ["--batch-size", str(args.batch_size)]
    from ..evaluation.metric import get_metric

    for key, value in _image_counts(args).items():
        parts += [get_metric(key).option, str(value)]
    if getattr(args, "metrics", None):
        parts += ["--metrics", args.metrics]
    if args.methods:
        parts += ["--methods", args.methods]
    if args.no_controls:
        parts.append("--no-controls")
    for item in args.param:
        parts += ["--param", item]
    if args.fast:
        parts.append("--fast")
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.device != "auto":
        parts += ["--device", args.device]
    return " ".join(shlex.quote(p) for p in parts)


def _git_commit() -> Optional[str]:
    """The commit of the package's checkout (``+dirty`` if package files differ), or None."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "captum_fullgrad"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _settings(args: argparse.Namespace, methods: Optional[List[str]]) -> Any:
    """The suite's settings: ``--fast`` or the published ones, ``--param`` overrides (only
    for the methods evaluated) and the metrics' ``--KEY-n`` image counts."""
    from ..evaluation.suite import EvaluationSettings

    settings = EvaluationSettings.fast() if args.fast else EvaluationSettings()
    params = _method_params(
        list(args.param), {k: dict(v) for k, v in settings.method_params.items()}
    )
    if methods is not None:
        named = {item.partition(".")[0].strip().lower().replace("-", "_") for item in args.param}
        unused = sorted(named - set(methods))
        if unused:
            raise CliError(f"--param names method(s) not in --methods: {', '.join(unused)}")
        params = {k: v for k, v in params.items() if k in methods}
    return replace(settings, method_params=params).with_images(_image_counts(args))


def _run_meta(args: argparse.Namespace, loaded: Any) -> Dict[str, Any]:
    """What ``results.json`` records about the command: data, weights, the command line,
    the OpenMP environment and the checkout's commit."""
    return {
        "data": f"captum_fullgrad.datasets.synthetic_shapes(n={args.n}, seed={args.data_seed})",
        "data_seed": args.data_seed,
        "weights": loaded.weights if loaded.weights is None else str(loaded.weights),
        "fast": bool(args.fast),
        "command": _command_line(args),
        "environment": {
            k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ
        },
        "git_commit": _git_commit(),
    }


def _stored_maps(
    args: argparse.Namespace,
    loaded: Any,
    methods: Optional[List[str]],
    settings: Any,
    image_size: List[int],
) -> Tuple[Any, List[str]]:
    """The maps of ``--maps STORE`` (:func:`~captum_fullgrad.evaluation.store_maps.
    read_store_maps`) for the registered methods evaluated, and those methods' names
    (``--methods``, or every method of the store); refuses a store of another run."""
    from ..dataset_attribution import weights_identity
    from ..evaluation._methods import resolve
    from ..evaluation.controls import CONTROL_NAMES
    from ..evaluation.store_maps import read_store_maps
    from ..store import StoreMismatchError, open_attributions

    try:
        store = open_attributions(Path(args.maps).expanduser())
    except (OSError, ValueError) as exc:
        raise CliError(f"--maps: {exc}") from None
    names = methods if methods is not None else store.methods
    registered = [m for m in names if m not in CONTROL_NAMES]
    missing = [m for m in registered if m not in store.methods]
    if missing:
        raise CliError(
            f"--maps: store {args.maps!r} holds no maps of {', '.join(missing)} (it holds "
            f"{', '.join(store.methods)}); leave them out of --methods, or write them with "
            "'captum-fullgrad attribute'"
        )
    try:
        evaluated = resolve(registered, settings.method_params, False, args.seed)
    except (ValueError, TypeError) as exc:
        raise CliError(f"--maps: {exc}") from None
    stochastic = [m.name for m in evaluated if getattr(m.fn, "stochastic", False)]
    try:
        stored = read_store_maps(
            Path(args.maps).expanduser(),
            n=args.n,
            model=loaded.name,
            weights=weights_identity(args.weights),
            data_seed=args.data_seed,
            methods={m.name: m.parameters for m in evaluated},
            image_size=image_size,
            stochastic=stochastic,
        )
    except StoreMismatchError as exc:
        raise CliError(f"--maps: {exc}") from None
    if not stored.indices:
        raise CliError(f"--maps: store {args.maps!r} holds none of the first {args.n} images")
    return stored, list(names)


def run(args: argparse.Namespace) -> int:
    """Run ``captum-fullgrad evaluate`` with parsed ``args``; return the exit status.

    Bad input (a model without generated masks, unknown methods, metrics or parameters,
    unusable devices, weights or output directories, a ``--maps`` store of another run)
    raises :class:`CliError`, which the CLI's common path reports as one line with exit
    status 2.
    """
    from ..datasets import synthetic_shapes
    from ..evaluation.suite import evaluate, write_report

    started = time.perf_counter()
    name = _check_model(args.model)
    out = output_directory(args.out)
    methods = _methods(args.methods)
    settings = _settings(args, methods)
    metrics = _metrics(getattr(args, "metrics", None))
    device = resolve_device(args.device)
    loaded = load_model(name, args.weights, device)
    if args.n is None:
        args.n = _store_size(args.maps) if args.maps else DEFAULT_N
    images, labels, masks = synthetic_shapes(args.n, seed=args.data_seed)
    meta = _run_meta(args, loaded)
    given, stored = None, None
    if args.maps:
        stored, methods = _stored_maps(args, loaded, methods, settings, list(images.shape[2:]))
        keep = stored.indices
        images, labels, masks = images[keep], labels[keep], masks[keep]
        given = stored.maps
        meta["maps_store"] = stored.describe()
    report = evaluate(
        loaded.model,
        loaded.transform(images).to(device),
        labels,
        masks,
        methods=methods,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=progress(args),
        settings=settings,
        controls=not args.no_controls,
        model_name=name,
        metrics=metrics,
        meta=meta,
        maps=given,
    )
    try:
        written = write_report(report, out)
    except OSError as exc:
        raise CliError(f"cannot write to {str(out)!r}: {exc.strerror or exc}") from None
    wall = time.perf_counter() - started
    plots = [p.name for p in written if p.suffix == ".png"]
    print(
        f"wrote {out / 'results.json'}, results.md and {len(plots)} plot(s) ({', '.join(plots)}) "
        f"for {len(report.methods)} methods on {len(labels)} images in {wall:.1f} s"
    )
    if stored is not None:
        _print_store_use(report, stored)
    return EXIT_OK


def _store_size(path: str) -> int:
    from ..store import open_attributions

    try:
        return len(open_attributions(Path(path).expanduser()))
    except (OSError, ValueError) as exc:
        raise CliError(f"--maps: {exc}") from None


def _print_store_use(report: Any, stored: Any) -> None:
    """Say which maps came from the store, which metrics ran the methods again, and which
    images the store could not give."""
    recomputed = report.meta.get("maps_recomputed_by", [])
    print(
        f"maps of {', '.join(stored.maps)} read from {stored.path}"
        + (
            f"; {', '.join(recomputed)} recomputed maps (they call the methods again)"
            if recomputed
            else "; no metric recomputed them"
        )
    )
    if stored.excluded:
        print(f"{len(stored.excluded)} image(s) excluded (the store has no map of them):")
        for image_id, reason in stored.excluded[:20]:
            print(f"  {image_id}: {reason}")
        if len(stored.excluded) > 20:
            print(f"  ... and {len(stored.excluded) - 20} more (results.json meta.maps_store)")


COMMAND = Command("evaluate", HELP, add_arguments, run, DESCRIPTION, EPILOG)
