"""Where a model lives and waiting for its device: shared by every timed code path.

Timings on a CUDA device need :func:`synchronize` before reading the clock (kernels run
asynchronously); :func:`model_device` says which device a model's work runs on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["model_device", "synchronize"]


def model_device(model: Any, fallback: torch.device) -> torch.device:
    """The device of ``model``'s first parameter; ``fallback`` for a model without any
    (or for a plain callable)."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
    return fallback


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA), so a clock read after it
    covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
