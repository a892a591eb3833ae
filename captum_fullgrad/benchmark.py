"""Attribution speed: every registered method timed side by side against Captum's Saliency.

Eq. 4 needs one forward pass and one backward pass to the input, plus reductions that
read each bias layer's gradient once. Captum's ``Saliency`` is exactly a forward and a
backward pass, so it is the floor every single-pass method is measured against: each
method's time is reported as a ratio to Saliency's time *from the same run*, on the same
inputs, model and device.

Timing: warm-up calls first (cuDNN autotuning, allocator), ``torch.cuda.synchronize()``
around every timed call on CUDA, the median and the quartiles over repeats; peak CUDA
memory per method from ``torch.cuda.max_memory_allocated`` after a reset. Methods are
interleaved within each repeat so that a slow spell of the machine hits them all.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._io import atomic_write, write_text
from .full_gradient import FullGradient
from .testing import randomize_parameters_

__all__ = [
    "BenchmarkResult",
    "Measurement",
    "DEFAULT_BENCH_METHODS",
    "run_benchmark",
    "load_bench_model",
]

#: Methods timed by default; "forward" is a plain forward pass under no_grad (a reference,
#: not an attribution). "fullgrad" is a FullGradient used call after call (from the second
#: call on it replays its capture plan where the model allows one); "fullgrad_traced" traces
#: every call (``reuse_capture=False``: the cost of a first call, or of a model without a
#: plan). SmoothGrad and SmoothFullGrad use the same sample count.
DEFAULT_BENCH_METHODS = (
    "forward",
    "saliency",
    "fullgrad",
    "fullgrad_traced",
    "smoothfullgrad",
    "smoothgrad",
    "guided_backprop",
    "integrated_gradients",
    "gradcam",
    "pytorch_grad_cam_fullgrad",
)
DEFAULT_NOISE_SAMPLES = 10


@dataclass
class Measurement:
    """One method at one batch size."""

    method: str
    batch_size: int
    median_s: float
    q1_s: float
    q3_s: float
    repeats: int
    images_per_s: float
    ratio_to_saliency: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    memory_ratio_to_saliency: Optional[float] = None
    completeness_gap: Optional[float] = None  # FullGrad: median |delta| / |f(x)| in this mode
    note: str = ""


@dataclass
class BenchmarkResult:
    meta: Dict[str, Any]
    measurements: List[Measurement] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {"meta": self.meta, "measurements": [asdict(m) for m in self.measurements]}, indent=2
        )

    def to_markdown(self) -> str:
        m = self.meta
        lines = [
            f"Model `{m['model']}`, input {m['input_size']}x{m['input_size']}, {m['dtype']}"
            f"{' (autocast)' if m['dtype'] != 'float32' else ''}"
            f"{', channels-last' if m.get('channels_last') else ''}, device {m['device_name']}, "
            f"torch {m['torch']}, {m['threads']} CPU threads, {m['date']}.",
            "Median of {r} timed calls after {w} warm-ups; ratios are to Saliency in the same run.".format(
                r=m["repeats"], w=m["warmup"]
            ),
            "",
            "| method | batch | median s | images/s | × Saliency | peak MB | mem × Saliency | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for x in self.measurements:
            lines.append(
                f"| {x.method} | {x.batch_size} | {x.median_s:.4g} | {x.images_per_s:.4g} | "
                f"{_fmt(x.ratio_to_saliency)} | {_fmt(x.peak_memory_mb, '.0f')} | "
                f"{_fmt(x.memory_ratio_to_saliency)} | {x.note} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self):
        """Throughput per method and batch size, log scale (a matplotlib Figure)."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7.5, 4.5), layout="constrained")
        axis = figure.subplots()
        methods = list(dict.fromkeys(x.method for x in self.measurements))
        for method in methods:
            rows = sorted(
                (x for x in self.measurements if x.method == method), key=lambda x: x.batch_size
            )
            axis.plot(
                [x.batch_size for x in rows],
                [x.images_per_s for x in rows],
                marker="o",
                label=method,
            )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size")
        axis.set_ylabel("images per second (log)")
        axis.set_title(
            f"{self.meta['model']} {self.meta['input_size']}px, {self.meta['dtype']}, {self.meta['device_name']}"
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
        return figure


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def load_bench_model(spec: str, num_classes: int = 1000) -> nn.Module:
    """A torchvision classifier name (random weights, biases and BN statistics randomised)
    or ``module:function`` returning an ``nn.Module``."""
    if ":" in spec:
        module_name, function_name = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load model factory {spec!r}: {error}") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec} returned {type(model).__name__}, not an nn.Module")
        return model.eval()
    import torchvision

    try:
        kwargs = (
            {"init_weights": True, "aux_logits": False}
            if spec in ("googlenet", "inception_v3")
            else {}
        )
        model = torchvision.models.get_model(spec, weights=None, num_classes=num_classes, **kwargs)
    except ValueError:
        raise ValueError(
            f"unknown model {spec!r}: give a torchvision classifier name or module:function"
        ) from None
    # Speed does not depend on the values, but a zero-bias network would skip nothing
    # either; randomise so the benchmark runs what a trained network runs.
    return randomize_parameters_(model).eval()


