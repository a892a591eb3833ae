"""Where FullGradient's time over Saliency goes, per call: by phase, and per bias source.

Issue 14 asks FullGradient (a warm plan) to stay within a ratio of Captum's ``Saliency``.
This script says what the difference is made of, so that a change can be aimed at the
largest part and its effect read off the same table:

- **phases**: the model's forward pass, ``torch.autograd.grad`` (the backward pass,
  the replay's gradient hooks included), and the replay's steps outside both: entering
  (hooks installed, BatchNorm vectors), the graph replay before the backward pass, the
  captured gradients' reductions after it, the eq. 4 map. Saliency is timed the same
  way for its forward and backward passes; the rest of each call is ``other``.
- **operators**: in calls without these wrappers, how much of each method's time
  torch's operators take (kernels and their dispatch, by the profiler) and how much is
  left to the Python around them and the autograd engine.
- **sources**: every reduction of one source's gradient (``MapCollector._reduce``),
  grouped by how it is reached (a hook during the backward pass, or ``captured`` and
  reduced after it), whether it is spatial (an eq. 4 map) or not, and the kind of its
  intercept (``channel vector``: conv, linear, BatchNorm; ``pair``: an activation's
  backward identity; ``negated output``: a returned product; ``dense``: a closed form;
  ``shrunk``: a normalisation).

Each timed function is wrapped by a Python timer (about 1 us per call on a slow host), so
the phases add up to slightly more than an unwrapped call; compare rows of one run, not
runs of different scripts. Nothing here is a target: ``captum-fullgrad bench`` measures
those.

    PYTHONPATH=. python benchmarks/excess_breakdown.py --model mobilenet_v3_small
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Tuple

import torch
from captum.attr import Saliency

from captum_fullgrad import FullGradient, aggregation, replay
from captum_fullgrad.benchmark import load_bench_model


class _Timers:
    """Seconds and calls per name, accumulated by :meth:`wrap`'s wrappers."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _intercept_kind(source: Any) -> str:
    intercept = source.intercept
    if intercept.channel_vector is not None:
        return "channel vector"
    if intercept.backward_pair is not None:
        return "pair"
    if intercept.negated_output is not None:
        return "negated output"
    if intercept.shrunk_output is not None:
        return "shrunk"
    return "dense"


