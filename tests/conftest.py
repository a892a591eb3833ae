"""Shared fixtures: small random networks whose every bias source is non-zero."""

from __future__ import annotations

import pytest
import torch
import torchvision

from captum_fullgrad.testing import ZOO as TORCHVISION_ZOO
from captum_fullgrad.testing import randomize_parameters_, zoo_model

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# The completeness zoo of the core issue (one list, shared with the benchmark).
ZOO = list(TORCHVISION_ZOO)
ZOO_INPUT_SIZE = {"inception_v3": 80, "alexnet": 64}


def build_zoo_model(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.nn.Module:
    """A torchvision classifier of the zoo (or a small ViT for "vit"), randomised biases,
    BN statistics and affine terms, eval mode."""
    if name != "vit":
        return zoo_model(name, seed).to(dtype).eval()
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    randomize_parameters_(model, seed)
    return model.to(dtype).eval()


def tiny_swin(seed: int = 0) -> torch.nn.Module:
    """torchvision's Swin at 16 channels, two stages of two blocks, 4 x 4 windows; float64."""
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[4, 4],
        num_classes=5,
    )
    return randomize_parameters_(model, seed).double().eval()


def vgg_features_small_head(seed: int = 0) -> torch.nn.Module:
    """VGG-11-BN's 8 conv-BN blocks with a small head: the 25088x4096 float64 classifier
    would dominate the test time without testing anything the zoo does not."""
    model = build_zoo_model("vgg11_bn", seed)
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(512, 64),
        torch.nn.ReLU(inplace=True),
        torch.nn.Dropout(),
        torch.nn.Linear(64, 10),
    )
    randomize_parameters_(model.classifier, seed)
    return model.double().eval()


def odd_size_conv_net() -> torch.nn.Sequential:
    """A conv-BN block, max-pool and a strided conv: on 13 px, resolutions 13 -> 6 (the
    max-pool's floor) -> 3 (stride 2) that do not divide the input; float64, eval mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 5, 3, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(5, 4),
    )
    return randomize_parameters_(model).double().eval()


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op thread for a module of tiny-tensor tests: extra threads only add
    synchronisation, very costly on a shared, busy machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64_vgg() -> torch.nn.Module:
    return build_zoo_model("vgg11_bn")


@pytest.fixture
def images64() -> torch.Tensor:
    return torch.rand(2, 3, 48, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class UnseenSquare(torch.autograd.Function):
    """``x * x`` inside a custom autograd Function: the capture cannot see its intercept
    (``-x^2``), so eq. 1's terms claim ``<2x, x> = 2 x^2`` for it, a known completeness gap."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class UnseenSquareNet(torch.nn.Module):
    """Logits ``(s, -s)`` with ``s = sum(conv(x)^2)`` through :class:`UnseenSquare`.

    The decomposition of either logit claims twice its value, so eq. 1's gap in Captum's
    sign, ``claimed - f(x)``, is ``+f(x)``: a flipped sign shows as ``-f(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        s = UnseenSquare.apply(self.conv(x)).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


# ---------------------------------------------------------------------------------------
# The command line (test_cli, test_cli_figures)
# ---------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    """``captum-fullgrad ARGV`` in-process: ``(exit status, stdout, stderr)``."""
    from captum_fullgrad.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_bad_input(capsys, *argv, match=None):
    """The command fails as bad input: status 2, one ``captum-fullgrad: error:`` line on
    stderr (containing ``match`` if given), no traceback. Returns stderr."""
    status, out, err = run_cli(capsys, *argv)
    assert status == 2, (status, err)
    assert err.startswith("captum-fullgrad: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err + out
    if match is not None:
        assert match in err, err
    return err


class TinyImageNet(torch.nn.Sequential):
    """Five classes from a conv-BN-ReLU block: a stand-in for an ImageNet classifier."""

    def __init__(self) -> None:
        super().__init__(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, 5),
        )


@pytest.fixture
def cached_vgg16_bn(monkeypatch, tmp_path):
    """The demo finds VGG-16-BN's ImageNet weights 'cached' and loads a :class:`TinyImageNet`
    stand-in under that name (32 px preset transform); other models load as usual.
    Returns the stand-in's ``LoadedModel``."""
    from torchvision.transforms._presets import ImageClassification

    from captum_fullgrad.cli import _inputs, demo
    from captum_fullgrad.models import LoadedModel

    stand_in = LoadedModel(
        model=randomize_parameters_(TinyImageNet()).eval(),
        transform=ImageClassification(crop_size=32, resize_size=36),
        categories=["a", "b", "c", "d", "e"],
        name="vgg16_bn",
        input_size=(32, 32),
        weights="VGG16_BN_Weights.IMAGENET1K_V1",
    )
    load = _inputs.load_model
    monkeypatch.setattr(demo, "_imagenet_cached", lambda: (True, None, tmp_path / "vgg16_bn.pth"))
    monkeypatch.setattr(
        _inputs,
        "load_model",
        lambda name, weights, device: (
            stand_in if name == "vgg16_bn" else load(name, weights, device)
        ),
    )
    return stand_in
