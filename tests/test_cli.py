"""The command line, run in-process: demo, compare, decompose, and every bad input."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from captum_fullgrad import cli
from captum_fullgrad.cli import _inputs, demo, main
from captum_fullgrad.datasets import synthetic_shapes
from captum_fullgrad.models import LoadedModel, ShapesVGG
from captum_fullgrad.testing import randomize_parameters_

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 200  # save_figure's default
PAGE_WIDTH_IN = 7.0  # the figures are laid out for a page width


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path_factory):
    """One CPU thread, and an empty torch hub cache: the demo never finds ImageNet weights."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    monkeypatch.setenv("CAPTUM_FULLGRAD_OFFLINE", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Two held-out shape scenes as PNG, and one as a JPEG of another size."""
    directory = tmp_path_factory.mktemp("images")
    images, _, _ = synthetic_shapes(3, seed=123)
    pixels = (images * 255).round().to(torch.uint8)
    torchvision.io.write_png(pixels[0], str(directory / "a.png"))
    torchvision.io.write_png(pixels[1], str(directory / "b.png"))
    larger = torch.nn.functional.interpolate(images[2:3], size=(80, 96), mode="bilinear")[0]
    torchvision.io.write_jpeg((larger * 255).round().to(torch.uint8), str(directory / "c.jpg"))
    return directory


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_bad_input(capsys, *argv, match=None):
    status, out, err = run(capsys, *argv)
    assert status == 2, (status, err)
    assert err.startswith("captum-fullgrad: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err + out
    if match is not None:
        assert match in err, err
    return err


def assert_png(path, size=None, dpi=DPI):
    """A PNG, of ``size`` pixels if given, else at most a page width at ``dpi``."""
    data = Path(path).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.shape[1] <= PAGE_WIDTH_IN * dpi + 1, pixels.shape
    if size is not None:
        height, width = size
        assert abs(pixels.shape[0] - height) <= 1 and abs(pixels.shape[1] - width) <= 1, (
            pixels.shape
        )
    return pixels


def decompose_argv(image, out, *extra):
    """``decompose`` on the bundled shapes model: the arguments every such test repeats."""
    return ("decompose", "--model", "shapes", "--image", image, "--out", out, *extra)


def files_in(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


# ---------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------


def test_help_everywhere(capsys):
    status, out, err = run(capsys, "--help")
    assert status == 0 and err == ""
    for command in ("demo", "compare", "decompose"):
        assert command in out
        status, sub, _ = run(capsys, command, "--help")
        assert status == 0 and "--out" in sub and "usage: captum-fullgrad " + command in sub
    assert [c.name for c in cli.COMMANDS][:3] == ["demo", "compare", "decompose"]
    assert "evaluate" in [c.name for c in cli.COMMANDS]


def test_no_command_is_bad_input(capsys):
    assert_bad_input(capsys, match="COMMAND")


# ---------------------------------------------------------------------------------------
# compare and decompose
# ---------------------------------------------------------------------------------------


def test_compare_writes_the_grid(capsys, image_dir, tmp_path):
    out = tmp_path / "figs" / "grid.png"
    status, stdout, err = run(
        capsys,
        "compare",
        "--model",
        "shapes",
        "--images",
        image_dir,
        "--out",
        out,
        "--methods",
        "fullgrad,gradcam",
        "--batch-size",
        "2",
        "--no-progress",
        "--threads",
        "1",
    )
    assert status == 0, err
    assert err == ""  # no warnings, no progress bar
    assert str(out) in stdout
    # 3 rows (a.png, b.png, c.jpg) of 3 columns, at most a page wide at 200 dpi; taller than wide
    pixels = assert_png(out)
    assert pixels.shape[1] >= 0.9 * PAGE_WIDTH_IN * DPI and pixels.shape[0] > 3 * 1.5 * DPI
    assert files_in(tmp_path) == ["figs", "figs/grid.png"]


def test_compare_pdf_default_methods_and_target(capsys, image_dir, tmp_path):
    out = tmp_path / "grid.pdf"
    status, _, err = run(
        capsys,
        "compare",
        "--model",
        "shapes",
        "--images",
        image_dir / "a.png",
        "--out",
        out,
        "--methods",
        "guided_backprop,fullgrad_bias",
        "--target",
        "3",
        "--device",
        "cpu",
    )
    assert status == 0, err
    assert out.read_bytes().startswith(b"%PDF-")


def test_decompose_writes_the_figure(capsys, image_dir, tmp_path):
    out = tmp_path / "decomposition.png"
    status, _, err = run(capsys, *decompose_argv(image_dir / "c.jpg", out, "--target", "1"))
    assert status == 0, err
    # 4 blocks + image + input term: 2 rows of 3 panels of 2 in, then the chart.
    pixels = assert_png(out)
    assert pixels.shape[1] == round(3 * 2.0 * DPI)
    assert files_in(tmp_path) == ["decomposition.png"]


# ---------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no output file
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad")
    (directory / "garbage.png").write_bytes(b"this is not an image")
    images, _, _ = synthetic_shapes(1, seed=1)
    torchvision.io.write_png((images[0] * 255).to(torch.uint8), str(directory / "whole.png"))
    data = (directory / "whole.png").read_bytes()
    (directory / "truncated.png").write_bytes(data[: len(data) // 2])
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "empty_dir").mkdir()
    (directory / "only_text").mkdir()
    (directory / "only_text" / "readme.txt").write_text("no images here")
    torch.save(ShapesVGG(widths=(8, 8)).state_dict(), directory / "other_architecture.pt")
    (directory / "garbage.pt").write_bytes(b"not a checkpoint")
    (directory / "a_file").write_text("a file, not a directory")
    return directory


def _bad_cases(bad):
    good = bad / "whole.png"
    compare = ["compare", "--model", "shapes", "--methods", "gradcam"]
    return {
        "corrupt image": (compare + ["--images", bad / "garbage.png"], "cannot read image"),
        "truncated image": (compare + ["--images", good, bad / "truncated.png"], "truncated.png"),
        "empty image file": (compare + ["--images", bad / "empty.jpg"], "cannot read image"),
        "missing image": (compare + ["--images", bad / "nope.png"], "does not exist"),
        "empty directory": (compare + ["--images", bad / "empty_dir"], "holds no PNG or JPEG"),
        "directory without images": (
            compare + ["--images", bad / "only_text"],
            "holds no PNG or JPEG",
        ),
        "unknown model": (
            ["compare", "--model", "vgg17", "--images", good],
            "unknown model 'vgg17'",
        ),
        "unknown method": (
            compare[:3] + ["--methods", "fullgrad,magic", "--images", good],
            "unknown method 'magic'",
        ),
        "mismatched weights": (
            compare + ["--weights", bad / "other_architecture.pt", "--images", good],
            "does not match the architecture",
        ),
        "corrupt weights": (
            compare + ["--weights", bad / "garbage.pt", "--images", good],
            "garbage.pt",
        ),
        "missing weights": (
            compare + ["--weights", bad / "missing.pt", "--images", good],
            "does not exist",
        ),
        "uncreatable out dir": (
            compare + ["--images", good],
            "is not a directory",
            bad / "a_file" / "sub" / "grid.png",
        ),
        "bad out extension": (
            compare + ["--images", good],
            "must end in .png or .pdf",
            bad / "grid.jpg",
        ),
        "target out of range": (compare + ["--images", good, "--target", "4"], "4 classes"),
        "bad batch size": (compare + ["--images", good, "--batch-size", "0"], "positive integer"),
        "bad device": (compare + ["--images", good, "--device", "tpu"], "--device"),
        "decompose corrupt image": (
            ["decompose", "--model", "shapes", "--image", bad / "garbage.png"],
            "cannot read image",
        ),
        "decompose directory": (
            ["decompose", "--model", "shapes", "--image", bad / "empty_dir"],
            "is a directory",
        ),
        "decompose unknown model": (
            ["decompose", "--model", "nope", "--image", good],
            "unknown model",
        ),
        "missing --out": (["decompose", "--model", "shapes", "--image", good], "--out"),
    }


BAD_CASES = list(_bad_cases(Path("/unused")))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(case, capsys, bad_files, tmp_path):
    argv, match, *out = _bad_cases(bad_files)[case]
    out_path = out[0] if out else tmp_path / "result.png"
    if "--out" not in [str(a) for a in argv] and case != "missing --out":
        argv = argv + ["--out", out_path]
    before = files_in(bad_files)
    assert_bad_input(capsys, *argv, match=match)
    assert not Path(out_path).exists()
    assert files_in(tmp_path) == []
    assert files_in(bad_files) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(capsys, image_dir, tmp_path):
    assert_bad_input(
        capsys,
        *decompose_argv(image_dir / "a.png", tmp_path / "x.png", "--device", "cuda"),
        match="CUDA is not available",
    )
    assert files_in(tmp_path) == []


def test_internal_errors_are_one_line_with_status_1(capsys, image_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr("captum_fullgrad.figures.decomposition_figure", boom)
    status, _, err = run(capsys, *decompose_argv(image_dir / "a.png", tmp_path / "x.png"))
    assert status == 1
    assert err.count("\n") == 1 and "internal error: RuntimeError: something broke" in err
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


def test_demo_small(capsys, tmp_path):
    out = tmp_path / "demo"
    status, stdout, err = run(
        capsys,
        "demo",
        "--out",
        out,
        "--n-images",
        "2",
        "--n-eval",
        "16",
        "--n-pointing",
        "4",
        "--batch-size",
        "4",
        "--pointing-methods",
        "fullgrad,fullgrad_bias,gradcam,saliency",
        "--no-progress",
    )
    assert status == 0, err
    assert err == ""
    assert sorted(os.listdir(out)) == [
        "comparison_grid.pdf",
        "comparison_grid.png",
        "decomposition.png",
        "report.md",
    ]
    # 2 rows x (image + 6 Table-5 methods), a page wide
    assert_png(out / "comparison_grid.png")
    assert (out / "comparison_grid.pdf").read_bytes().startswith(b"%PDF-")
    assert_png(out / "decomposition.png")
    report = (out / "report.md").read_text()
    assert "Held-out accuracy: **" in report and "on 16 scenes" in report
    for label in (
        "FullGrad (`fullgrad`)",
        "Bias-Jacobian (`fullgrad_bias`)",
        "Grad-CAM (`gradcam`)",
        "Gradient (`saliency`)",
    ):
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        hits, rate, ms = row.split("|")[2:5]
        assert hits.strip().endswith("/4") and rate.strip().endswith("%") and float(ms) > 0
    assert "max relative gap" in report and "completeness gap" in report
    assert "Not made: the ImageNet weights of VGG-16-BN are not in the torch hub cache" in report
    assert "![comparison grid](comparison_grid.png)" in report


def test_demo_out_must_be_a_directory(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_bad_input(capsys, "demo", "--out", target, "--n-images", "1", match="not a directory")
    assert target.read_text() == "x"


def test_sample_photos_offline():
    photos = cli.sample_photos()
    names = [name for name, _ in photos]
    assert names[:4] == ["skimage chelsea", "skimage coffee", "skimage astronaut", "skimage rocket"]
    assert "matplotlib grace_hopper" in names
    for _, array in photos:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


class TinyImageNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 5),
        )


def test_imagenet_grid_when_weights_are_cached(tmp_path, monkeypatch):
    """The VGG-16-BN part of the demo, with a stand-in model: it runs on the sample photos."""
    from torchvision.transforms._presets import ImageClassification

    loaded = LoadedModel(
        model=randomize_parameters_(TinyImageNet()).eval(),
        transform=ImageClassification(crop_size=32, resize_size=36),
        categories=["a", "b", "c", "d", "e"],
        name="vgg16_bn",
        input_size=(32, 32),
        weights="VGG16_BN_Weights.IMAGENET1K_V1",
    )
    monkeypatch.setattr(demo, "_imagenet_cached", lambda: (True, None, tmp_path / "vgg16_bn.pth"))
    monkeypatch.setattr(_inputs, "load_model", lambda name, weights, device: loaded)
    section, path = demo._imagenet_section(
        tmp_path, torch.device("cpu"), _inputs.methods("fullgrad,gradcam"), False, 4, False
    )
    assert path == tmp_path / "vgg16_bn_grid.png"
    assert "![VGG-16-BN grid](vgg16_bn_grid.png)" in section
    assert "| skimage chelsea |" in section and "| matplotlib grace_hopper |" in section
    assert_png(tmp_path / "vgg16_bn_grid.png")