def _method_callables(
    model: nn.Module, methods: Sequence[str], noise_samples: int, internal_batch_size: Optional[int]
) -> Dict[str, Callable[[Tensor, Tensor], Any]]:
    from .methods import get_method

    callables: Dict[str, Callable[[Tensor, Tensor], Any]] = {}
    for name in methods:
        if name == "forward":

            def forward(x: Tensor, target: Tensor) -> Any:
                with torch.no_grad():
                    return model(x)

            callables[name] = forward
        elif name == "pytorch_grad_cam_fullgrad":
            try:
                from pytorch_grad_cam import FullGrad
                from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
            except ImportError:
                continue  # optional: only measured where the package is installed

            def grad_cam_fullgrad(x: Tensor, target: Tensor) -> Any:
                # Hooks stay on the model until release() (ANCHORS): release every call.
                cam = FullGrad(model=model, target_layers=[])
                try:
                    return cam(
                        input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target]
                    )
                finally:
                    cam.activations_and_grads.release()

            callables[name] = grad_cam_fullgrad
        elif name in ("fullgrad", "fullgrad_traced"):
            fullgrad = FullGradient(model, reuse_capture=name == "fullgrad")
            callables[name] = lambda x, target, fullgrad=fullgrad: fullgrad.attribute(
                x, target=target, single_channel=True, internal_batch_size=internal_batch_size
            )
        elif name == "saliency":
            from captum.attr import Saliency

            saliency = Saliency(model)
            callables[name] = lambda x, target: saliency.attribute(x, target=target)
        else:
            params: Dict[str, Any] = {}
            if name in ("smoothgrad", "smoothfullgrad"):
                params["nt_samples"] = noise_samples
            method = get_method(name, **params)
            callables[name] = lambda x, target, method=method: method(model, x, target)
    return callables


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(
    model: nn.Module,
    model_name: str,
    methods: Sequence[str] = DEFAULT_BENCH_METHODS,
    batch_sizes: Sequence[int] = (1, 16, 64),
    device: Any = "cpu",
    dtype: str = "float32",
    input_size: int = 224,
    repeats: int = 10,
    warmup: int = 3,
    noise_samples: int = DEFAULT_NOISE_SAMPLES,
    internal_batch_size: Optional[int] = None,
    slow_methods_max_batch: int = 16,
    progress: bool = False,
    channels_last: bool = False,
) -> BenchmarkResult:
    """Time every method at every batch size; ratios to Saliency from the same run.

    Args:
        model: the network (moved to ``device``, eval mode).
        model_name: its name for the report.
        methods: names from :data:`DEFAULT_BENCH_METHODS` or the method registry.
        batch_sizes: batch sizes to measure.
        device: ``"cpu"``, ``"cuda"``...
        dtype: ``"float32"``, or ``"bfloat16"``/``"float16"`` to run every method under
            ``torch.autocast`` (FullGrad's completeness gap in that mode is reported).
        input_size: square input side in pixels.
        repeats, warmup: timed and untimed calls per method and batch size.
        noise_samples: SmoothGrad's and SmoothFullGrad's sample count (the same for both).
        internal_batch_size: FullGrad's ``internal_batch_size`` (bounds memory).
        slow_methods_max_batch: integrated gradients, the noise-tunnel methods and
            pytorch-grad-cam's FullGrad run only up to this batch size (each costs tens of
            passes); larger batches are skipped and marked.
        channels_last: model and inputs in ``torch.channels_last`` memory format (what
            cuDNN's reduced-precision convolutions prefer), for every method alike.
    """
    device = torch.device(device)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if "saliency" not in methods:
        methods = ["saliency", *methods]
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    callables = _method_callables(model, methods, noise_samples, internal_batch_size)
    autocast = dtype != "float32"
    meta = {
        "model": model_name,
        "input_size": input_size,
        "dtype": dtype,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": repeats,
        "warmup": warmup,
        "noise_samples": noise_samples,
        "internal_batch_size": internal_batch_size,
        "tf32": bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "channels_last": channels_last,
    }
    result = BenchmarkResult(meta=meta)
    slow = {"integrated_gradients", "smoothgrad", "smoothfullgrad", "pytorch_grad_cam_fullgrad"}
    # pytorch-grad-cam's FullGrad costs seconds per image (ANCHORS: 1.5 s on an H200):
    # batch 1 and three repeats are enough to place it.
    very_slow = {"pytorch_grad_cam_fullgrad": 1}
    generator = torch.Generator().manual_seed(0)
    iterator: Any = batch_sizes
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batch_sizes, desc="batch sizes", leave=False)
    for batch in iterator:
        x = torch.rand(batch, 3, input_size, input_size, generator=generator).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (batch,), generator=generator).to(device)
        active = {
            n: f
            for n, f in callables.items()
            if (n not in slow or batch <= slow_methods_max_batch)
            and batch <= very_slow.get(n, batch)
        }
        skipped = [n for n in callables if n not in active]
        times: Dict[str, List[float]] = {n: [] for n in active}
        peaks: Dict[str, Optional[float]] = {}
        context = (
            (lambda: torch.autocast(device.type, dtype=getattr(torch, dtype)))
            if autocast
            else _null
        )
        with context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, fn in active.items():
                for _ in range(1 if name in very_slow else warmup):
                    fn(x, target)
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    fn(x, target)
                    _sync(device)
                    peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                else:
                    peaks[name] = None
            # Interleave methods within each repeat: a slow spell of the machine hits all.
            for repeat in range(repeats):
                for name, fn in active.items():
                    if name in very_slow and repeat >= 3:
                        continue
                    _sync(device)
                    start = time.perf_counter()
                    fn(x, target)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
            gap = _completeness_gap(model, x, target) if "fullgrad" in active else None
        saliency_median = statistics.median(times["saliency"])
        for name in active:
            samples = sorted(times[name])
            median = statistics.median(samples)
            q1, q3 = _quartiles(samples)
            note = f"n={noise_samples}" if name in ("smoothgrad", "smoothfullgrad") else ""
            measurement = Measurement(
                method=name,
                batch_size=batch,
                median_s=median,
                q1_s=q1,
                q3_s=q3,
                repeats=len(samples),
                images_per_s=batch / median,
                ratio_to_saliency=median / saliency_median,
                peak_memory_mb=peaks.get(name),
                memory_ratio_to_saliency=(
                    peaks[name] / peaks["saliency"]
                    if peaks.get(name) and peaks.get("saliency")
                    else None
                ),
                completeness_gap=gap if name == "fullgrad" else None,
                note=note,
            )
            result.measurements.append(measurement)
        for name in skipped:
            result.measurements.append(
                Measurement(
                    name,
                    batch,
                    math.nan,
                    math.nan,
                    math.nan,
                    0,
                    math.nan,
                    note="skipped at this batch size",
                )
            )
    result.measurements = [m for m in result.measurements if m.repeats > 0] + [
        m for m in result.measurements if m.repeats == 0
    ]
    return result


