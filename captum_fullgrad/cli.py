"""The ``captum-fullgrad`` command line: ``demo``, ``compare`` and ``decompose``.

Each subcommand is one parser builder (``_<name>_arguments``) and one function
(``_<name>``) taking the parsed arguments and returning an exit status, registered in the
:data:`COMMANDS` list at the end of this module. Bad input (unreadable images, unknown
model or method names, weights that do not fit, unwritable outputs...) is reported on
stderr as one line ``captum-fullgrad: error: ...`` with exit status 2, and no output file
is left half-written (figures are written to a temporary file and moved into place).

Run ``captum-fullgrad --help`` or ``captum-fullgrad <command> --help``; see ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import torch

from ._argtypes import add_runtime_options as _add_runtime_options
from ._argtypes import non_negative_int as _non_negative_int
from ._argtypes import positive_int as _positive_int
from ._argtypes import resolve_device
from ._io import write_text

__all__ = ["COMMANDS", "CliError", "Command", "build_parser", "main"]

PROG = "captum-fullgrad"
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
#: Set to 1 to print the traceback of unexpected errors.
DEBUG_ENV_VAR = "CAPTUM_FULLGRAD_DEBUG"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FIGURE_SUFFIXES = (".png", ".pdf")

# The demo's data: held-out scenes (the bundled model was trained on seed 0 and reports its
# held-out accuracy on seed 10000; see benchmarks/train_shapes.py).
DEMO_SEED = 10_000
DEMO_GRID_DPI = 120
# The sample photos shipped with scikit-image (all present offline).
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`CliError` (one line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, parser builder and implementation."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    epilog: str = ""


# --------------------------------------------------------------------------------------
# Shared options and helpers
# --------------------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="'shapes' (the bundled synthetic-shapes network) or a torchvision classifier "
        "such as vgg16_bn",
    )
    parser.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT (pretrained: torch hub cache or download), a torchvision weights name "
        "such as IMAGENET1K_V1, a path to a state dict file, or 'random' (default: DEFAULT)",
    )


def _progress(args: argparse.Namespace) -> bool:
    """A progress bar unless --no-progress or stderr is not a terminal."""
    return not args.no_progress and sys.stderr.isatty()


def _resolve_device(spec: str) -> torch.device:
    try:
        return resolve_device(spec)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _check_writable_dir(directory: Path, what: str) -> None:
    """Fail early if ``directory`` cannot be created or written, without creating it."""
    probe = directory.resolve()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CliError(
            f"cannot create {what} {str(directory)!r}: {str(probe)!r} is not a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CliError(
            f"cannot create or write {what} {str(directory)!r}: permission denied on {str(probe)!r}"
        )


def _make_dir(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create {what} {str(directory)!r}: {exc.strerror or exc}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CliError(f"cannot write to {what} {str(directory)!r}: permission denied")


def _output_file(text: str) -> Path:
    path = Path(text).expanduser()
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise CliError(f"--out {text!r}: the file name must end in .png or .pdf")
    if path.is_dir():
        raise CliError(f"--out {text!r} is a directory; give a file name ending in .png or .pdf")
    _check_writable_dir(path.parent, "output directory")
    return path


def _save(figure: Any, path: Path, dpi: int = 150) -> None:
    from .figures import save_figure

    _make_dir(path.parent, "output directory")
    try:
        save_figure(figure, path, dpi=dpi)
    except OSError as exc:
        raise CliError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def _methods(text: Optional[str]) -> List[Any]:
    from .methods import DEFAULT_TABLE5_METHODS, get_method

    names = (
        list(DEFAULT_TABLE5_METHODS) if text is None else [n for n in text.split(",") if n.strip()]
    )
    if not names:
        raise CliError("--methods: give at least one method name, e.g. --methods fullgrad,gradcam")
    methods = []
    for name in names:
        try:
            methods.append(get_method(name))
        except ValueError as exc:
            raise CliError(f"--methods: {exc}") from None
    seen = [m.name for m in methods]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise CliError(f"--methods: each method may appear once; repeated: {', '.join(repeated)}")
    return methods


def _load_model(name: str, weights: str, device: torch.device) -> Any:
    from .models import list_models, load_model

    spec: Any = None if weights.strip().lower() in ("random", "none") else weights
    if spec is not None and spec != "DEFAULT" and Path(spec).expanduser().exists():
        spec = Path(spec).expanduser()  # an existing file is a file, whatever its name
    try:
        return load_model(name, weights=spec, device=device)
    except (ValueError, TypeError, OSError) as exc:
        raise CliError(_one_line(str(exc))) from None
    except RuntimeError as exc:  # torch.load on a corrupt file
        raise CliError(
            f"cannot load weights {weights!r} for model {name!r}: {_one_line(str(exc))[:300]}"
        ) from None
    except KeyError as exc:  # pragma: no cover - defensive
        raise CliError(
            f"unknown model {name!r} ({len(list_models())} names in list_models())"
        ) from exc


def _image_paths(items: Sequence[str]) -> List[Path]:
    paths: List[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise CliError(f"directory {item!r} holds no PNG or JPEG image")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise CliError(f"{item!r} is neither a file nor a directory")
        else:
            raise CliError(f"image {item!r} does not exist")
    return paths


def _decoder_message(exc: Exception) -> str:
    text = _one_line(str(exc))
    # torchvision's messages start with "function, /path/to/source.cpp:LINE, ".
    match = re.match(r"^\w+, \S+:\d+, (.*)$", text)
    return (match.group(1) if match else text)[:200]


def _read_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB image, or :class:`CliError`."""
    import torchvision.io as tvio

    try:
        data = tvio.read_file(str(path))
        image = tvio.decode_image(data, mode=tvio.ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CliError(f"cannot read image {str(path)!r}: {_decoder_message(exc)}") from None
    if image.dim() == 4:  # animated GIF: first frame
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise CliError(
            f"cannot read image {str(path)!r}: unexpected decoded shape {tuple(image.shape)}"
        )
    return image


def _prepare(loaded: Any, images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Model inputs ``(N, C, H, W)`` (the model's transform, at its input size) and the same
    pixels for display ``(N, 3, H, W)`` in [0, 1] (the transform's normalisation undone)."""
    import torch.nn.functional as F

    transform = loaded.transform
    size = tuple(loaded.input_size)
    inputs = []
    for image in images:
        x = transform(image)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(
                x[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
            )[0]
        inputs.append(x)
    batch = torch.stack(inputs).float()
    mean = getattr(transform, "mean", None)
    std = getattr(transform, "std", None)
    if mean is not None and std is not None:
        display = batch * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        display = batch
    return batch, display.clamp(0.0, 1.0)


def _check_target(target: Optional[int], loaded: Any) -> None:
    if target is not None and not 0 <= target < len(loaded.categories):
        raise CliError(
            f"--target {target}: model {loaded.name!r} has {len(loaded.categories)} classes "
            f"(0 to {len(loaded.categories) - 1})"
        )


def _weights_label(loaded: Any) -> str:
    if loaded.weights is None:
        return "random weights"
    if loaded.weights == "DEFAULT":
        return "bundled weights"
    return Path(loaded.weights).name if os.sep in str(loaded.weights) else str(loaded.weights)


# --------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help="PNG or JPEG files, or directories of them",
    )
    parser.add_argument("--out", required=True, help="output figure, .png or .pdf")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (default: the paper's Table 5: "
        "guided_backprop,integrated_gradients,smoothgrad,gradcam,fullgrad,fullgrad_bias)",
    )
    parser.add_argument(
        "--target",
        type=_non_negative_int,
        default=None,
        help="class index to explain in every image (default: predicted class)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, help="images per method call (default: 8)"
    )
    _add_runtime_options(parser)


def _compare(args: argparse.Namespace) -> int:
    from .figures import comparison_grid

    out = _output_file(args.out)
    methods = _methods(args.methods)
    paths = _image_paths(args.images)
    images = [_read_image(p) for p in paths]
    device = _resolve_device(args.device)
    loaded = _load_model(args.model, args.weights, device)
    _check_target(args.target, loaded)
    inputs, display = _prepare(loaded, images)
    figure = comparison_grid(
        loaded.model,
        inputs.to(device),
        targets=args.target,
        methods=methods,
        categories=loaded.categories,
        display_images=display,
        row_labels=[p.name for p in paths],
        batch_size=args.batch_size,
        progress=_progress(args),
        title=f"{loaded.name} ({_weights_label(loaded)})",
    )
    _save(figure, out)
    print(f"wrote {out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# decompose
# --------------------------------------------------------------------------------------


def _decompose_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--image", required=True, help="a PNG or JPEG file")
    parser.add_argument("--out", required=True, help="output figure, .png or .pdf")
    parser.add_argument(
        "--target",
        type=_non_negative_int,
        default=None,
        help="class index to decompose (default: predicted class)",
    )
    parser.add_argument("--columns", type=_positive_int, default=5, help=argparse.SUPPRESS)
    _add_runtime_options(parser)


def _decompose(args: argparse.Namespace) -> int:
    from .figures import decomposition_figure

    out = _output_file(args.out)
    path = Path(args.image).expanduser()
    if path.is_dir():
        raise CliError(f"--image {args.image!r} is a directory; give one PNG or JPEG file")
    image = _read_image(_image_paths([args.image])[0])
    device = _resolve_device(args.device)
    loaded = _load_model(args.model, args.weights, device)
    _check_target(args.target, loaded)
    inputs, display = _prepare(loaded, [image])
    figure = decomposition_figure(
        loaded.model,
        inputs[0].to(device),
        args.target,
        categories=loaded.categories,
        display_image=display[0],
        max_columns=max(2, args.columns),
    )
    _save(figure, out)
    print(f"wrote {out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    parser.add_argument(
        "--n-images", type=_positive_int, default=6, help="rows of the comparison grid (default: 6)"
    )
    parser.add_argument(
        "--n-eval",
        type=_positive_int,
        default=200,
        help="held-out images for the accuracy (default: 200)",
    )
    parser.add_argument(
        "--n-pointing",
        type=_positive_int,
        default=100,
        help="images for the pointing game and timings (default: 100)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEMO_SEED,
        help=f"seed of the held-out scenes (default: {DEMO_SEED})",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=25, help="images per method call (default: 25)"
    )
    parser.add_argument("--methods", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pointing-methods", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--skip-imagenet",
        action="store_true",
        help="skip the VGG-16-BN grid even when its weights are cached",
    )
    _add_runtime_options(parser)


def _demo(args: argparse.Namespace) -> int:
    from .datasets import SHAPE_CLASSES, synthetic_shapes
    from .evaluation import pointing_game
    from .figures import (
        attribution_maps,
        comparison_grid,
        decomposition_figure,
        decomposition_summary,
    )
    from .full_gradient import FullGradient

    started = time.perf_counter()
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out!r} exists and is not a directory")
    _check_writable_dir(out, "output directory")
    grid_methods = _methods(args.methods)
    from .methods import DEFAULT_TABLE5_METHODS

    # Every built-in method for the pointing game: Table 5's columns, then the rest.
    builtin = (*DEFAULT_TABLE5_METHODS, "smoothfullgrad", "input_x_gradient", "saliency")
    pointing_methods = _methods(args.pointing_methods or ",".join(builtin))
    device = _resolve_device(args.device)
    progress = _progress(args)
    loaded = _load_model("shapes", "DEFAULT", device)
    model = loaded.model

    # 1. Held-out accuracy of the bundled model.
    n_total = max(args.n_eval, args.n_pointing, args.n_images)
    images, labels, masks = synthetic_shapes(n_total, seed=args.seed)
    correct = 0
    with torch.no_grad():
        for start in range(0, args.n_eval, 200):
            stop = min(start + 200, args.n_eval)
            logits = model(loaded.transform(images[start:stop]).to(device))
            correct += int((logits.argmax(1).cpu() == labels[start:stop]).sum())
    accuracy = correct / args.n_eval
    _make_dir(out, "output directory")

    # 2. Table 5 on the first images, predicted classes.
    grid_inputs = loaded.transform(images[: args.n_images]).to(device)
    grid_maps = attribution_maps(
        model, grid_inputs, None, grid_methods, batch_size=args.batch_size, progress=progress
    )
    grid = comparison_grid(
        model,
        grid_inputs,
        categories=loaded.categories,
        display_images=images[: args.n_images],
        precomputed=grid_maps,
        row_labels=[f"#{i} true: {SHAPE_CLASSES[int(labels[i])]}" for i in range(args.n_images)],
        title=f"Bundled 'shapes' VGG on held-out scenes (seed {args.seed})",
    )
    # 64 px scenes: 120 dpi still draws each of their pixels 3 x 3 and keeps the PNG small.
    _save(grid, out / "comparison_grid.png", dpi=DEMO_GRID_DPI)
    _save(grid, out / "comparison_grid.pdf")

    # 3. Figure 1 on the first image.
    summary = decomposition_summary(model, grid_inputs[0])
    figure = decomposition_figure(
        model,
        grid_inputs[0],
        categories=loaded.categories,
        display_image=images[0],
        summary=summary,
    )
    _save(figure, out / "decomposition.png")

    # 4. Pointing game and timings, explaining the true class.
    inputs = loaded.transform(images[: args.n_pointing]).to(device)
    truth = labels[: args.n_pointing]
    pointing = attribution_maps(
        model, inputs, truth, pointing_methods, batch_size=args.batch_size, progress=progress
    )
    object_masks = masks[: args.n_pointing]
    hits = {
        name: pointing_game(maps[:, 0], object_masks, tolerance=0)
        for name, maps in pointing.maps.items()
    }
    chance = float(object_masks.flatten(1).float().mean(1).mean())

    # 5. Completeness of eq. 1 (FullGradient's convergence delta) on the same images.
    gaps, outputs = [], []
    for start in range(0, args.n_pointing, args.batch_size):
        part = inputs[start : start + args.batch_size]
        target = truth[start : start + args.batch_size].to(device)
        _, delta = FullGradient(model).attribute(
            part, target=target, return_convergence_delta=True, single_channel=True
        )
        with torch.no_grad():
            outputs.append(model(part).gather(1, target[:, None])[:, 0].cpu())
        gaps.append(delta.detach().cpu())
    gap = torch.cat(gaps).double()
    output = torch.cat(outputs).double()

    # 6. The ImageNet grid, where VGG-16-BN's weights are cached.
    imagenet = _imagenet_section(
        out, device, grid_methods, progress, args.batch_size, args.skip_imagenet
    )

    wall = time.perf_counter() - started
    report = _demo_report(
        args=args,
        loaded=loaded,
        accuracy=accuracy,
        grid_maps=grid_maps,
        summary=summary,
        pointing=pointing,
        hits=hits,
        chance=chance,
        gap=gap,
        output=output,
        imagenet=imagenet,
        device=device,
        wall=wall,
    )
    _write_text(out / "report.md", report)
    print(
        f"wrote {out / 'comparison_grid.png'}, comparison_grid.pdf, decomposition.png and "
        f"report.md in {wall:.1f} s"
    )
    return EXIT_OK


def _write_text(path: Path, text: str) -> None:
    _make_dir(path.parent, "output directory")
    try:
        write_text(path, text)
    except OSError as exc:
        raise CliError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def sample_photos() -> List[Tuple[str, Any]]:
    """The sample photos shipped with scikit-image, scikit-learn (if installed) and matplotlib.

    Returns ``(name, (H, W, 3) uint8 array)`` pairs; all are read offline.
    """
    import numpy as np
    import skimage.data

    photos: List[Tuple[str, Any]] = []
    for name in SKIMAGE_PHOTOS:
        photos.append((f"skimage {name}", np.asarray(getattr(skimage.data, name)())))
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        pass
    else:
        bunch = load_sample_images()
        for filename, array in zip(bunch.filenames, bunch.images):
            photos.append((f"sklearn {Path(filename).stem}", np.asarray(array)))
    try:
        import matplotlib.cbook
        import matplotlib.image

        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        photos.append(("matplotlib grace_hopper", np.asarray(matplotlib.image.imread(path))))
    except (OSError, ValueError):  # pragma: no cover - matplotlib installed without sample data
        pass
    return [(name, np.array(array[..., :3], dtype=np.uint8, copy=True)) for name, array in photos]


def _imagenet_cached() -> Tuple[bool, Any, Path]:
    from torchvision.models import VGG16_BN_Weights

    from .models import weights_cache_path

    weights = VGG16_BN_Weights.IMAGENET1K_V1
    path = weights_cache_path(weights)
    return path.is_file(), weights, path


def _imagenet_section(
    out: Path, device: torch.device, methods: List[Any], progress: bool, batch_size: int, skip: bool
) -> str:
    """Make ``vgg16_bn_grid.png`` when VGG-16-BN's ImageNet weights are in the torch hub
    cache (never downloads), and return the report's section about it."""
    cached, weights, path = _imagenet_cached()
    if skip:
        return "Skipped (`--skip-imagenet`).\n"
    if not cached:
        return (
            f"Not made: the ImageNet weights of VGG-16-BN are not in the torch hub cache "
            f"(`{path}`), and the demo never downloads. To get the grid, fetch them once on a "
            f"machine with network access:\n\n"
            '```\npython -c "import torchvision; '
            "torchvision.models.vgg16_bn(weights='IMAGENET1K_V1')\"\n```\n\n"
            f"or download {weights.url} and place it in `{path.parent}` under the name "
            f"`{path.name}` (set `TORCH_HOME` to use another cache), then rerun "
            f"`captum-fullgrad demo`. The grid then shows the sample photos shipped with "
            f"scikit-image, matplotlib and (if installed) scikit-learn.\n"
        )

    from .figures import attribution_maps, comparison_grid

    loaded = _load_model("vgg16_bn", "DEFAULT", device)
    photos = sample_photos()
    images = [torch.from_numpy(array).permute(2, 0, 1).contiguous() for _, array in photos]
    inputs, display = _prepare(loaded, images)
    inputs = inputs.to(device)
    started = time.perf_counter()
    maps = attribution_maps(
        loaded.model, inputs, None, methods, batch_size=min(batch_size, 4), progress=progress
    )
    figure = comparison_grid(
        loaded.model,
        inputs,
        categories=loaded.categories,
        display_images=display,
        precomputed=maps,
        row_labels=[name for name, _ in photos],
        title="VGG-16-BN (ImageNet) on sample photos",
    )
    _save(figure, out / "vgg16_bn_grid.png")
    seconds = time.perf_counter() - started
    lines = [
        "![VGG-16-BN grid](vgg16_bn_grid.png)\n",
        f"{len(photos)} photos, {seconds:.1f} s for all maps on {device.type}. Predictions:\n",
        "| photo | predicted class | p |",
        "|---|---|---|",
    ]
    for row, ((name, _), k) in enumerate(zip(photos, maps.predictions.tolist())):
        lines.append(
            f"| {name} | {loaded.categories[k]} | {float(maps.probabilities[row, k]):.3f} |"
        )
    return "\n".join(lines) + "\n"


def _demo_report(
    *,
    args: argparse.Namespace,
    loaded: Any,
    accuracy: float,
    grid_maps: Any,
    summary: Any,
    pointing: Any,
    hits: Dict[str, torch.Tensor],
    chance: float,
    gap: torch.Tensor,
    output: torch.Tensor,
    imagenet: str,
    device: torch.device,
    wall: float,
) -> str:
    import captum

    from . import __version__
    from .methods import get_method

    n = args.n_pointing
    relative = gap.abs() / output.abs().clamp_min(1e-12)
    rows = []
    for name in pointing.maps:
        count = int(hits[name].sum())
        per_image = 1000.0 * pointing.seconds[name] / n
        params = (
            ", ".join(
                f"{k}={v}" for k, v in get_method(name).parameters.items() if k in _SHOWN_PARAMS
            )
            or "-"
        )
        rows.append(
            f"| {pointing.labels[name]} (`{name}`) | {count}/{n} | {count / n:.0%} "
            f"| {per_image:.3g} | {params} |"
        )
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    tf32_note = (
        "\nOn CUDA, convolutions run in TF32 by default "
        f"(`torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32}` here), which "
        "holds completeness to about 1e-3 relative; exactness checks belong in float64.\n"
        if device.type == "cuda"
        else ""
    )
    sources = ", ".join(summary.non_spatial_sources) or "none"
    reproduce = (
        f"captum-fullgrad demo --out {args.out} --n-images {args.n_images} --n-eval {args.n_eval} "
        f"--n-pointing {args.n_pointing} --seed {args.seed}"
    )
    block_lines = "\n".join(
        f"| `{block}` | {value:+.5g} |" for block, value in summary.block_terms.items()
    )
    return f"""# captum-fullgrad demo report

Generated {generated} by `captum-fullgrad demo` in {wall:.1f} s
(device: {device.type}; torch {torch.__version__}, captum {captum.__version__},
captum-fullgrad {__version__}, Python {platform.python_version()}).

## The model and the data

The bundled `shapes` network (a 4-block conv-BN-ReLU VGG trained on synthetic scenes,
classes {", ".join(loaded.categories)}) on held-out scenes of seed {args.seed} (the training
scenes come from seed 0). Each scene has exactly one class-deciding object, whose pixel mask
is known, plus distractor rings and bars.

Held-out accuracy: **{accuracy:.1%}** on {args.n_eval} scenes.

## Comparison grid (the paper's Table 5)

![comparison grid](comparison_grid.png)

Rows: the first {args.n_images} held-out scenes, labelled with the predicted class and its
softmax probability (and the true class). Columns: the image, then each method's map for
the predicted class. Normalisation: every map is divided by its own 99th percentile and
clipped to [0, 1], one colour map for all, so the maps compare in shape, not in scale.
Also as [PDF](comparison_grid.pdf).

## Full-Jacobian decomposition (the paper's Figure 1)

![decomposition](decomposition.png)

For scene #0: f(x) = {summary.output:.6g} (logit of '{loaded.categories[summary.target]}').

| term | share of f(x) |
|---|---|
| input term `<grad f, x>` | {summary.input_term:+.5g} |
{block_lines}
| non-spatial biases ({sources}) | {summary.non_spatial:+.5g} |
| **sum** | **{summary.total:+.6g}** |
| completeness gap f(x) - sum | {summary.completeness_gap:.2e} |

## Pointing game and time per image

{n} held-out scenes, explaining the true class. A hit: every pixel where the map attains its
maximum lies on the class-deciding object's mask (tolerance 0 px; ties must all hit, as in
`captum_fullgrad.evaluation.pointing_game`). Chance level (a single random pixel): the mean
object area, **{chance:.1%}** of the image. Time: wall-clock per image on {device.type},
batches of {args.batch_size}, including each method's own forward passes.

| method | hits | hit rate | ms / image | parameters |
|---|---|---|---|---|
{chr(10).join(rows)}

## Completeness of eq. 1

FullGradient's convergence delta, f(x) - (<grad f, x> + sum of all bias-Jacobians), on the
same {n} scenes (float32; |f(x)| up to {float(output.abs().max()):.3g}):

| max abs gap | max relative gap | mean abs gap |
|---|---|---|
| {float(gap.abs().max()):.2e} | {float(relative.max()):.2e} | {float(gap.abs().mean()):.2e} |
{tf32_note}
## VGG-16-BN on ImageNet sample photos

{imagenet}
## Reproduce

```
{reproduce}
```
"""


_SHOWN_PARAMS = (
    "n_steps",
    "baseline",
    "nt_samples",
    "noise",
    "postprocess",
    "reduce",
    "interpolate_mode",
)


# --------------------------------------------------------------------------------------
# Registry of subcommands and the entry point
# --------------------------------------------------------------------------------------

from .evaluation import command as _evaluate  # noqa: E402 - the evaluate subcommand


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .benchmark import bench_arguments

    bench_arguments(parser)
    _add_runtime_options(parser)


def _bench(args: argparse.Namespace) -> int:
    from .benchmark import bench_from_args, write_results

    device = _resolve_device(args.device)
    out = Path(args.out)
    _make_dir(out, "--out")
    try:
        result = bench_from_args(args, device, progress=_progress(args))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    for path in write_results(result, out, args.name):
        print(path)
    print(result.to_markdown())
    return EXIT_OK


#: Every subcommand, in --help order: one parser builder and one function each (add ``bench``
#: here).
COMMANDS: List[Command] = [
    Command(
        "demo",
        "offline demo: comparison grid, decomposition figure and report on the shapes model",
        _demo_arguments,
        _demo,
        description="Run the bundled synthetic-shapes network on held-out scenes and write "
        "DIR/comparison_grid.png (+ .pdf), DIR/decomposition.png and DIR/report.md (accuracy, "
        "completeness gaps, time per method, pointing-game hit rates). Where VGG-16-BN's "
        "ImageNet weights are in the torch hub cache, also DIR/vgg16_bn_grid.png on sample photos.",
        epilog="example: captum-fullgrad demo --out demo-out",
    ),
    Command(
        "compare",
        "saliency maps of several methods on your images (the paper's Table 5)",
        _compare_arguments,
        _compare,
        description="Load a classifier and PNG/JPEG images, preprocess them with the model's "
        "transform, and write a grid: one row per image, one column per method.",
        epilog="example: captum-fullgrad compare --model vgg16_bn --images photos/ --out grid.png "
        "--methods fullgrad,gradcam,smoothgrad",
    ),
    Command(
        "decompose",
        "the full-Jacobian decomposition of one image (the paper's Figure 1)",
        _decompose_arguments,
        _decompose,
        description="Write the input-gradient term and every block's bias-Jacobian map for one "
        "image, each with its share of the output f(x), and the completeness check.",
        epilog="example: captum-fullgrad decompose --model vgg16_bn --image cat.jpg --out cat.png",
    ),
    Command(
        "bench",
        "attribution speed of every method, as ratios to Captum's Saliency from the same run",
        _bench_arguments,
        _bench,
        description="Time every registered method (and pytorch-grad-cam's FullGrad when installed) "
        "on a torchvision classifier or module:function with random weights: warm-ups, CUDA "
        "synchronisation, medians over repeats, peak CUDA memory. Writes OUT/NAME.json, .md, .png.",
        epilog="example: captum-fullgrad bench --model vgg16_bn --batch-sizes 1,16,64 --device cuda --out bench-out",
    ),
    Command(
        "evaluate",
        _evaluate.HELP,
        _evaluate.add_arguments,
        _evaluate.run,
        _evaluate.DESCRIPTION,
        _evaluate.EPILOG,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-fullgrad`` with one subparser per :data:`COMMANDS` entry."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Full-Jacobian (FullGrad) saliency: compare methods, decompose outputs, "
        "run the demo.",
        epilog="Errors are one line on stderr; exit status 0 on success, 2 on bad input, "
        "1 on internal errors.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            epilog=command.epilog,
        )
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``captum-fullgrad`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except CliError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return int(args._run(args))
    except CliError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if os.environ.get(DEBUG_ENV_VAR, "").strip() not in ("", "0"):
            traceback.print_exc()
        return _fail(
            f"internal error: {type(exc).__name__}: {exc} "
            f"(set {DEBUG_ENV_VAR}=1 for the traceback)",
            EXIT_INTERNAL,
        )
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
