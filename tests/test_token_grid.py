"""Grad-CAM on token models: the last block's tokens on their grid, never the patch embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from captum_fullgrad._token_grid import find_token_layer
from captum_fullgrad.methods import get_method
from captum_fullgrad.models import ShapesVGG
from captum_fullgrad.testing import randomize_parameters_

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_cpu_thread):
    yield


def small_vit(**kwargs):
    model = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=2, num_classes=5, **kwargs)
    return randomize_parameters_(model, seed=0).eval()


def manual_gradcam(model, module, x, target):
    """Grad-CAM by hand on the (B, 1 + h*w, C) tokens of ``module``, for comparison."""
    store = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.setdefault("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    tokens = store["a"]
    (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), tokens)
    side = int((tokens.shape[1] - 1) ** 0.5)
    a = tokens[:, 1:].reshape(len(x), side, side, -1).permute(0, 3, 1, 2)
    g = grad[:, 1:].reshape(len(x), side, side, -1).permute(0, 3, 1, 2)
    cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)


def test_vit_gradcam_reads_the_last_blocks_tokens_on_their_grid():
    model = small_vit()
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    layer = find_token_layer(model, x)
    # The class token reads the patch tokens only through the last block's attention, so
    # the last layer whose patch tokens matter is that block's first LayerNorm.
    assert layer.name == "blocks.1.norm1" and layer.patch_embedding == "patch_embed.proj"
    assert layer.layout == "tokens" and layer.grid == (3, 3) and layer.prefix == 1
    target = torch.tensor([1, 3])
    cam = get_method("gradcam")(model, x, target)
    expected = manual_gradcam(model, model.blocks[1].norm1, x, target)
    assert cam.shape == (2, 1, 48, 48) and cam.sum() > 0
    torch.testing.assert_close(cam, expected.detach(), rtol=1e-4, atol=1e-6)
    # The patch embedding's Grad-CAM, which the automatic choice used to take, differs.
    patch = get_method("gradcam", layer="patch_embed.proj")(model, x, target)
    assert not torch.allclose(patch, cam)


@pytest.mark.parametrize(
    "build, size, name, layout, prefix",
    [
        (lambda: small_vit(global_pool="avg", class_token=False), 48, "norm", "tokens", 0),
        (
            lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=48, depth=2),
            48,
            "blocks.1.norm1",
            "tokens",
            2,
        ),
        (
            lambda: VisionTransformer(
                image_size=32,
                patch_size=16,
                num_layers=2,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=32,
                num_classes=5,
            ),
            32,
            "encoder.layers.encoder_layer_1.ln_1",
            "tokens",
            1,
        ),
        (
            lambda: timm.create_model(
                "swin_tiny_patch4_window7_224",
                img_size=56,
                embed_dim=16,
                depths=(1, 1),
                num_heads=(1, 1),
                num_classes=5,
            ),
            56,
            "norm",
            "nhwc",
            0,
        ),
    ],
)
def test_other_token_models(build, size, name, layout, prefix):
    model = randomize_parameters_(build(), seed=0).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    layer = find_token_layer(model, x)
    assert (layer.name, layer.layout, layer.prefix) == (name, layout, prefix)
    cam = get_method("gradcam")(model, x)
    assert cam.shape == (2, 1, size, size) and torch.isfinite(cam).all()


def test_cnns_keep_their_last_convolution():
    model = randomize_parameters_(ShapesVGG(widths=(4, 8)), seed=1).eval()
    x = torch.rand(1, 3, 32, 32)
    assert find_token_layer(model, x) is None
    automatic = get_method("gradcam")(model, x)
    explicit = get_method("gradcam", layer="features.4")(model, x)
    torch.testing.assert_close(automatic, explicit)


def test_a_patch_embedding_without_token_layers_is_refused():
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=4, stride=4), nn.Flatten(), nn.Linear(8 * 8 * 8, 3)
    ).eval()
    with pytest.raises(ValueError, match="patch embedding.*layer="):
        get_method("gradcam")(model, torch.rand(1, 3, 32, 32))
