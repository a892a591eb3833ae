"""The evaluation suite and its command: schema, Markdown, plots, CLI exit statuses.

Tiny runs only: 6 generated scenes, a few methods plus the three controls, the fast
settings (few steps, samples and removal levels).
"""

import argparse
import json

import pytest
import torch

from captum_fullgrad.evaluation import (
    CONTROL_NAMES,
    EvaluationSettings,
    command,
    evaluate,
    write_report,
)
from tests.evaluation._tiny import METHODS, N

PLOTS = ("pixel_perturbation.png", "road.png", "sanity.png")


def test_methods_and_controls_in_order(report):
    assert report.methods == METHODS + list(CONTROL_NAMES)
    kinds = {m: report.meta["methods"][m]["kind"] for m in report.methods}
    assert [m for m, k in kinds.items() if k == "control"] == list(CONTROL_NAMES)
    assert report.meta["methods"]["fullgrad"]["parameters"]["postprocess"] == "eq4"


def test_json_schema(report):
    doc = json.loads(report.to_json())
    assert set(doc) == {"meta", "metrics", "results", "curves"}
    meta = doc["meta"]
    for key in (
        "model",
        "n",
        "seed",
        "torch",
        "captum",
        "date",
        "wall_time_s",
        "timings_s",
        "accuracy",
        "subsets",
        "settings",
    ):
        assert key in meta, key
    assert meta["model"] == "tiny" and meta["n"] == N and meta["seed"] == 0
    assert meta["subsets"] == {
        "localisation": N,
        "pixel_perturbation": N,
        "road": N,
        "infidelity": N,
        "sensitivity": 2,
        "sanity": 2,
    }
    assert meta["wall_time_s"] > 0
    expected = {
        "pointing_game",
        "pointing_game_0px",
        "relevance_mass",
        "relevance_rank",
        "pixel_perturbation_least_area",
        "pixel_perturbation_most_area",
        "road_morf_accuracy",
        "road_lerf_accuracy",
        "road_morf_probability",
        "road_lerf_probability",
        "road_gap",
        "sanity_spearman_abs",
        "sanity_ssim",
        "infidelity",
        "sensitivity_max",
    }
    expected |= {
        f"pixel_perturbation_{order}@{k}" for order in ("least", "most") for k in ("1", "5", "10")
    }
    assert set(doc["metrics"]) == expected
    assert list(doc["results"]) == report.methods
    for method, metrics in doc["results"].items():
        assert set(metrics) == expected, method
        for key, value in metrics.items():
            assert set(value) == {"mean", "low", "high", "n"}
            assert value["n"] == doc["metrics"][key]["n"]
            assert value["low"] - 1e-12 <= value["mean"] <= value["high"] + 1e-12, (
                method,
                key,
                value,
            )
    assert doc["metrics"]["sanity_ssim"]["n"] == 2 and doc["metrics"]["pointing_game"]["n"] == N
    assert doc["metrics"]["pointing_game"]["higher_is_better"] is True
    assert doc["metrics"]["infidelity"]["higher_is_better"] is False
    curves = doc["curves"]["fullgrad"]
    assert curves["pixel_perturbation_least"]["x"] == [1.0, 5.0, 10.0]
    assert curves["road_morf_accuracy"]["x"] == [20.0, 50.0, 80.0]
    assert len(curves["sanity_ssim"]["y"]) == len(meta["sanity_layers"]) + 1


def test_values_in_range_and_controls_fail_sanity(report):
    for method in report.methods:
        r = report.results[method]
        for key in (
            "pointing_game",
            "relevance_mass",
            "relevance_rank",
            "road_morf_accuracy",
            "road_lerf_probability",
        ):
            assert 0.0 <= r[key].mean <= 1.0
    # The controls ignore the model: randomising it leaves their maps unchanged.
    for control in CONTROL_NAMES:
        assert report.results[control]["sanity_spearman_abs"].mean == pytest.approx(1.0)
        assert report.results[control]["sanity_ssim"].mean == pytest.approx(1.0)
    # Step 0 re-runs a deterministic method on an intact copy: similarity 1.
    assert report.curves["fullgrad"]["sanity_spearman_abs"]["y"][0] == pytest.approx(1.0)


def test_markdown_ranks_with_directions(report):
    text = report.to_markdown()
    assert text.startswith("# Saliency evaluation: model `tiny`")
    assert "## Overview" in text and "## Where `fullgrad` wins and loses" in text
    assert "| method | Pointing game ↑ (n=6) |" in text
    for key in (
        "Pointing game: higher is better (n = 6)",
        "Infidelity: lower is better (n = 6)",
        "Sanity: SSIM: lower is better (n = 2)",
    ):
        assert f"### {key}" in text
    for method in report.methods:
        assert f"`{method}`" in text
    assert "**" in text and "Control: Sobel edges" in text
    # Every row of a table has as many cells as its header (no stray '|' in labels).
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.replace("\\|", "").count("|"))
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 10
    assert all(len(set(table)) == 1 for table in tables)


