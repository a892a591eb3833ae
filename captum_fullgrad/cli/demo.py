"""``captum-fullgrad demo``: the offline demo on the bundled synthetic-shapes network.

Writes ``DIR/comparison_grid.png`` (+ ``.pdf``, the seed paper's Table 5 on held-out
scenes), ``DIR/decomposition.png`` (its Figure 1), and ``DIR/report.md``: held-out
accuracy, the decomposition's terms, pointing-game hit rates and time per method, and the
completeness gap of eq. 1. Where VGG-16-BN's ImageNet weights are in the torch hub cache
(it never downloads), also ``DIR/vgg16_bn_grid.png`` on sample photos shipped with
scikit-image, matplotlib and scikit-learn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .._argtypes import add_runtime_options, positive_int
from . import _demo_report, _figure_options, _inputs, _outputs
from ._common import EXIT_OK, Command

if TYPE_CHECKING:  # pragma: no cover
    import torch

# The demo's data: held-out scenes (the bundled model was trained on seed 0 and reports its
# held-out accuracy on seed 10000; see benchmarks/train_shapes.py).
DEMO_SEED = 10_000
#: Resolution of the demo's PNG figures (``--dpi``): print quality, see docs/gallery.md.
DEMO_GRID_DPI = _figure_options.DEFAULT_DPI
#: The VGG-16-BN grid's expensive methods on a CPU, where the paper's 50 steps / 50 noisy
#: copies at 224 px took 972 s on 2 cores: 8 each keep the grid to a few minutes (``--param``
#: overrides them; on a GPU the registered defaults, the paper's parameters, are used).
CPU_IMAGENET_PARAMS = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"nt_samples": 8}}
# The sample photos shipped with scikit-image (all present offline).
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
#: The files every run writes into DIR (``vgg16_bn_grid.png`` too when it is made).
DEMO_FILES = ("comparison_grid.png", "comparison_grid.pdf", "decomposition.png", "report.md")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    parser.add_argument(
        "--n-images", type=positive_int, default=6, help="rows of the comparison grid (default: 6)"
    )
    parser.add_argument(
        "--n-eval",
        type=positive_int,
        default=200,
        help="held-out images for the accuracy (default: 200)",
    )
    parser.add_argument(
        "--n-pointing",
        type=positive_int,
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
        "--batch-size", type=positive_int, default=25, help="images per method call (default: 25)"
    )
    parser.add_argument("--methods", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pointing-methods", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--skip-imagenet",
        action="store_true",
        help="skip the VGG-16-BN grid even when its weights are cached",
    )
    _figure_options.add_param_option(parser)
    _figure_options.add_figure_options(parser)
    add_runtime_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..datasets import synthetic_shapes
    from ..methods import DEFAULT_TABLE5_METHODS, available_methods

    started = time.perf_counter()
    out = _outputs.output_directory(args.out)
    grid_methods = _figure_options.methods(args.methods, args.param)
    cmap = _figure_options.colour_map(args.cmap)
    figure_options: Dict[str, Any] = {
        "percentile": args.percentile,
        "overlay_maps": args.overlay,
        "alpha": args.alpha,
        **({"cmap": cmap} if cmap else {}),
    }
    # Every registered method for the pointing game: Table 5's columns, then the rest.
    every = [
        *DEFAULT_TABLE5_METHODS,
        *(m for m in available_methods() if m not in DEFAULT_TABLE5_METHODS),
    ]
    pointing_methods = _inputs.methods(
        args.pointing_methods, default=every, option="--pointing-methods"
    )
    device = _inputs.device(args.device)
    progress = _inputs.progress(args)
    loaded = _inputs.load_model("shapes", "DEFAULT", device)

    n_total = max(args.n_eval, args.n_pointing, args.n_images)
    images, labels, masks = synthetic_shapes(n_total, seed=args.seed)
    # 1. Held-out accuracy of the bundled model.
    accuracy = _accuracy(loaded, images[: args.n_eval], labels[: args.n_eval], device)
    _outputs.make_dir(out, "output directory")
    # 2. Table 5 on the first images, predicted classes; 3. Figure 1 on the first image.
    grid_inputs = loaded.transform(images[: args.n_images]).to(device)
    grid_maps = _comparison_grid(
        args, out, loaded, grid_inputs, images, labels, grid_methods, figure_options, progress
    )
    summary = _decomposition(args, out, loaded, grid_inputs[0], images[0], cmap)
    # 4. Pointing game and timings, explaining the true class; 5. completeness of eq. 1
    # (FullGradient's convergence delta) on the same images.
    inputs = loaded.transform(images[: args.n_pointing]).to(device)
    truth = labels[: args.n_pointing]
    pointing = _pointing_game(args, loaded.model, inputs, truth, pointing_methods, progress)
    hits, chance = _hits(pointing, masks[: args.n_pointing])
    gap, output = _completeness(loaded.model, inputs, truth, args.batch_size, device, progress)
    # 6. The ImageNet grid, where VGG-16-BN's weights are cached.
    imagenet, vgg_grid = _imagenet_section(
        out,
        device,
        grid_methods,
        progress,
        args.batch_size,
        args.skip_imagenet,
        figure_options=figure_options,
        dpi=args.dpi,
    )

    wall = time.perf_counter() - started
    report = _demo_report.render(
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
    _outputs.write_text(out / "report.md", report)
    written = [*DEMO_FILES[:-1], *([vgg_grid.name] if vgg_grid is not None else []), "report.md"]
    print(f"wrote {', '.join(written)} in {out} ({wall:.1f} s)")
    return EXIT_OK


def _accuracy(
    loaded: Any, images: "torch.Tensor", labels: "torch.Tensor", device: "torch.device"
) -> float:
    """The bundled model's accuracy on held-out scenes, 200 at a time."""
    import torch

    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], 200):
            stop = min(start + 200, images.shape[0])
            logits = loaded.model(loaded.transform(images[start:stop]).to(device))
            correct += int((logits.argmax(1).cpu() == labels[start:stop]).sum())
    return correct / images.shape[0]


