"""timm transformers for ``captum-fullgrad bench --model timm_models:NAME`` (random weights,
every bias source randomised, 1000 classes, 224 px).

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
