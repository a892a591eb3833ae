"""``captum-fullgrad decompose``: the full-Jacobian decomposition of one image.

The input-gradient term and every block's bias-Jacobian map (eq. 1 of the seed paper),
each with its share of the output f(x), and the completeness check: the paper's Figure 1,
written by :func:`captum_fullgrad.figures.decomposition_figure`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._argtypes import add_runtime_options, non_negative_int, positive_int
from . import _figure_options, _inputs, _outputs
from ._common import EXIT_OK, CliError, Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _inputs.add_model_options(parser)
    parser.add_argument("--image", required=True, help="a PNG or JPEG file")
    parser.add_argument("--out", required=True, help="output figure, .png or .pdf")
    parser.add_argument(
        "--target",
        type=non_negative_int,
        default=None,
        help="class index to decompose (default: predicted class)",
    )
    parser.add_argument("--columns", type=positive_int, default=5, help=argparse.SUPPRESS)
    _figure_options.add_figure_options(parser, percentile=100.0)
    add_runtime_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..figures import SIGNED_CMAP, decomposition_figure

    out = _outputs.output_file(args.out)
    cmap = _figure_options.colour_map(args.cmap)
    if Path(args.image).expanduser().is_dir():
        raise CliError(f"--image {args.image!r} is a directory; give one PNG or JPEG file")
    image = _inputs.read_image(_inputs.image_paths([args.image])[0])
    device = _inputs.device(args.device)
    loaded = _inputs.load_model(args.model, args.weights, device)
    _inputs.check_target(args.target, loaded)
    inputs, display = _inputs.prepare(loaded, [image])
    figure = decomposition_figure(
        loaded.model,
        inputs[0].to(device),
        args.target,
        categories=loaded.categories,
        display_image=display[0],
        max_columns=max(2, args.columns),
        overlay_maps=args.overlay,
        alpha=args.alpha,
        percentile=args.percentile,
        cmap=cmap or SIGNED_CMAP,
    )
    _outputs.save(figure, out, dpi=args.dpi)
    print(f"wrote {out}")
    return EXIT_OK


COMMAND = Command(
    "decompose",
    "the full-Jacobian decomposition of one image (the paper's Figure 1)",
    add_arguments,
    run,
    description="Write the input-gradient term and every block's bias-Jacobian map for one "
    "image, each with its share of the output f(x), and the completeness check.",
    epilog="example: captum-fullgrad decompose --model vgg16_bn --image cat.jpg --out cat.png",
)
