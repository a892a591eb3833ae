"""Old against new dense intercepts, interleaved in one process, as ratios to Saliency.

``fullgrad`` is a ``FullGradient`` with a warm plan (replayed), whose activation terms come
from the backward pass (``<df/dy, y> - <J^T df/dy, a>`` at the op's own autograd node);
``fullgrad_closed_form`` is the same replay with that switched off, so each activation's
intercept ``c = y - g'(a) a`` is formed in the forward pass and kept until the backward
pass (the engine before this change). Methods are interleaved within each repeat; medians.

    PYTHONPATH=. python benchmarks/dense_intercepts.py --models mobilenet_v2,efficientnet_b0 \\
        --input-size 96 --batch-size 4 --threads 2 --repeats 9 --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from captum.attr import Saliency

from captum_fullgrad import FullGradient
from captum_fullgrad import replay as replay_module
from captum_fullgrad.benchmark import load_bench_model


def _methods(model: torch.nn.Module) -> Dict[str, Callable[[torch.Tensor, torch.Tensor], object]]:
    saliency = Saliency(model)
    new = FullGradient(model)
    old = FullGradient(model)
    original = replay_module.activation_backward_node

    def closed_form(x: torch.Tensor, target: torch.Tensor) -> object:
        replay_module.activation_backward_node = lambda settings: None
        try:
            return old.attribute(x, target=target)
        finally:
            replay_module.activation_backward_node = original

    return {
        "saliency": lambda x, t: saliency.attribute(x, target=t, abs=False),
        "fullgrad": lambda x, t: new.attribute(x, target=t),
        "fullgrad_closed_form": closed_form,
    }


def run(model_name: str, size: int, batch: int, repeats: int, warmup: int) -> Dict[str, object]:
    model = load_bench_model(model_name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(batch, dtype=torch.long)
    methods = _methods(model)
    times: Dict[str, List[float]] = {name: [] for name in methods}
    for i in range(warmup + repeats):
        for name, call in methods.items():
            start = time.perf_counter()
            call(x, target)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": model_name,
        "input_size": size,
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "median_s": medians,
        "ratio_to_saliency": {n: medians[n] / medians["saliency"] for n in medians},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,efficientnet_b0")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="dense_intercepts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        result = run(name, args.input_size, args.batch_size, args.repeats, args.warmup)
        ratios: Dict[str, float] = result["ratio_to_saliency"]  # type: ignore[assignment]
        medians: Dict[str, float] = result["median_s"]  # type: ignore[assignment]
        print(
            f"{name}: saliency {medians['saliency'] * 1e3:.1f} ms, fullgrad "
            f"{ratios['fullgrad']:.2f}x, closed form {ratios['fullgrad_closed_form']:.2f}x",
            flush=True,
        )
        results.append(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
