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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._device import synchronize
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
            f"Median of {m['repeats']} timed calls after {m['warmup']} warm-ups; ratios are to "
            "Saliency in the same run.",
            "",
            "| method | batch | median s | images/s | × Saliency | peak MB | mem × Saliency "
            "| note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for x in self.measurements:
            lines.append(
                f"| {x.method} | {x.batch_size} | {x.median_s:.4g} | {x.images_per_s:.4g} | "
                f"{_fmt(x.ratio_to_saliency)} | {_fmt(x.peak_memory_mb, '.0f')} | "
                f"{_fmt(x.memory_ratio_to_saliency)} | {x.note} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self) -> Any:
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
            f"{self.meta['model']} {self.meta['input_size']}px, {self.meta['dtype']}, "
            f"{self.meta['device_name']}"
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


@dataclass(frozen=True)
class _Timed:
    """One timed entry: a callable ``(x, target)`` and how the harness must treat it."""

    fn: Callable[[Tensor, Tensor], Any]
    slow: bool = False  # capped at ``slow_methods_max_batch``
    max_batch: Optional[int] = None  # measured only up to this batch size
    max_repeats: Optional[int] = None  # timed calls at most (one warm-up)
    note: str = ""


def _forward(model: nn.Module, internal_batch_size: Optional[int]) -> Optional[_Timed]:
    def forward(x: Tensor, target: Tensor) -> Any:
        with torch.no_grad():
            return model(x)

    return _Timed(forward)


def _raw_saliency(model: nn.Module, internal_batch_size: Optional[int]) -> Optional[_Timed]:
    from captum.attr import Saliency

    saliency = Saliency(model)
    return _Timed(lambda x, target: saliency.attribute(x, target=target))


def _engine_fullgrad(reuse_capture: bool) -> Callable[..., Optional[_Timed]]:
    def make(model: nn.Module, internal_batch_size: Optional[int]) -> Optional[_Timed]:
        fullgrad = FullGradient(model, reuse_capture=reuse_capture)
        return _Timed(
            lambda x, target: fullgrad.attribute(
                x, target=target, single_channel=True, internal_batch_size=internal_batch_size
            )
        )

    return make


def _pytorch_grad_cam_fullgrad(
    model: nn.Module, internal_batch_size: Optional[int]
) -> Optional[_Timed]:
    try:
        from pytorch_grad_cam import FullGrad
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None  # optional: only measured where the package is installed

    def grad_cam_fullgrad(x: Tensor, target: Tensor) -> Any:
        # Its hooks stay on the model until release(): release after every call.
        cam = FullGrad(model=model, target_layers=[])
        try:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])
        finally:
            cam.activations_and_grads.release()

    # It costs seconds per image (about 1.5 s on an H200, see docs/benchmarks.md): batch 1
    # and three timed calls are enough to place it.
    return _Timed(grad_cam_fullgrad, slow=True, max_batch=1, max_repeats=3)