def _completeness_gap(model: nn.Module, x: Tensor, target: Tensor) -> float:
    """Median relative gap |delta| / |f(x)| of FullGrad in the current mode (autocast or not)."""
    _, delta = FullGradient(model).attribute(x, target=target, return_convergence_delta=True)
    with torch.no_grad():
        output = model(x).float().gather(1, target.view(-1, 1)).squeeze(1)
    return float((delta.float().abs() / output.abs().clamp_min(1e-12)).median())


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _quartiles(samples: List[float]):
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4)
    return q[0], q[2]


def write_results(result: BenchmarkResult, out_dir: Path, stem: str) -> List[Path]:
    """Write ``stem.json``, ``stem.md`` and ``stem.png`` into ``out_dir``."""
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    write_text(paths[0], result.to_json())
    write_text(paths[1], result.to_markdown())
    figure = result.plot()
    atomic_write(
        paths[2], lambda handle: figure.savefig(handle, format="png", dpi=110), binary=True
    )
    return paths


# ----------------------------------------------------------------------------- CLI


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="vgg16_bn",
        help="torchvision classifier name or module:function (default: vgg16_bn)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_BENCH_METHODS),
        help="comma-separated methods (default: every built-in; pytorch_grad_cam_fullgrad only when installed)",
    )
    parser.add_argument(
        "--batch-sizes", default="1,16,64", help="comma-separated batch sizes (default: 1,16,64)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--noise-samples", type=int, default=DEFAULT_NOISE_SAMPLES)
    parser.add_argument("--internal-batch-size", type=int, default=None)
    parser.add_argument(
        "--slow-max-batch",
        type=int,
        default=16,
        help="largest batch for IG, noise tunnels, pytorch-grad-cam",
    )
    parser.add_argument(
        "--out", default="bench-out", help="directory for bench.json, bench.md, bench.png"
    )
    parser.add_argument("--name", default="bench", help="file stem of the outputs (default: bench)")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 matmuls and convolutions on CUDA (as in ANCHORS)",
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN autotune convolution algorithms"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="model and inputs in channels-last memory format (every method alike)",
    )


def parse_int_list(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m captum_fullgrad.benchmark``: the same as ``captum-fullgrad bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m captum_fullgrad.benchmark", description=__doc__.splitlines()[0]
    )
    bench_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    try:
        result = bench_from_args(args, torch.device(device), progress=not args.no_progress)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    for path in write_results(result, Path(args.out), args.name):
        print(path)
    print(result.to_markdown())
    return 0


def bench_from_args(
    args: argparse.Namespace, device: torch.device, progress: bool
) -> BenchmarkResult:
    """Run the benchmark described by parsed ``bench`` arguments (ValueError on bad input)."""
    from .methods import available_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = set(DEFAULT_BENCH_METHODS) | set(available_methods())
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
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


if __name__ == "__main__":
    sys.exit(main())