def _instrument(model: torch.nn.Module, timers: _Timers, sources: _Timers) -> List[Callable]:
    """Wrap the phases and the per-source reduction; returns the undo functions."""
    undo: List[Callable[[], None]] = []

    def patch(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        setattr(owner, name, timers.wrap(label, original))
        undo.append(lambda: setattr(owner, name, original))

    patch(torch.autograd, "grad", "backward")
    model.forward = timers.wrap("forward", model.forward)  # type: ignore[method-assign]
    undo.append(lambda: delattr(model, "forward"))  # the class's forward again
    patch(replay.Replay, "__enter__", "replay: enter")
    patch(replay.Replay, "__exit__", "replay: exit")
    patch(replay.Replay, "prepare_backward", "replay: graph, before the backward pass")
    patch(replay.Replay, "deliver_gradients", "replay: captured reductions, after it")
    patch(replay.Replay, "_observe", "(in forward) module steps observed")
    patch(aggregation.MapCollector, "on_gradient", "(in backward) hooked reductions")
    patch(aggregation.MapCollector, "bias_map", "eq. 4 map")

    inside_delivery = [False]
    deliver = replay.Replay.deliver_gradients

    def delivering(self: Any, gradients: Any) -> Any:
        inside_delivery[0] = True
        try:
            return deliver(self, gradients)
        finally:
            inside_delivery[0] = False

    replay.Replay.deliver_gradients = delivering  # type: ignore[method-assign]
    undo.append(lambda: setattr(replay.Replay, "deliver_gradients", deliver))

    reduce = aggregation.MapCollector._reduce

    def reducing(self: Any, source: Any, grad: torch.Tensor) -> Any:
        start = time.perf_counter()
        try:
            return reduce(self, source, grad)
        finally:
            label = " / ".join(
                (
                    "captured" if inside_delivery[0] else "hook",
                    "spatial" if source.spatial else "flat",
                    _intercept_kind(source),
                )
            )
            sources.seconds[label] += time.perf_counter() - start
            sources.calls[label] += 1

    aggregation.MapCollector._reduce = reducing  # type: ignore[method-assign]
    undo.append(lambda: setattr(aggregation.MapCollector, "_reduce", reduce))

    # Captured sources outside the maps whose terms are dot products per example skip
    # ``_reduce``: ``_reduce_captured`` concatenates them into one product. Their row
    # is that method's time less the ``_reduce`` calls inside it.
    dot_row = aggregation._dot_row
    batched = "captured / flat / one dot product for all"

    def row(source: Any, grad: torch.Tensor) -> Any:
        found = dot_row(source, grad)
        if found is not None:
            sources.calls[batched] += 1
        return found

    aggregation._dot_row = row
    undo.append(lambda: setattr(aggregation, "_dot_row", dot_row))
    reduce_captured = aggregation.MapCollector._reduce_captured

    def reduced_alone() -> float:
        return sum(v for k, v in sources.seconds.items() if inside_delivery[0] and k != batched)

    def reducing_captured(self: Any, pairs: Any) -> Any:
        start, before = time.perf_counter(), reduced_alone()
        try:
            return reduce_captured(self, pairs)
        finally:
            elapsed = time.perf_counter() - start
            sources.seconds[batched] += elapsed - (reduced_alone() - before)

    aggregation.MapCollector._reduce_captured = reducing_captured  # type: ignore[method-assign]
    undo.append(lambda: setattr(aggregation.MapCollector, "_reduce_captured", reduce_captured))
    return undo


def _operator_time(
    methods: Dict[str, Callable[[], Any]], calls: int
) -> Dict[str, Tuple[float, float]]:
    """Per call and method: the wall time without any wrapper, and the part of it that
    torch's operators take (the profiler's self time of every ``aten::`` operator:
    kernels and their dispatch), so that the rest is the Python around them and the
    autograd engine's own work. The profiler adds a little per operator, so the split is
    measured on separate calls from the wall time."""
    from torch.profiler import ProfilerActivity, profile

    wall, operators, counts = {}, {}, {}
    for name, call in methods.items():
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall[name] = (time.perf_counter() - start) * 1e3 / calls
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            for _ in range(calls):
                call()
        events = [e for e in profiled.key_averages() if e.key.startswith("aten::")]
        operators[name] = sum(e.self_cpu_time_total for e in events) / 1e3 / calls
        counts[name] = sum(e.count for e in events) / calls
    pair = ("saliency", "fullgrad")
    return {
        "wall time, ms": tuple(wall[n] for n in pair),
        "aten operators' self time, ms": tuple(operators[n] for n in pair),
        "the rest (Python, autograd engine), ms": tuple(wall[n] - operators[n] for n in pair),
        "aten operators per call": tuple(counts[n] for n in pair),
    }


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_bench_model(args.model)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    target = torch.arange(1, args.batch_size + 1)
    fullgrad, saliency = FullGradient(model), Saliency(model)
    methods: Dict[str, Callable[[], Any]] = {
        "saliency": lambda: saliency.attribute(x, target=target),
        "fullgrad": lambda: fullgrad.attribute(x, target=target),
    }
    for _ in range(3):  # the trace, then warm replays
        for call in methods.values():
            call()
    operator_rows = _operator_time(methods, args.calls)
    timers, sources = _Timers(), _Timers()
    undo = _instrument(model, timers, sources)
    totals: Dict[str, float] = {}
    phases: Dict[str, Dict[str, float]] = {}
    try:
        for name, call in methods.items():
            timers.clear()
            sources.clear()
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            totals[name] = (time.perf_counter() - start) * 1e3 / args.calls
            phases[name] = {k: v * 1e3 / args.calls for k, v in timers.seconds.items()}
    finally:
        for restore in reversed(undo):
            restore()

    print(
        f"{args.model}, {args.input_size} px, batch {args.batch_size}, {args.threads} threads, "
        f"{args.calls} calls: Saliency {totals['saliency']:.2f} ms, FullGradient "
        f"{totals['fullgrad']:.2f} ms ({totals['fullgrad'] / totals['saliency']:.3f}x), "
        "per call\n"
    )
    print("| phase | Saliency (ms) | FullGradient (ms) | difference |")
    print("|---|---:|---:|---:|")
    others = sorted((set(phases["saliency"]) | set(phases["fullgrad"])) - {"forward", "backward"})
    for name in ["forward", "backward", *others]:
        s, f = phases["saliency"].get(name, 0.0), phases["fullgrad"].get(name, 0.0)
        print(f"| {name} | {s:.2f} | {f:.2f} | {f - s:+.2f} |")
    for name in ("saliency", "fullgrad"):
        # Phases in parentheses lie inside the forward or backward pass: not added again.
        counted = sum(v for k, v in phases[name].items() if not k.startswith("("))
        phases[name]["other"] = totals[name] - counted
    s, f = phases["saliency"]["other"], phases["fullgrad"]["other"]
    print(f"| other (validation, input term, delta, ...) | {s:.2f} | {f:.2f} | {f - s:+.2f} |")
    difference = totals["fullgrad"] - totals["saliency"]
    print(
        f"| **total** | {totals['saliency']:.2f} | {totals['fullgrad']:.2f} | {difference:+.2f} |\n"
    )
    print("| operators (uninstrumented calls) | Saliency | FullGradient | difference |")
    print("|---|---:|---:|---:|")
    for label, (s, f) in operator_rows.items():
        print(f"| {label} | {s:.2f} | {f:.2f} | {f - s:+.2f} |")
    print()
    print("| source reductions | per call | ms per call | us each |")
    print("|---|---:|---:|---:|")
    for label in sorted(sources.calls):
        calls, seconds = sources.calls[label], sources.seconds[label]
        print(
            f"| {label} | {calls / args.calls:.0f} | {seconds * 1e3 / args.calls:.2f} | "
            f"{seconds * 1e6 / calls:.1f} |"
        )


if __name__ == "__main__":
    main()