#: Entries timed beside the registered methods, as references rather than saliency
#: methods: a plain forward pass, Captum's raw ``Saliency`` (the floor every ratio is to),
#: the engine's FullGradient reused call after call ("fullgrad", which replays its capture
#: plan where the model allows one) or tracing every call ("fullgrad_traced"), and
#: pytorch-grad-cam's FullGrad. Any other name is looked up in the method registry.
REFERENCE_ENTRIES: Dict[str, Callable[[nn.Module, Optional[int]], Optional[_Timed]]] = {
    "forward": _forward,
    "saliency": _raw_saliency,
    "fullgrad": _engine_fullgrad(reuse_capture=True),
    "fullgrad_traced": _engine_fullgrad(reuse_capture=False),
    "pytorch_grad_cam_fullgrad": _pytorch_grad_cam_fullgrad,
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_bench_methods(methods: Union[str, Sequence[Any]]) -> List[Any]:
    """Reference entry names and configured registry methods, in the order given.

    ``methods``: a comma-separated string or a sequence of names and
    :class:`~captum_fullgrad.methods.AttributionMethod` objects. Raises ``ValueError`` for
    an unknown name (listing the reference entries and the registered methods) or a repeat.
    """
    from .methods import available_methods, resolve_methods

    items = [m for m in methods.split(",") if m.strip()] if isinstance(methods, str) else methods
    resolved: List[Any] = []
    for item in items:
        if isinstance(item, str) and _normalise(item) in REFERENCE_ENTRIES:
            resolved.append(_normalise(item))
            continue
        try:
            resolved.extend(resolve_methods([item]))
        except ValueError as error:
            if not isinstance(item, str) or _normalise(item) in available_methods():
                raise
            known = [*REFERENCE_ENTRIES, *available_methods()]
            raise ValueError(
                f"unknown method {_normalise(item)!r}; known: {', '.join(known)}"
            ) from error
    if not resolved:
        raise ValueError("give at least one method name, e.g. 'saliency,fullgrad'")
    names = [m if isinstance(m, str) else m.name for m in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each method may appear once; repeated: {', '.join(repeated)}")
    return resolved


def _method_callables(
    model: nn.Module,
    methods: Sequence[Any],
    noise_samples: int,
    internal_batch_size: Optional[int],
) -> Dict[str, _Timed]:
    """The timed entries of ``methods`` (see :func:`resolve_bench_methods`).

    Registered methods are timed through their adapters: one that makes more than one
    forward-and-backward pass per image (``method.passes > 1``: integrated gradients, the
    noise tunnels) is "slow", and a stochastic one gets ``noise_samples`` draws through its
    ``samples_param``: what each method declares, not its name.
    """
    callables: Dict[str, _Timed] = {}
    for entry in resolve_bench_methods(methods):
        if isinstance(entry, str):
            timed = REFERENCE_ENTRIES[entry](model, internal_batch_size)
            if timed is not None:
                callables[entry] = timed
            continue
        method = entry
        samples = method.traits.samples_param
        note = ""
        if method.stochastic and samples is not None:
            if samples not in method.params:  # an explicit setting wins
                method = method.configure(**{samples: noise_samples})
            note = f"n={method.parameters[samples]}"
        callables[method.name] = _Timed(_bound(method, model), slow=method.passes > 1, note=note)
    return callables


def _bound(method: Any, model: nn.Module) -> Callable[[Tensor, Tensor], Any]:
    """``method`` on ``model`` as a function of ``(x, target)``."""

    def call(x: Tensor, target: Tensor) -> Any:
        return method(model, x, target)

    return call


def run_benchmark(
    model: nn.Module,
    model_name: str,
    methods: Union[str, Sequence[Any]] = DEFAULT_BENCH_METHODS,
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
        methods: names of :data:`REFERENCE_ENTRIES` or registered methods, or configured
            :class:`~captum_fullgrad.methods.AttributionMethod` objects (a comma string
            or a sequence); Captum's Saliency is always added.
        batch_sizes: batch sizes to measure.
        device: ``"cpu"``, ``"cuda"``...
        dtype: ``"float32"``, or ``"bfloat16"``/``"float16"`` to run every method under
            ``torch.autocast`` (FullGrad's completeness gap in that mode is reported).
        input_size: square input side in pixels.
        repeats, warmup: timed and untimed calls per method and batch size.
        noise_samples: the sample count of every stochastic method (the same for all,
            through each one's ``samples_param``) unless the method sets it itself.
        internal_batch_size: FullGrad's ``internal_batch_size`` (bounds memory).
        slow_methods_max_batch: methods that declare more than one forward-and-backward
            pass per image (integrated gradients, the noise tunnels) and pytorch-grad-cam's
            FullGrad run only up to this batch size; larger batches are skipped and marked.
        channels_last: model and inputs in ``torch.channels_last`` memory format (what
            cuDNN's reduced-precision convolutions prefer), for every method alike.
    """
    device = torch.device(device)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    entries = resolve_bench_methods(methods)
    if "saliency" not in entries:  # the floor every ratio is to
        entries = ["saliency", *entries]
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    callables = _method_callables(model, entries, noise_samples, internal_batch_size)
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
            n: t
            for n, t in callables.items()
            if (not t.slow or batch <= slow_methods_max_batch)
            and (t.max_batch is None or batch <= t.max_batch)
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
            for name, timed in active.items():
                fn = timed.fn
                for _ in range(1 if timed.max_repeats is not None else warmup):
                    fn(x, target)
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    fn(x, target)
                    synchronize(device)
                    peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                else:
                    peaks[name] = None
            # Interleave methods within each repeat: a slow spell of the machine hits all.
            for repeat in range(repeats):
                for name, timed in active.items():
                    if timed.max_repeats is not None and repeat >= timed.max_repeats:
                        continue
                    synchronize(device)
                    start = time.perf_counter()
                    timed.fn(x, target)
                    synchronize(device)
                    times[name].append(time.perf_counter() - start)
            gap = _completeness_gap(model, x, target) if "fullgrad" in active else None
        saliency_median = statistics.median(times["saliency"])
        for name in active:
            samples = sorted(times[name])
            median = statistics.median(samples)
            q1, q3 = _quartiles(samples)
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
                memory_ratio_to_saliency=_ratio(peaks.get(name), peaks.get("saliency")),
                completeness_gap=gap if name == "fullgrad" else None,
                note=active[name].note,
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


def _ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    return value / reference if value and reference else None


def _quartiles(samples: List[float]) -> Tuple[float, float]:
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


def __getattr__(name: str) -> Any:
    # The command-line helpers moved to captum_fullgrad.cli.bench; the old names still work.
    moved = {"bench_arguments": "add_arguments", "bench_from_args": "bench_from_args"}
    if name in (*moved, "parse_int_list"):
        from .cli import bench

        return getattr(bench, moved.get(name, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m captum_fullgrad.benchmark [options]``: ``captum-fullgrad bench [options]``.

    The same options (``--threads``, ``--device`` included), errors and exit statuses: it
    runs the command line's ``bench`` subcommand (:mod:`captum_fullgrad.cli.bench`).
    """
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
