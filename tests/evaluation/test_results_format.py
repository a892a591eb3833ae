"""The published formats stay put: results.json's keys and nesting, results.md's sections.

Pinned on the shared tiny run (tests/evaluation/conftest.py) and checked against the
published run (benchmarks/results/evaluation/results.json), so a refactor of the suite
that renames, drops or reshapes anything a reader of those files relies on fails here.
"""

import json
import re
from pathlib import Path

import pytest

from captum_fullgrad.evaluation import CONTROL_NAMES
from tests.evaluation._tiny import METHODS, N

PUBLISHED = Path(__file__).resolve().parents[2] / "benchmarks/results/evaluation/results.json"

META = {
    "model", "n", "seed", "torch", "captum", "captum_fullgrad", "python", "device", "threads",
    "date", "wall_time_s", "timings_s", "map_seconds_per_image", "accuracy", "target",
    "batch_size", "image_size", "subsets", "settings", "methods", "infidelity_noise_std",
    "sanity_layers", "sanity_undefined",
}  # fmt: skip
#: What ``captum-fullgrad evaluate`` adds to the metadata (evaluate(meta=...)).
COMMAND_META = {"data", "data_seed", "weights", "fast", "command", "environment", "git_commit"}
SETTINGS = [
    "pointing_tolerance", "perturbation_percentages", "perturbation_output", "road_percentages",
    "road_noise_std", "road_tol", "road_chunk", "n_road", "n_infidelity", "infidelity_samples",
    "infidelity_noise", "n_sensitivity", "sensitivity_samples", "sensitivity_radius", "n_sanity",
    "sanity_layers", "n_bootstrap", "confidence", "method_params",
]  # fmt: skip
SUBSETS = ["localisation", "pixel_perturbation", "road", "infidelity", "sensitivity", "sanity"]
LEVELS = ["1", "5", "10"]
SCORES = (
    ["pointing_game", "pointing_game_0px", "relevance_mass", "relevance_rank"]
    + ["pixel_perturbation_least_area"]
    + [f"pixel_perturbation_least@{k}" for k in LEVELS]
    + ["pixel_perturbation_most_area"]
    + [f"pixel_perturbation_most@{k}" for k in LEVELS]
    + ["road_morf_accuracy", "road_lerf_accuracy", "road_morf_probability"]
    + ["road_lerf_probability", "road_gap", "sanity_spearman_abs", "sanity_ssim"]
    + ["infidelity", "sensitivity_max"]
)
GROUPS = {
    "pointing": "localisation",
    "relevance": "localisation",
    "pixel": "pixel_perturbation",
    "road": "road",
    "sanity": "sanity",
    "infidelity": "captum",
    "sensitivity": "captum",
}
CURVES = {
    "pixel_perturbation_least", "pixel_perturbation_most", "road_morf_accuracy",
    "road_morf_probability", "road_lerf_accuracy", "road_lerf_probability",
    "sanity_spearman_abs", "sanity_ssim",
}  # fmt: skip
HEADLINE = [s for s in SCORES if "@" not in s]
LABELS = [
    "Pointing game", "Pointing game (0 px)", "Relevance mass", "Relevance rank",
    "Pixel pert., least first (area)", "Pixel pert., most first (area)", "ROAD MoRF accuracy",
    "ROAD LeRF accuracy", "ROAD MoRF probability", "ROAD LeRF probability", "ROAD LeRF − MoRF",
    "Sanity: Spearman (abs.)", "Sanity: SSIM", "Infidelity", "Max-sensitivity",
]  # fmt: skip


def _collapse(keys):
    """Score keys with the per-level suffix dropped (levels differ between runs)."""
    out = []
    for key in keys:
        key = re.sub(r"@.*", "@k", key)
        if key not in out:
            out.append(key)
    return out


@pytest.fixture(scope="module")
def doc(report):
    return json.loads(report.to_json())


