"""``captum-fullgrad evaluate --maps STORE``: the maps of a store written by ``attribute``
give the metrics that read maps the same values as maps computed by evaluate itself; the
stored maps are really used (an altered store changes the scores); a store of another run
is refused, naming what differs; images the store lacks are reported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("zarr")

from captum_fullgrad import cli  # noqa: E402
from captum_fullgrad.dataset_attribution import build_parser, run_job  # noqa: E402
from captum_fullgrad.store import AttributionStore  # noqa: E402

N = 6
METHODS = "fullgrad,gradcam"
# Metrics that only read maps (the suite's cheapest ones).
READING = "localisation,pixel_perturbation"


def _attribute(out, *extra):
    argv = [
        "--model", "shapes", "--images", f"synthetic:{N}", "--methods", METHODS,
        "--target", "label", "--block-size", "4", "--num-workers", "0", "--device", "cpu",
        "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip
    summary = run_job(build_parser().parse_args(argv))
    assert summary["complete"]
    return out


def _evaluate(out, *extra):
    argv = [
        "evaluate", "--out", str(out), "--fast", "--no-controls", "--metrics", READING,
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip
    return cli.main(argv)


def _results(out):
    return json.loads((out / "results.json").read_text())


def _means(results):
    return {
        (method, key): value["mean"]
        for method, row in results["results"].items()
        for key, value in row.items()
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _attribute(tmp_path_factory.mktemp("store") / "maps.zarr")


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """evaluate computing the maps itself."""
    out = tmp_path_factory.mktemp("computed")
    assert _evaluate(out, "--n", str(N), "--methods", METHODS) == 0
    return _results(out)


def test_stored_maps_give_the_values_of_computed_maps(store, computed, tmp_path, capsys):
    assert _evaluate(tmp_path, "--maps", str(store)) == 0
    results = _results(tmp_path)
    assert list(results["results"]) == ["fullgrad", "gradcam"]  # the store's methods
    assert results["meta"]["n"] == N
    a, b = _means(results), _means(computed)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    meta = results["meta"]
    assert meta["maps_given"] == ["fullgrad", "gradcam"] and meta["maps_recomputed_by"] == []
    assert meta["maps_store"]["path"] == str(store) and meta["maps_store"]["excluded"] == []
    assert "--maps" in meta["command"]
    out = capsys.readouterr().out
    assert f"maps of fullgrad, gradcam read from {store}" in out
    assert "read from the attribution store" in (tmp_path / "results.md").read_text()


def test_altered_store_changes_the_scores(store, computed, tmp_path):
    # Guards against maps being recomputed behind the store's back: flipped FullGrad maps
    # must move FullGrad's localisation scores, and leave Grad-CAM's alone.
    altered = tmp_path / "altered.zarr"
    shutil.copytree(store, altered)
    maps = AttributionStore(altered, mode="r+")._group["fullgrad"]
    maps[:] = np.asarray(maps[:])[:, ::-1, ::-1]
    assert _evaluate(tmp_path / "out", "--maps", str(altered)) == 0
    a, b = _means(_results(tmp_path / "out")), _means(computed)
    assert a[("fullgrad", "relevance_mass")] != pytest.approx(b[("fullgrad", "relevance_mass")])
    assert a[("gradcam", "relevance_mass")] == pytest.approx(b[("gradcam", "relevance_mass")])


def test_the_first_n_images_of_a_larger_store(store, computed, tmp_path):
    assert _evaluate(tmp_path, "--maps", str(store), "--n", "4", "--methods", "gradcam") == 0
    results = _results(tmp_path)
    assert results["meta"]["n"] == 4 and list(results["results"]) == ["gradcam"]
    assert results["meta"]["maps_store"]["images_used"] == 4


def test_metrics_that_recompute_maps_say_so(store, tmp_path, capsys):
    code = _evaluate(
        tmp_path, "--maps", str(store), "--metrics", "localisation,sanity", "--sanity-n", "2"
    )
    assert code == 0
    assert _results(tmp_path)["meta"]["maps_recomputed_by"] == ["sanity"]
    assert "sanity recomputed maps (they call the methods again)" in capsys.readouterr().out
    assert "called the methods again" in (tmp_path / "results.md").read_text()


def test_images_the_store_lacks_are_reported(store, computed, tmp_path, capsys):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    group = AttributionStore(partial, mode="r+")._group
    group["valid"][4] = False
    group["errors"][1] = "cannot decode"
    group["valid"][1] = False
    assert _evaluate(tmp_path / "out", "--maps", str(partial)) == 0
    meta = _results(tmp_path / "out")["meta"]
    assert meta["n"] == N - 2
    assert meta["maps_store"]["excluded"] == [
        {"id": "synthetic:10000:1", "reason": "cannot decode"},
        {"id": "synthetic:10000:4", "reason": "not written (the attribute job is unfinished)"},
    ]
    out = capsys.readouterr().out
    assert "2 image(s) excluded" in out and "synthetic:10000:1: cannot decode" in out


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--weights", "random"], "weights: store has 'DEFAULT'"),
        (["--data-seed", "3"], "data_seed: store has 10000"),
        (["--n", str(N + 1)], "n_images: store has 6"),
        (["--param", "fullgrad.postprocess=neurips2019"], "method_parameters \\(fullgrad\\)"),
        (["--methods", "fullgrad,saliency"], "holds no maps of saliency"),
    ],
)
def test_a_store_of_another_run_is_refused(store, tmp_path, capsys, extra, named):
    assert _evaluate(tmp_path, "--maps", str(store), *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("captum-fullgrad: error: --maps")
    assert __import__("re").search(named, err), err
    assert not (tmp_path / "results.json").exists()


def test_a_store_of_the_predicted_class_is_refused(tmp_path, capsys):
    store = _attribute(tmp_path / "pred.zarr", "--target", "pred", "--methods", "gradcam")
    assert _evaluate(tmp_path / "out", "--maps", str(store)) == 2
    assert "target: store has 'pred', evaluation needs 'label'" in capsys.readouterr().err


def test_no_store_at_the_path(tmp_path, capsys):
    assert _evaluate(tmp_path / "out", "--maps", str(tmp_path / "nothing.zarr")) == 2
    assert "--maps: no attribution store" in capsys.readouterr().err
