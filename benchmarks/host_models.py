"""Models for measuring host (Python) time per attribution call.

At small GPU batches an attribution method waits for the host, not the GPU: what decides
its speed there is the Python work per call (hooks, capture, the reductions' kernel
launches). ``thin_vgg16_bn`` has exactly VGG-16-BN's operation graph (13 conv-BN-ReLU
blocks, 5 max-pools, a 3-layer classifier with dropout) at 1/16 of its width, so that on a
CPU at 32 px the arithmetic is small and a method's time is mostly its host time.

    PYTHONPATH=benchmarks captum-fullgrad bench --model host_models:thin_vgg16_bn \\
        --input-size 32 --batch-sizes 1 --methods forward,saliency,fullgrad,fullgrad_traced
"""

from __future__ import annotations

from torch import nn
from torchvision.models.vgg import VGG, cfgs, make_layers

from captum_fullgrad.testing import randomize_parameters_


def thin_vgg16_bn(width_divisor: int = 16, num_classes: int = 10) -> nn.Module:
    """VGG-16-BN's graph at ``1/width_divisor`` of its channels, every bias source randomised."""
    config = [v if v == "M" else max(v // width_divisor, 2) for v in cfgs["D"]]
    model = VGG(make_layers(config, batch_norm=True), num_classes=num_classes)
    last = config[-2]
    model.classifier = nn.Sequential(
        nn.Linear(last * 7 * 7, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, num_classes),
    )
    return randomize_parameters_(model, 0).eval()
