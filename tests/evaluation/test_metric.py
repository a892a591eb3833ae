"""The metric registry: declaration, registration, and everything derived from it.

The worked example of docs/extending.md runs here as written; a toy metric registered by
a test must reach results.json, results.md, the settings and the command's options.
"""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from captum_fullgrad.cli import evaluate as cli_evaluate
from captum_fullgrad.evaluation import (
    EvaluationSettings,
    Images,
    Metric,
    MetricOutput,
    Score,
    command,
    evaluate,
    get_metric,
    register_metric,
    registered_metrics,
    unregister_metric,
)
from captum_fullgrad.evaluation.run import select_metrics
from tests.evaluation._tiny import N

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
BUILT_IN = ["localisation", "pixel_perturbation", "road", "sanity", "infidelity", "sensitivity"]


def _doc_example() -> str:
    text = DOC.read_text()
    section = text.split("## A metric", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture
def doc_metric():
    namespace: dict = {}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)
    yield namespace
    unregister_metric("sparsity")


@pytest.fixture
def toy():
    """A subset metric: the mean of each map, on the first images."""

    def compute(ctx, name, explain, maps):
        values = ctx.head(maps).flatten(1).mean(1)
        return MetricOutput({"toy_mean": values}, meta={"toy": {name: 1}})

    metric = register_metric(
        Metric(
            key="toy",
            label="toy",
            scores=(Score("toy_mean", "Toy mean", False, "mean of the map", "none"),),
            compute=compute,
            images=Images(subset=True, default=3, fast=2),
            meta={"toy": {}},
        )
    )
    yield metric
    unregister_metric("toy")


def test_built_in_metrics_in_report_order():
    assert [m.key for m in registered_metrics()] == BUILT_IN
    assert [m.key for m in registered_metrics() if m.images.subset] == BUILT_IN[2:]
    assert get_metric("road").option == "--road-n" and get_metric("road").setting == "n_road"
    assert get_metric("sanity").recomputes_maps and not get_metric("infidelity").recomputes_maps
    assert EvaluationSettings().images("road") == 50 and EvaluationSettings().images("sanity") == 16
    assert EvaluationSettings.fast().images("sanity") == 4
    assert EvaluationSettings().images("localisation") is None


def test_register_refuses_clashes():
    road = get_metric("road")
    with pytest.raises(ValueError, match="already registered"):
        register_metric(road)
    with pytest.raises(ValueError, match="identifier"):
        register_metric(Metric(key="no good", label="x", scores=(), compute=road.compute))
    clash = Metric(
        key="clash",
        label="x",
        scores=(get_metric("sanity").score_list(EvaluationSettings())[0],),
        compute=road.compute,
    )
    with pytest.raises(ValueError, match="already belong to 'sanity'"):
        register_metric(clash)
    with pytest.raises(KeyError, match="no metric 'nope'"):
        unregister_metric("nope")
    with pytest.raises(ValueError, match="unknown metric"):
        select_metrics(["road", "nope"])
    with pytest.raises(ValueError, match="repeated"):
        select_metrics(["road", "road"])
    with pytest.raises(ValueError, match="takes no image count"):
        EvaluationSettings().with_images({"localisation": 3})


def test_docs_example_reaches_results_json_and_markdown(doc_metric, model, data):
    gini = doc_metric["gini"]
    flat = torch.ones(2, 1, 8, 8)
    spike = torch.zeros(2, 1, 8, 8)
    spike[:, 0, 3, 4] = 5.0
    assert torch.allclose(gini(flat), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(gini(spike), torch.full((2,), 1 - 1 / 64, dtype=torch.float64))
    assert torch.equal(gini(torch.zeros(1, 1, 4, 4)), torch.zeros(1, dtype=torch.float64))
    assert registered_metrics()[-1].key == "sparsity"

    images, labels, masks = data
    report = evaluate(
        model,
        images,
        labels,
        masks,
        methods=["saliency", "gradcam"],
        controls=False,
        metrics=["localisation", "sparsity"],
        settings=EvaluationSettings.fast(n_bootstrap=50),
        progress=False,
    )
    doc = json.loads(report.to_json())
    assert list(doc["metrics"])[-1] == "sparsity_gini"
    info = doc["metrics"]["sparsity_gini"]
    assert info["label"] == "Sparsity (Gini)" and info["higher_is_better"] is True
    assert info["n"] == N and info["group"] == "sparsity"
    assert doc["meta"]["subsets"] == {"localisation": N, "sparsity": N}
    assert set(doc["meta"]["timings_s"]) == {"maps", "localisation", "sparsity", "bootstrap"}
    for method in ("saliency", "gradcam"):
        value = doc["results"][method]["sparsity_gini"]
        assert 0.0 <= value["mean"] <= 1.0 and value["n"] == N
    text = report.to_markdown()
    assert "### Sparsity (Gini): higher is better (n = 6)" in text
    assert (
        "| Sparsity (Gini) ↑ (n=6) |"
        in text.splitlines()[text.splitlines().index("## Overview") + 2]
    )
    assert "Reference: Hurley & Rickard" in text


def test_subset_metric_images_settings_and_options(toy, model, data):
    assert EvaluationSettings().images("toy") == 3
    assert EvaluationSettings.fast().images("toy") == 2
    settings = EvaluationSettings.fast(n_bootstrap=50).with_images({"toy": 4, "road": 0})
    assert settings.images("toy") == 4 and settings.n_road == 0
    assert settings.to_dict()["n_toy"] == 4 and "n_images" not in settings.to_dict()

    images, labels, masks = data
    report = evaluate(
        model,
        images,
        labels,
        masks,
        methods=["saliency"],
        controls=False,
        metrics=["toy", "road"],
        settings=settings,
        progress=False,
    )
    assert report.meta["subsets"] == {"road": 0, "toy": 4}
    assert report.metrics["toy_mean"].n == 4 and report.per_example["saliency"][
        "toy_mean"
    ].shape == (4,)
    assert "road_gap" not in report.metrics
    assert report.meta["toy"] == {"saliency": 1}
    assert "Toy mean" in report.to_markdown()

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--toy-n", "5", "--road-n", "0", "--metrics", "toy,road"])
    assert cli_evaluate._image_counts(args) == {"road": 0, "toy": 5}
    line = cli_evaluate._command_line(args)
    assert "--road-n 0" in line and "--toy-n 5" in line and "--metrics toy,road" in line


def test_a_new_module_in_the_package_registers_itself(tmp_path, monkeypatch):
    """Adding a metric is one file: a module dropped into captum_fullgrad/evaluation is
    imported when the registry is first read (here a temporary directory joins the
    package's path, as a new file in the package would)."""
    import sys

    import captum_fullgrad.evaluation as package
    from captum_fullgrad.evaluation import metric as registry

    (tmp_path / "dropped_in.py").write_text(
        "from captum_fullgrad.evaluation import Metric, MetricOutput, Score, register_metric\n"
        "DROPPED = register_metric(Metric(key='dropped', label='dropped', scores=(Score("
        "'dropped_one', 'One', True, 'one', 'none'),), compute=lambda c, n, e, m: "
        "MetricOutput({'dropped_one': m.flatten(1)[:, 0] * 0 + 1})))\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert registered_metrics()[-1].key == "dropped"
    finally:
        unregister_metric("dropped")
        sys.modules.pop("captum_fullgrad.evaluation.dropped_in", None)
