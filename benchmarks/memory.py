"""Peak memory of one attribution call above the loaded model, a fresh process per method.

Each (model, method) runs in its own Python process: the model is built (random weights,
bias sources randomised), one warm-up call is made (for FullGradient it traces and
records the plan, so the measured call replays it, as repeated calls do), freed memory is
handed back to the system (``malloc_trim``), and then one call is measured. On the CPU the
number is the peak resident set size during that call (sampled every millisecond by a
thread, the GIL being free while torch computes) minus the resident size just before it;
on CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation before the call.

    PYTHONPATH=. python benchmarks/memory.py --models efficientnet_b0,convnext_tiny \\
        --input-size 224 --batch-size 8 --out benchmarks/results/cpu --name memory_224px_b8
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

# fullgrad_closed_form: the replay before activation terms came from the backward pass
# (each activation's intercept formed in the forward pass and kept until the backward).
# fullgrad_hooked: every layer's gradient handed over by a hook, none captured by the
# backward pass (see replay._CAPTURED_ELEMENTS).
METHODS = ("saliency", "fullgrad", "fullgrad_closed_form", "fullgrad_hooked")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _allocated_peak(call: Callable[[], object]) -> int:
    """The largest total of live tensor bytes during one call, from the allocation and
    free events that ``torch.profiler`` records (its memory timeline, a private API of
    torch >= 2.1): what the method holds, without the allocator's retained or fragmented
    pages that resident memory also counts."""
    from torch.profiler import _memory_profiler as memory_profiler
    from torch.profiler import profile

    with profile(profile_memory=True, record_shapes=True) as recorded:
        call()
    assert recorded.profiler is not None
    timeline = memory_profiler.MemoryProfile(recorded.profiler.kineto_results).timeline
    live = peak = 0
    for _, action, _, size in timeline:
        if action == memory_profiler.Action.CREATE:
            live += size
        elif action == memory_profiler.Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def measure(
    model_name: str,
    method: str,
    size: int,
    batch: int,
    device: str,
    measure_allocated: bool = False,
) -> Dict[str, object]:
    """One (model, method) in this process: bytes above the loaded model during one call
    (resident memory on the CPU, or with ``measure_allocated`` the peak of live tensors)."""
    import torch
    from captum.attr import Saliency

    from captum_fullgrad import FullGradient
    from captum_fullgrad.benchmark import load_bench_model

    model = load_bench_model(model_name).to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    target = torch.zeros(batch, dtype=torch.long, device=device)
    if method == "saliency":
        explainer = Saliency(model)

        def call() -> object:
            return explainer.attribute(x, target=target)
    else:
        if method == "fullgrad_closed_form":
            from captum_fullgrad import replay

            replay.activation_backward_node = lambda settings: None  # type: ignore[assignment]
        if method == "fullgrad_hooked":
            from captum_fullgrad import replay

            replay._CAPTURED_ELEMENTS = 0
        fullgrad = FullGradient(model)

        def call() -> object:
            return fullgrad.attribute(x, target=target)

    call()  # warm-up: allocator pools, and FullGradient's plan
    _trim()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    elif measure_allocated:
        result = None
        peak = _allocated_peak(call)
    else:
        before = _rss_bytes()
        samples = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(_rss_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = call()
        samples.append(_rss_bytes())
        done.set()
        sampler.join()
        peak = max(samples) - before
    del result
    return {"model": model_name, "method": method, "peak_bytes_above_model": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_b0,convnext_tiny")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="memory")
    parser.add_argument(
        "--allocated",
        action="store_true",
        help="measure the peak of live tensor bytes (profiler timeline) instead of resident memory",
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        record = measure(
            args.one[0], args.one[1], args.input_size, args.batch_size, args.device, args.allocated
        )
        print(json.dumps(record))
        return
    rows: List[Dict[str, object]] = []
    for model_name in args.models.split(","):
        peaks: Dict[str, int] = {}
        for method in args.methods.split(","):
            command = [sys.executable, __file__, "--one", model_name, method]
            command += ["--input-size", str(args.input_size), "--batch-size", str(args.batch_size)]
            command += ["--threads", str(args.threads), "--device", args.device]
            command += ["--allocated"] if args.allocated else []
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            record = json.loads(output.strip().splitlines()[-1])
            peaks[method] = int(record["peak_bytes_above_model"])
        row: Dict[str, object] = {
            "model": model_name,
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "device": args.device,
            "measure": "allocated" if args.allocated else "resident",
            "peak_mb_above_model": {m: round(p / 2**20, 1) for m, p in peaks.items()},
        }
        if "saliency" in peaks and peaks["saliency"] > 0:
            row["ratio_to_saliency"] = {m: p / peaks["saliency"] for m, p in peaks.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