def _comparison_grid(
    args: argparse.Namespace,
    out: Path,
    loaded: Any,
    inputs: "torch.Tensor",
    images: "torch.Tensor",
    labels: "torch.Tensor",
    methods: List[Any],
    figure_options: Dict[str, Any],
    progress: bool,
) -> Any:
    """``comparison_grid.png`` and ``.pdf``: Table 5 on the first ``--n-images`` scenes,
    for the predicted classes. Returns the maps (the report states their parameters)."""
    from ..datasets import SHAPE_CLASSES
    from ..figures import attribution_maps, comparison_grid

    maps = attribution_maps(
        loaded.model,
        inputs,
        None,
        methods,
        batch_size=args.batch_size,
        progress=progress,
        description="shapes grid",
    )
    grid = comparison_grid(
        loaded.model,
        inputs,
        categories=loaded.categories,
        display_images=images[: args.n_images],
        precomputed=maps,
        row_labels=[f"#{i} true: {SHAPE_CLASSES[int(labels[i])]}" for i in range(args.n_images)],
        title=f"Bundled 'shapes' VGG on held-out scenes (seed {args.seed})",
        note=_figure_options.parameters_note(methods, always=True),
        **figure_options,
    )
    _outputs.save(grid, out / "comparison_grid.png", dpi=args.dpi)
    _outputs.save(grid, out / "comparison_grid.pdf")
    return maps


def _decomposition(
    args: argparse.Namespace,
    out: Path,
    loaded: Any,
    model_input: "torch.Tensor",
    image: "torch.Tensor",
    cmap: Optional[str],
) -> Any:
    """``decomposition.png``: Figure 1 on one scene. Returns its summary (for the report)."""
    from ..figures import SIGNED_CMAP, decomposition_figure, decomposition_summary

    summary = decomposition_summary(loaded.model, model_input)
    figure = decomposition_figure(
        loaded.model,
        model_input,
        categories=loaded.categories,
        display_image=image,
        summary=summary,
        overlay_maps=args.overlay,
        alpha=args.alpha,
        cmap=cmap or SIGNED_CMAP,
    )
    _outputs.save(figure, out / "decomposition.png", dpi=args.dpi)
    return summary


def _pointing_game(
    args: argparse.Namespace,
    model: Any,
    inputs: "torch.Tensor",
    truth: "torch.Tensor",
    methods: List[Any],
    progress: bool,
) -> Any:
    """Every method's maps of the true classes, timed (:func:`attribution_maps`)."""
    from ..figures import attribution_maps

    return attribution_maps(
        model,
        inputs,
        truth,
        methods,
        batch_size=args.batch_size,
        progress=progress,
        description="pointing game",
    )


def _hits(pointing: Any, masks: "torch.Tensor") -> Tuple[Dict[str, "torch.Tensor"], float]:
    """Pointing-game hits per method (tolerance 0 px) and chance level: the mean area of
    the class-deciding object, the hit rate of a single random pixel."""
    from ..evaluation import pointing_game

    hits = {
        name: pointing_game(maps[:, 0], masks, tolerance=0) for name, maps in pointing.maps.items()
    }
    return hits, float(masks.flatten(1).float().mean(1).mean())


