"""The benchmark harness runs and reports every method (timings are not tested)."""

from __future__ import annotations

import json

import pytest
from torch import nn

from captum_fullgrad.benchmark import DEFAULT_BENCH_METHODS, main, run_benchmark, write_results
from captum_fullgrad.testing import randomize_parameters_


def tiny_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    return randomize_parameters_(model).eval()


def test_every_method_is_reported_with_a_ratio_to_saliency(tmp_path):
    result = run_benchmark(
        tiny_cnn(), "tiny", batch_sizes=(1,), input_size=32, repeats=2, warmup=1, noise_samples=2
    )
    measured = {m.method for m in result.measurements if m.repeats}
    expected = set(DEFAULT_BENCH_METHODS)
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        expected.discard("pytorch_grad_cam_fullgrad")
    assert measured == expected
    saliency = next(m for m in result.measurements if m.method == "saliency")
    assert saliency.ratio_to_saliency == 1.0
    for m in result.measurements:
        assert m.median_s > 0 and m.images_per_s > 0 and m.ratio_to_saliency > 0
    fullgrad = next(m for m in result.measurements if m.method == "fullgrad")
    assert fullgrad.completeness_gap is not None and fullgrad.completeness_gap < 1e-3
    paths = write_results(result, tmp_path, "bench")
    data = json.loads(paths[0].read_text())
    assert data["meta"]["model"] == "tiny" and len(data["measurements"]) == len(result.measurements)
    assert "| fullgrad | 1 |" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slow_methods_are_skipped_and_marked_at_large_batches():
    result = run_benchmark(
        tiny_cnn(),
        "tiny",
        methods=["fullgrad", "integrated_gradients"],
        batch_sizes=(1, 3),
        input_size=32,
        repeats=1,
        warmup=0,
        slow_methods_max_batch=1,
    )
    rows = {(m.method, m.batch_size): m for m in result.measurements}
    assert rows[("integrated_gradients", 1)].repeats == 1
    assert (
        rows[("integrated_gradients", 3)].repeats == 0
        and "skipped" in rows[("integrated_gradients", 3)].note
    )
    assert rows[("saliency", 3)].repeats == 1  # the baseline is always measured


def test_command_line_entry_point(tmp_path, capsys):
    code = main(
        [
            "--model",
            "resnet18",
            "--methods",
            "fullgrad",
            "--batch-sizes",
            "1",
            "--input-size",
            "32",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--no-progress",
            "--threads",  # docs/cli.md says python -m captum_fullgrad.benchmark takes it
            "1",
        ]
    )
    assert code == 0
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").exists()
    assert main(["--methods", "nonsense", "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["--batch-sizes", "0", "--out", str(tmp_path), "--device", "cpu"]) == 2


def test_bench_subcommand(tmp_path, capsys):
    from captum_fullgrad.cli import main as cli_main

    code = cli_main(
        [
            "bench",
            "--model",
            "resnet18",
            "--methods",
            "saliency,fullgrad",
            "--batch-sizes",
            "1",
            "--input-size",
            "32",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0 and (tmp_path / "bench.md").exists()
    assert (
        cli_main(["bench", "--model", "not_a_model", "--out", str(tmp_path), "--device", "cpu"])
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown model" in err and "Traceback" not in err


def test_channels_last_runs_every_method_in_that_format():
    result = run_benchmark(
        tiny_cnn(),
        "tiny",
        methods=["fullgrad", "fullgrad_traced", "gradcam"],
        batch_sizes=(2,),
        input_size=32,
        repeats=1,
        warmup=1,
        channels_last=True,
    )
    assert result.meta["channels_last"] is True
    assert "channels-last" in result.to_markdown()
    assert {m.method for m in result.measurements if m.repeats} == {
        "saliency",
        "fullgrad",
        "fullgrad_traced",
        "gradcam",
    }


def test_command_line_helpers_keep_their_old_names():
    import argparse

    from captum_fullgrad import benchmark
    from captum_fullgrad.cli import bench

    assert benchmark.bench_arguments is bench.add_arguments
    assert benchmark.bench_from_args is bench.bench_from_args
    assert benchmark.parse_int_list("1,16", "--batch-sizes") == [1, 16]
    parser = argparse.ArgumentParser()
    benchmark.bench_arguments(parser)
    # The CLI states the default without importing torch: it must be the benchmark's.
    assert parser.parse_args([]).noise_samples == benchmark.DEFAULT_NOISE_SAMPLES


def test_unknown_and_repeated_methods_are_named():
    from captum_fullgrad.benchmark import resolve_bench_methods

    with pytest.raises(ValueError, match="unknown method 'magic'; known: forward, saliency"):
        resolve_bench_methods("fullgrad,magic")
    with pytest.raises(ValueError, match="repeated: fullgrad"):
        resolve_bench_methods(["fullgrad", "FullGrad"])
    entries = resolve_bench_methods("forward, Integrated-Gradients")
    assert entries[0] == "forward" and entries[1].name == "integrated_gradients"
