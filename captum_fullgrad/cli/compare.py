"""``captum-fullgrad compare``: saliency maps of several methods on the user's images.

One row per image, one column per method (the seed paper's Table 5), written as one
``.png`` or ``.pdf`` figure by :func:`captum_fullgrad.figures.comparison_grid`.
"""

from __future__ import annotations

import argparse

from .._argtypes import add_runtime_options, non_negative_int, positive_int
from . import _figure_options, _inputs, _outputs
from ._common import EXIT_OK, Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _inputs.add_model_options(parser)
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
        type=non_negative_int,
        default=None,
        help="class index to explain in every image (default: predicted class)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="images per method call (default: 8)"
    )
    _figure_options.add_param_option(parser)
    _figure_options.add_figure_options(parser)
    add_runtime_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..figures import SALIENCY_CMAP, comparison_grid

    out = _outputs.output_file(args.out)
    methods = _figure_options.methods(args.methods, args.param)
    cmap = _figure_options.colour_map(args.cmap)
    paths = _inputs.image_paths(args.images)
    images = [_inputs.read_image(p) for p in paths]
    device = _inputs.device(args.device)
    loaded = _inputs.load_model(args.model, args.weights, device)
    _inputs.check_target(args.target, loaded)
    inputs, display = _inputs.prepare(loaded, images)
    figure = comparison_grid(
        loaded.model,
        inputs.to(device),
        targets=args.target,
        methods=methods,
        categories=loaded.categories,
        display_images=display,
        row_labels=[p.name for p in paths],
        batch_size=args.batch_size,
        progress=_inputs.progress(args),
        title=f"{loaded.name} ({_inputs.weights_label(loaded)})",
        percentile=args.percentile,
        overlay_maps=args.overlay,
        alpha=args.alpha,
        note=_figure_options.parameters_note(methods),
        cmap=cmap or SALIENCY_CMAP,
    )
    _outputs.save(figure, out, dpi=args.dpi)
    print(f"wrote {out}")
    return EXIT_OK


COMMAND = Command(
    "compare",
    "saliency maps of several methods on your images (the paper's Table 5)",
    add_arguments,
    run,
    description="Load a classifier and PNG/JPEG images, preprocess them with the model's "
    "transform, and write a grid: one row per image, one column per method.",
    epilog="example: captum-fullgrad compare --model vgg16_bn --images photos/ --out grid.png "
    "--methods fullgrad,gradcam,smoothgrad --param smoothgrad.nt_samples=10 --overlay",
)
