"""``benchmarks/excess_breakdown.py``: the table that docs/benchmarks.md quotes for where
FullGradient's time over Saliency goes. It wraps engine internals by name, so a renamed
method would break it silently in a later session: run it once, small, and check that it
sees every kind of reduction and leaves the engine as it was."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from captum_fullgrad import aggregation, replay

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "excess_breakdown.py"


def _what_the_script_wraps() -> tuple:
    return (
        torch.autograd.grad,
        replay.Replay.deliver_gradients,
        replay.Replay._observe,
        aggregation.MapCollector._reduce,
        aggregation.MapCollector._reduce_captured,
        aggregation.MapCollector.on_gradient,
        aggregation._dot_row,
    )


def test_the_breakdown_sees_each_kind_of_reduction_and_restores_the_engine(capsys):
    spec = importlib.util.spec_from_file_location("excess_breakdown_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    originals = _what_the_script_wraps()
    threads = torch.get_num_threads()
    try:
        script.main(
            [
                "--model",
                "mobilenet_v3_small",
                "--input-size",
                "32",
                "--batch-size",
                "2",
                "--threads",
                "1",
                "--calls",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for row in (
        "| forward |",
        "| backward |",
        "| replay: graph, before the backward pass |",
        "| (in backward) hooked reductions |",
        "| aten operators' self time, ms |",
        "| hook / spatial / pair |",  # the Hardswish terms
        "| captured / spatial / channel vector |",  # small BatchNorms
        # the squeeze-excitation gates' closed forms, among others
        "| captured / flat / one dot product for all |",
    ):
        assert row in printed, (row, printed)
    assert originals == _what_the_script_wraps()