def _completeness(
    model: Any,
    inputs: "torch.Tensor",
    truth: "torch.Tensor",
    batch_size: int,
    device: "torch.device",
    progress: bool,
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """FullGradient's convergence delta (eq. 1's gap) and the explained logit ``f(x)`` per
    image, float64 on the CPU."""
    import torch
    from tqdm.auto import tqdm

    from ..full_gradient import FullGradient

    gaps, outputs = [], []
    starts = range(0, inputs.shape[0], batch_size)
    for start in tqdm(starts, desc="completeness", disable=not progress, leave=False):
        part = inputs[start : start + batch_size]
        target = truth[start : start + batch_size].to(device)
        _, delta = FullGradient(model).attribute(
            part, target=target, return_convergence_delta=True, single_channel=True
        )
        with torch.no_grad():
            outputs.append(model(part).gather(1, target[:, None])[:, 0].cpu())
        gaps.append(delta.detach().cpu())
    return torch.cat(gaps).double(), torch.cat(outputs).double()


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

    from ..models import weights_cache_path

    weights = VGG16_BN_Weights.IMAGENET1K_V1
    path = weights_cache_path(weights)
    return path.is_file(), weights, path


def _imagenet_section(
    out: Path,
    device: "torch.device",
    methods: List[Any],
    progress: bool,
    batch_size: int,
    skip: bool,
    *,
    figure_options: Optional[Dict[str, Any]] = None,
    dpi: int = DEMO_GRID_DPI,
) -> Tuple[str, Optional[Path]]:
    """Make ``vgg16_bn_grid.png`` when VGG-16-BN's ImageNet weights are in the torch hub
    cache (never downloads); return the report's section about it and the grid's path
    (None when not made).

    On a CPU, :data:`CPU_IMAGENET_PARAMS` replace the expensive methods' defaults (unless
    ``--param`` set them); the figure's footnote and the report state what was used."""
    import torch

    cached, weights, path = _imagenet_cached()
    if skip:
        return "Skipped (`--skip-imagenet`).\n", None
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
        ), None

    from ..figures import attribution_maps, comparison_grid, format_probability

    loaded = _inputs.load_model("vgg16_bn", "DEFAULT", device)
    photos = sample_photos()
    images = [torch.from_numpy(array).permute(2, 0, 1).contiguous() for _, array in photos]
    inputs, display = _inputs.prepare(loaded, images)
    inputs = inputs.to(device)
    methods = _device_parameters(methods, device)
    note = _figure_options.parameters_note(methods, always=True)
    started = time.perf_counter()
    maps = attribution_maps(
        loaded.model,
        inputs,
        None,
        methods,
        # One photo per step on a CPU, so that the progress bar moves every few seconds.
        batch_size=1 if device.type == "cpu" else min(batch_size, 4),
        progress=progress,
        description="VGG-16-BN grid",
    )
    figure = comparison_grid(
        loaded.model,
        inputs,
        categories=loaded.categories,
        display_images=display,
        precomputed=maps,
        row_labels=[name for name, _ in photos],
        title="VGG-16-BN (ImageNet) on sample photos",
        note=note,
        **(figure_options or {}),
    )
    grid_path = out / "vgg16_bn_grid.png"
    _outputs.save(figure, grid_path, dpi=dpi)
    seconds = time.perf_counter() - started
    lines = [
        "![VGG-16-BN grid](vgg16_bn_grid.png)\n",
        f"{len(photos)} photos, {seconds:.1f} s for all maps on {device.type}"
        f"{' (' + note.rstrip('.') + ')' if note else ''}. Predictions:\n",
        "| photo | predicted class | p |",
        "|---|---|---|",
    ]
    for row, ((name, _), k) in enumerate(zip(photos, maps.predictions.tolist())):
        lines.append(
            f"| {name} | {loaded.categories[k]} "
            f"| {format_probability(float(maps.probabilities[row, k]))} |"
        )
    return "\n".join(lines) + "\n", grid_path


def _device_parameters(methods: List[Any], device: "torch.device") -> List[Any]:
    """On a CPU, :data:`CPU_IMAGENET_PARAMS` for the parameters ``--param`` left unset."""
    if device.type != "cpu":
        return methods
    configured = []
    for method in methods:
        cheaper = {
            key: value
            for key, value in CPU_IMAGENET_PARAMS.get(method.name, {}).items()
            if key not in method.params
        }
        configured.append(method.configure(**cheaper) if cheaper else method)
    return configured


COMMAND = Command(
    "demo",
    "offline demo: comparison grid, decomposition figure and report on the shapes model",
    add_arguments,
    run,
    description="Run the bundled synthetic-shapes network on held-out scenes and write "
    "DIR/comparison_grid.png (+ .pdf), DIR/decomposition.png and DIR/report.md (accuracy, "
    "completeness gaps, time per method, pointing-game hit rates). Where VGG-16-BN's "
    "ImageNet weights are in the torch hub cache, also DIR/vgg16_bn_grid.png on sample photos.",
    epilog="example: captum-fullgrad demo --out demo-out",
)
