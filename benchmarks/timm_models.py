"""timm models for ``captum-fullgrad bench --model timm_models:NAME`` (random weights,
every bias source randomised, 1000 classes): the transformers of issue 14's targets, and
three convolutional networks built on timm's ``BatchNormAct2d``.

    PYTHONPATH=benchmarks captum-fullgrad bench --model timm_models:vit_tiny \\
        --input-size 224 --batch-sizes 4 --methods saliency,fullgrad
"""

from __future__ import annotations

from torch import nn

from captum_fullgrad.testing import randomize_parameters_


def _timm(name: str) -> nn.Module:
    import timm

    return randomize_parameters_(timm.create_model(name, pretrained=False), 0).eval()


def vit_tiny() -> nn.Module:
    """``vit_tiny_patch16_224``."""
    return _timm("vit_tiny_patch16_224")


def swin_tiny() -> nn.Module:
    """``swin_tiny_patch4_window7_224``."""
    return _timm("swin_tiny_patch4_window7_224")


def efficientnet_b0() -> nn.Module:
    """timm's ``efficientnet_b0`` (``BatchNormAct2d``, ``SqueezeExcite``)."""
    return _timm("efficientnet_b0")


def mobilenetv3_small() -> nn.Module:
    """timm's ``mobilenetv3_small_100``."""
    return _timm("mobilenetv3_small_100")


def regnety_400mf() -> nn.Module:
    """timm's ``regnety_004``."""
    return _timm("regnety_004")
