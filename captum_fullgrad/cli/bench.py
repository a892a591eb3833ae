"""``captum-fullgrad bench`` (and ``python -m captum_fullgrad.benchmark``): attribution speed.

Every method timed side by side with Captum's Saliency in the same run
(:func:`captum_fullgrad.benchmark.run_benchmark`), written as ``OUT/NAME.json``, ``.md``
and ``.png``. Which methods are slow (capped at ``--slow-max-batch``) and which take
``--noise-samples`` comes from each registered method's declared traits.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List

from .._argtypes import add_runtime_options
from . import _inputs, _outputs
from ._common import EXIT_OK, Command, bad_input

#: ``--noise-samples`` when not given (the same as ``benchmark.DEFAULT_NOISE_SAMPLES``;
#: written here so that ``--help`` does not import torch).
DEFAULT_NOISE_SAMPLES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="vgg16_bn",
        help="torchvision classifier name or module:function (default: vgg16_bn)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods: registered methods and the references forward, "
        "saliency, fullgrad, fullgrad_traced, pytorch_grad_cam_fullgrad (default: all of "
        "them; pytorch_grad_cam_fullgrad only when installed)",
    )
    parser.add_argument(
        "--batch-sizes", default="1,16,64", help="comma-separated batch sizes (default: 1,16,64)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--noise-samples",
        type=int,
        default=DEFAULT_NOISE_SAMPLES,
        help="random draws of every stochastic method (SmoothGrad, SmoothFullGrad) "
        f"(default: {DEFAULT_NOISE_SAMPLES})",
    )
    parser.add_argument("--internal-batch-size", type=int, default=None)
    parser.add_argument(
        "--slow-max-batch",
        type=int,
        default=16,
        help="largest batch for methods of more than one pass per image (IG, noise tunnels) "
        "and pytorch-grad-cam (default: 16)",
    )
    parser.add_argument(
        "--out", default="bench-out", help="directory for bench.json, bench.md, bench.png"
    )
    parser.add_argument("--name", default="bench", help="file stem of the outputs (default: bench)")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 matmuls and convolutions on CUDA (as in docs/benchmarks.md)",
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN autotune convolution algorithms"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="model and inputs in channels-last memory format (every method alike)",
    )
    add_runtime_options(parser)


def parse_int_list(text: str, what: str) -> List[int]:
    """Comma-separated positive integers (``ValueError`` naming ``what`` otherwise)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def bench_from_args(args: argparse.Namespace, device: Any, progress: bool) -> Any:
    """Run the benchmark described by parsed ``bench`` arguments (ValueError on bad input)."""
    import torch

    from ..benchmark import (
        DEFAULT_BENCH_METHODS,
        load_bench_model,
        resolve_bench_methods,
        run_benchmark,
    )

    methods = resolve_bench_methods(args.methods or ",".join(DEFAULT_BENCH_METHODS))
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes")
    if args.input_size < 32 or args.repeats < 1 or args.warmup < 0 or args.noise_samples < 1:
        raise ValueError(
            "--input-size must be >= 32, --repeats >= 1, --warmup >= 0, --noise-samples >= 1"
        )
    model = load_bench_model(args.model)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    return run_benchmark(
        model,
        args.model,
        methods=methods,
        batch_sizes=batch_sizes,
        device=device,
        dtype=args.dtype,
        input_size=args.input_size,
        repeats=args.repeats,
        warmup=args.warmup,
        noise_samples=args.noise_samples,
        internal_batch_size=args.internal_batch_size,
        slow_methods_max_batch=args.slow_max_batch,
        progress=progress,
        channels_last=args.channels_last,
    )


def run(args: argparse.Namespace) -> int:
    from ..benchmark import write_results

    device = _inputs.device(args.device)
    out = Path(args.out)
    _outputs.make_dir(out, "--out")
    with bad_input(ValueError):
        result = bench_from_args(args, device, progress=_inputs.progress(args))
    for path in write_results(result, out, args.name):
        print(path)
    print(result.to_markdown())
    return EXIT_OK


COMMAND = Command(
    "bench",
    "attribution speed of every method, as ratios to Captum's Saliency from the same run",
    add_arguments,
    run,
    description="Time every registered method (and pytorch-grad-cam's FullGrad when installed) "
    "on a torchvision classifier or module:function with random weights: warm-ups, CUDA "
    "synchronisation, medians over repeats, peak CUDA memory. Writes OUT/NAME.json, .md, .png. "
    "Also run as 'python -m captum_fullgrad.benchmark' with the same options.",
    epilog="example: captum-fullgrad bench --model vgg16_bn --batch-sizes 1,16,64 "
    "--device cuda --out bench-out",
)
