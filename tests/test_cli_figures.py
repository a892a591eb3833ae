"""Figure and model options of compare/decompose/demo: --param, --overlay, --dpi, --cmap,
--percentile, --model module:function and timm/NAME, 16-bit images, the demo's CPU budget."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from captum_fullgrad import figures
from captum_fullgrad.cli import _inputs, demo
from captum_fullgrad.datasets import synthetic_shapes
from captum_fullgrad.methods import register_method, unregister_method
from tests.conftest import assert_bad_input
from tests.conftest import run_cli as run


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path_factory, one_cpu_thread):
    """An empty torch hub and Hugging Face cache; no download is ever attempted."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    monkeypatch.setenv("CAPTUM_FULLGRAD_OFFLINE", "1")
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf"))
    )
    yield


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """One held-out shape scene as an 8-bit PNG."""
    images, _, _ = synthetic_shapes(1, seed=321)
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


@pytest.fixture()
def recorder():
    """A registered method that records the parameters it is called with."""
    calls = []

    def record(model, inputs, target, *, scale: float = 1.0, label: str = "x"):
        calls.append({"scale": scale, "label": label})
        return torch.ones(inputs.shape[0], 1, *inputs.shape[2:]) * scale

    register_method("recorder", record, label="Recorder")
    yield calls
    unregister_method("recorder")


def compare(scene, out, *extra):
    return (
        "compare",
        "--model",
        "shapes",
        "--images",
        scene,
        "--out",
        out,
        "--no-progress",
        *extra,
    )


def test_param_reaches_the_method(capsys, scene, tmp_path, recorder):
    status, _, err = run(
        capsys,
        *compare(scene, tmp_path / "grid.png", "--methods", "recorder,gradcam"),
        "--param",
        "recorder.scale=2.5",
        "--param",
        "Recorder.label=some text",
    )
    assert status == 0, err
    assert recorder == [{"scale": 2.5, "label": "some text"}]


def test_param_of_a_builtin_method_is_stated_in_the_figure(capsys, scene, tmp_path, monkeypatch):
    seen = {}
    original = figures.comparison_grid

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(figures, "comparison_grid", spy)
    status, _, err = run(
        capsys,
        *compare(scene, tmp_path / "grid.png", "--methods", "integrated_gradients"),
        "--param",
        "integrated_gradients.n_steps=3",
    )
    assert status == 0, err
    (method,) = seen["methods"]
    assert method.parameters["n_steps"] == 3
    assert seen["note"] == "Integrated gradients: n_steps=3."


@pytest.mark.parametrize(
    "param, match",
    [
        ("integrated_gradients.nope=1", "nope"),  # unknown key
        ("integrated_gradients.n_steps=0", "n_steps"),  # bad value
        ("no_such_method.n_steps=3", "no_such_method"),  # unknown method
        ("smoothgrad.nt_samples=3", "not among the selected"),  # method not selected
        ("integrated_gradients", "METHOD.KEY=VALUE"),  # not KEY=VALUE
        ("n_steps=3", "METHOD.KEY=VALUE"),  # no method
    ],
)
def test_bad_params_exit_2(capsys, scene, tmp_path, param, match):
    argv = compare(scene, tmp_path / "grid.png", "--methods", "integrated_gradients,gradcam")
    assert_bad_input(capsys, *argv, "--param", param, match=match)
    assert not (tmp_path / "grid.png").exists()


def test_figure_options_reach_the_figure(capsys, scene, tmp_path, monkeypatch):
    seen = {}
    original = figures.comparison_grid

    def spy(*args, **kwargs):
        seen.update(kwargs)
        seen["figure"] = original(*args, **kwargs)
        return seen["figure"]

    monkeypatch.setattr(figures, "comparison_grid", spy)
    out = tmp_path / "grid.png"
    argv = compare(scene, out, "--methods", "fullgrad,gradcam", "--overlay", "--alpha", "0.3")
    status, _, err = run(capsys, *argv, "--dpi", "50", "--cmap", "viridis", "--percentile", "95")
    assert status == 0, err
    assert seen["overlay_maps"] is True and seen["alpha"] == 0.3
    assert seen["cmap"] == "viridis" and seen["percentile"] == 95.0
    width, height = seen["figure"].get_size_inches() * 50
    pixels = matplotlib.image.imread(out)
    assert abs(pixels.shape[1] - width) <= 1 and abs(pixels.shape[0] - height) <= 1
    for option, value in [
        ("--cmap", "no_such_map"),
        ("--percentile", "0"),
        ("--alpha", "1.5"),
        ("--dpi", "0"),
    ]:
        assert_bad_input(capsys, *compare(scene, out, option, value), match=option)


def test_decompose_takes_the_figure_options(capsys, scene, tmp_path):
    out = tmp_path / "decomposition.png"
    status, _, err = run(
        capsys,
        "decompose", "--model", "shapes", "--image", scene, "--out", out,
        "--overlay", "--dpi", "40", "--percentile", "99", "--cmap", "PuOr",
    )  # fmt: skip
    assert status == 0, err
    assert matplotlib.image.imread(out).shape[1] == round(3 * 2.0 * 40)  # 2 rows of 3 panels