def test_results_json_keys_and_nesting(doc):
    assert list(doc) == ["meta", "metrics", "results", "curves"]
    meta = doc["meta"]
    assert set(meta) == META
    assert meta["subsets"] == dict(zip(SUBSETS, [N, N, N, N, 2, 2]))
    assert list(meta["settings"]) == SETTINGS
    assert set(meta["timings_s"]) == {"maps", "bootstrap", *SUBSETS}
    assert list(meta["map_seconds_per_image"]) == METHODS + list(CONTROL_NAMES)
    assert list(meta["methods"]) == METHODS + list(CONTROL_NAMES)
    for entry in meta["methods"].values():
        assert set(entry) == {"label", "kind", "parameters"}
    assert isinstance(meta["infidelity_noise_std"], float)
    assert isinstance(meta["sanity_layers"], list) and meta["sanity_layers"]
    assert set(meta["sanity_undefined"]) == set(meta["methods"])
    assert list(doc["metrics"]) == SCORES
    for key, entry in doc["metrics"].items():
        assert list(entry) == [
            "label",
            "higher_is_better",
            "n",
            "group",
            "description",
            "reference",
        ]
        assert entry["group"] == GROUPS[key.split("_")[0]], key
        assert entry["description"] and entry["reference"], key
    assert [doc["metrics"][k]["label"] for k in HEADLINE] == LABELS
    assert list(doc["results"]) == METHODS + list(CONTROL_NAMES)
    for method, row in doc["results"].items():
        assert list(row) == SCORES, method
        assert all(list(v) == ["mean", "low", "high", "n"] for v in row.values())
    assert list(doc["curves"]) == METHODS + list(CONTROL_NAMES)
    for curves in doc["curves"].values():
        assert set(curves) == CURVES
        assert all(list(c) == ["x", "y"] for c in curves.values())


def test_published_results_have_the_same_structure(doc):
    published = json.loads(PUBLISHED.read_text())
    assert list(published) == list(doc)
    assert set(published["meta"]) == META | COMMAND_META
    assert list(published["meta"]["settings"]) == list(doc["meta"]["settings"])
    assert set(published["meta"]["subsets"]) == set(doc["meta"]["subsets"])
    assert _collapse(published["metrics"]) == _collapse(doc["metrics"])
    for key, entry in published["metrics"].items():
        assert list(entry) == list(doc["metrics"]["pointing_game"]), key
    method = next(iter(published["results"]))
    assert _collapse(published["results"][method]) == _collapse(doc["results"]["fullgrad"])
    assert set(published["curves"][method]) == CURVES


def test_markdown_sections_and_table_headers(report):
    lines = report.to_markdown().splitlines()
    headings = [line for line in lines if line.startswith("#")]
    ranked = [f"### {label}: " for label in LABELS]
    assert headings[:5] == [
        "# Saliency evaluation: model `tiny`",
        "## Overview",
        "### Rank per metric",
        "## Where `fullgrad` wins and loses",
        "## Rankings per metric",
    ]
    assert [h[: len(r)] for h, r in zip(headings[5:20], ranked)] == ranked
    assert [h.split(":")[0] for h in headings[20:]] == [
        "## Pixel perturbation per k, least salient first",
        "## Pixel perturbation per k, most salient first",
        "## Plots",
        "## Settings",
    ]
    headers = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("|---")]
    assert headers[0].startswith("| method | Pointing game ↑ (n=6) | Pointing game (0 px) ↑")
    assert headers[1].endswith("| Max-sensitivity ↓ | mean rank |")
    assert headers[2] == (
        "| metric | direction | n | `fullgrad` | rank | best other | its value "
        "| difference [95 % CI] | verdict |"
    )
    assert headers[3:18] == ["| rank | method | mean | 95 % CI |"] * 15
    assert headers[18:20] == ["| method | k = 1 % | k = 5 % | k = 10 % |"] * 2
    assert headers[20:] == ["| method | kind | parameters | seconds per image (maps) |"]
    images = [line for line in lines if line.startswith("![")]
    assert [re.search(r"\((\w+)\.png\)", line).group(1) for line in images] == [
        "pixel_perturbation",
        "road",
        "sanity",
    ]
    settings = lines[lines.index("## Settings") :]
    assert settings[2].startswith("Images per metric: localisation 6, pixel perturbation 6")
    assert settings[4].startswith("Metric settings: `pointing_tolerance` = 3,")
    assert settings[6].startswith("Sanity check: layers randomised in this order")
