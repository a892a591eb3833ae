"""The runner: maps from elsewhere (a store), metric selection, what a run records."""

import pytest
import torch

from captum_fullgrad.evaluation import EvaluationSettings, evaluate
from captum_fullgrad.methods import get_method


@pytest.fixture(scope="module")
def quick():
    return EvaluationSettings.fast(
        n_road=2, n_infidelity=0, n_sensitivity=0, n_sanity=2, n_bootstrap=50
    )


def test_given_maps_replace_the_maps_stage(model, data, quick):
    images, labels, masks = data
    kwargs = dict(methods=["saliency", "gradcam"], controls=False, settings=quick, progress=False)
    computed = evaluate(model, images, labels, masks, **kwargs)
    with torch.enable_grad():
        stored = get_method("saliency")(model, images, labels).detach()
    given = evaluate(model, images, labels, masks, maps={"saliency": stored[:, 0]}, **kwargs)
    assert given.to_dict()["results"] == computed.to_dict()["results"]
    assert set(given.meta["map_seconds_per_image"]) == {"gradcam"}
    # The sanity check recomputes maps: it still calls the method.
    assert "sanity_ssim" in given.metrics
    with pytest.raises(ValueError, match="not evaluated: fullgrad"):
        evaluate(model, images, labels, masks, maps={"fullgrad": stored}, **kwargs)
    with pytest.raises(ValueError, match="have shape"):
        evaluate(model, images, labels, masks, maps={"saliency": stored[:3]}, **kwargs)


def test_metric_selection(model, data, quick):
    images, labels, masks = data
    report = evaluate(
        model,
        images,
        labels,
        masks,
        methods=["saliency"],
        controls=False,
        metrics=["pixel_perturbation"],
        settings=quick,
        progress=False,
    )
    assert report.meta["subsets"] == {"pixel_perturbation": len(labels)}
    assert {k.partition("@")[0] for k in report.metrics} == {
        "pixel_perturbation_least_area",
        "pixel_perturbation_least",
        "pixel_perturbation_most_area",
        "pixel_perturbation_most",
    }
    assert set(report.plot()) == {"pixel_perturbation"}
    assert "sanity_layers" not in report.meta and "## Overview" in report.to_markdown()