def test_sixteen_bit_png_goes_through_compare(capsys, tmp_path):
    images, _, _ = synthetic_shapes(1, seed=5)
    grey = (images[0].mean(0) * 65535).round().to(torch.int32).numpy().astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    status, _, err = run(capsys, *compare(path, tmp_path / "grid.png", "--methods", "fullgrad"))
    assert status == 0, err


def write_factory_module(directory: Path) -> None:
    (directory / "my_nets.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from torchvision.transforms._presets import ImageClassification

            from captum_fullgrad.testing import randomize_parameters_


            def net():
                model = nn.Sequential(
                    nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
                )
                return randomize_parameters_(model, seed=1)


            def net_with_transform():
                return net(), ImageClassification(crop_size=40, resize_size=44), ["a", "b", "c"]


            def not_a_model():
                return 42
            """
        )
    )


def test_model_module_function(capsys, scene, tmp_path, monkeypatch):
    write_factory_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = _inputs.load_model("my_nets:net_with_transform", "DEFAULT", torch.device("cpu"))
    assert loaded.input_size == (40, 40) and loaded.categories == ["a", "b", "c"]
    bare = _inputs.load_model("my_nets:net", "DEFAULT", torch.device("cpu"))
    assert bare.categories == ["0", "1", "2"] and bare.input_size == (224, 224)
    for spec in ("my_nets:net", "my_nets:net_with_transform"):
        status, _, err = run(
            capsys,
            "compare", "--model", spec, "--images", scene, "--out", tmp_path / "grid.png",
            "--methods", "fullgrad,gradcam",
        )  # fmt: skip
        assert status == 0, err
    status, _, err = run(
        capsys,
        "decompose", "--model", "my_nets:net_with_transform", "--image", scene,
        "--out", tmp_path / "decomposition.png",
    )  # fmt: skip
    assert status == 0, err
    state = tmp_path / "state.pt"
    torch.save(loaded.model.state_dict(), state)
    from_file = _inputs.load_model("my_nets:net_with_transform", str(state), torch.device("cpu"))
    assert from_file.weights == str(state)
    for spec, match in [
        ("my_nets:not_a_model", "expected an nn.Module"),
        ("my_nets:missing", "cannot load model factory"),
        ("no_such_module_here:net", "cannot load model factory"),
    ]:
        argv = ("compare", "--model", spec, "--images", scene, "--out", tmp_path / "g.png")
        assert_bad_input(capsys, *argv, match=match)
    argv = ("compare", "--model", "my_nets:net", "--weights", "random", "--images", scene)
    assert_bad_input(capsys, *argv, "--out", tmp_path / "g.png", match="--weights random")


def test_timm_model_through_compare(capsys, scene, tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "grid.png"
    status, _, err = run(
        capsys,
        "compare", "--model", "timm/resnet10t", "--weights", "random", "--images", scene,
        "--out", out, "--methods", "fullgrad,gradcam",
    )  # fmt: skip
    assert status == 0, err
    err = assert_bad_input(
        capsys,
        *("compare", "--model", "timm/resnet10t", "--images", scene, "--out", out),
        match="huggingface-cli download",
    )
    assert "--weights random" in err and "load_model" not in err


def test_demo_imagenet_grid_uses_cpu_parameters_and_states_them(
    tmp_path, monkeypatch, cached_vgg16_bn
):
    from captum_fullgrad.cli import _figure_options

    seen = {}
    original = figures.attribution_maps

    def spy(model, inputs, targets, methods, **kwargs):
        seen["methods"] = methods
        return original(model, inputs, targets, methods, **kwargs)

    monkeypatch.setattr(figures, "attribution_maps", spy)
    methods = _figure_options.methods(
        "integrated_gradients,smoothgrad,gradcam", ["smoothgrad.noise=0.1"]
    )
    section, path = demo._imagenet_section(tmp_path, torch.device("cpu"), methods, False, 4, False)
    used = {m.name: m.parameters for m in seen["methods"]}
    assert used["integrated_gradients"]["n_steps"] == 8
    assert used["smoothgrad"]["nt_samples"] == 8 and used["smoothgrad"]["noise"] == 0.1
    assert "n_steps=8" in section and "nt_samples=8" in section
    assert path == tmp_path / "vgg16_bn_grid.png" and path.is_file()
    # --param wins over the CPU budget; a GPU keeps the registered (paper) defaults.
    chosen = demo._device_parameters(
        _figure_options.methods("integrated_gradients", ["integrated_gradients.n_steps=20"]),
        torch.device("cpu"),
    )
    assert chosen[0].parameters["n_steps"] == 20
    on_gpu = demo._device_parameters(methods, torch.device("cuda"))
    assert on_gpu[0].parameters["n_steps"] == methods[0].defaults["n_steps"]