def test_ranking_and_paired_comparison(report):
    ranking = report.ranking("relevance_mass")
    means = [value.mean for _, value, _ in ranking]
    assert means == sorted(means, reverse=True)
    assert ranking[0][2] == 1
    ranking = report.ranking("infidelity")
    assert [v.mean for _, v, _ in ranking] == sorted(v.mean for _, v, _ in ranking)
    same = report.compare("fullgrad", "fullgrad", "relevance_mass")
    assert same.mean == same.low == same.high == 0.0 and same.n == N


def test_write_report(report, tmp_path):
    written = write_report(report, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(["results.json", "results.md", *PLOTS])
    for name in PLOTS:
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) < 400_000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["n"] == N
    figures = report.plot()
    assert set(figures) == {"pixel_perturbation", "road", "sanity"}
    assert all(len(f.axes) == 2 for f in figures.values())


def test_oracle_map_wins_localisation_and_results_are_deterministic(model, data):
    images, labels, masks = data

    def oracle(model, inputs, target):
        # The object mask of each input image, found by content.
        rows = [int((images == x).flatten(1).all(1).nonzero()[0]) for x in inputs]
        return masks[rows][:, None].float()

    kwargs = dict(
        methods=[("oracle", oracle), "saliency"],
        settings=EvaluationSettings.fast(
            n_road=0, n_infidelity=0, n_sensitivity=0, n_sanity=0, n_bootstrap=50
        ),
        progress=False,
    )
    first = evaluate(model, images, labels, masks, **kwargs)
    assert first.results["oracle"]["relevance_mass"].mean == pytest.approx(1.0)
    assert first.results["oracle"]["pointing_game"].mean == 1.0
    assert first.best("relevance_rank") == "oracle"
    assert "road_gap" not in first.metrics and "sanity_ssim" not in first.metrics
    second = evaluate(model, images, labels, masks, **kwargs)
    assert first.to_dict()["results"] == second.to_dict()["results"]


def test_bad_arguments(model, data):
    images, labels, masks = data
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(model, images, labels, masks, methods=["nope"], progress=False)
    with pytest.raises(ValueError, match="masks must have shape"):
        evaluate(model, images, labels, masks[:3], methods=["saliency"], progress=False)
    with pytest.raises(ValueError, match="repeated"):
        evaluate(model, images, labels, masks, methods=["saliency", "saliency"], progress=False)


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser(prog="captum-fullgrad")
    subparsers = parser.add_subparsers(dest="command")
    command.add_parser(subparsers)
    return parser.parse_args(["evaluate", *argv])


def test_command_runs_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "eval"
    args = _parse(
        [
            "--n", str(N), "--out", str(out), "--methods", "fullgrad,gradcam", "--fast",
            "--sanity-n", "2", "--sensitivity-n", "2", "--no-progress", "--threads", "1",
            "--param", "gradcam.interpolate_mode=bicubic",
        ]
    )  # fmt: skip
    assert args._run is command.run
    assert command.run(args) == 0
    assert "results.json" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["results"]) == ["fullgrad", "gradcam", *CONTROL_NAMES]
    meta = doc["meta"]
    assert (
        meta["model"] == "shapes"
        and meta["n"] == N
        and meta["data_seed"] == 10_000
        and meta["fast"] is True
    )
    assert meta["methods"]["gradcam"]["parameters"]["interpolate_mode"] == "bicubic"
    assert meta["accuracy"] > 0.8  # the bundled weights
    assert "--fast" in meta["command"] and "--sanity-n 2" in meta["command"]
    assert (out / "results.md").read_text().startswith("# Saliency evaluation: model `shapes`")
    for name in PLOTS:
        assert (out / name).is_file()
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vgg16"], "only generated for: shapes"),
        (["--model", "no_such_model"], "unknown model"),
        (["--methods", "fullgrad,nope"], "unknown method"),
        (
            ["--methods", "fullgrad", "--param", "gradcam.interpolate_mode=nearest"],
            "not in --methods",
        ),
        (["--param", "integrated_gradients.n_stepz=3"], "no parameter 'n_stepz'"),
        (["--metrics", "road,nope"], "--metrics: unknown metric(s) nope"),
        (["--methods", "fullgrad,sobel_edges,sobel_edges"], "repeated: sobel_edges"),
    ],
)
def test_command_bad_input_exits_2(argv, message, tmp_path, capsys):
    args = _parse([*argv, "--n", "2", "--out", str(tmp_path / "x"), "--no-progress"])
    assert command.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("captum-fullgrad: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_command_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert command.run(_parse(["--n", "2", "--out", str(target), "--no-progress"])) == 2
    assert "not a directory" in capsys.readouterr().err


def test_module_entry_point_shares_the_cli_error_path(tmp_path, capsys):
    """``python -m captum_fullgrad.evaluation.command`` (the docs show it) runs the CLI's
    evaluate subcommand: same options, same one-line errors and exit statuses."""
    out = tmp_path / "x"
    assert command.main(["--model", "vgg16", "--n", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("captum-fullgrad: error: --model 'vgg16'")
    assert command.main(["--n", "0"]) == 2
    assert "--n" in capsys.readouterr().err
    assert not out.exists()
