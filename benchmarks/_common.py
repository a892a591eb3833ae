"""What the training benchmarks (train_uses.py, train_digits.py) share beyond train_uses'
data and fitting helpers: each job's training loss, and the environment they record.

Importable as ``_common`` once this folder is on ``sys.path`` (it is when a script here
runs, and train_digits.py puts it there).
"""

from __future__ import annotations

import os
import platform
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_fullgrad.training import (
    BlockInfo,
    MatchingWeights,
    bias_jacobian_penalty,
    bias_weight_decay,
    full_jacobian_matching_loss,
)

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The plain classification loss (teachers, baselines, dropout students)."""
    return F.cross_entropy(model(x), y)


def student_loss(
    method: str,
    last_block: BlockInfo,
    strength: Optional[float] = None,
    *,
    teacher: Optional[nn.Module] = None,
    weights: Optional[MatchingWeights] = None,
    num_pairs: Optional[int] = None,
) -> LossFn:
    """A student's loss: cross-entropy plus the job's regulariser.

    - with a ``teacher``: full-Jacobian matching to it (the paper's sec. 4) with
      ``weights`` over ``num_pairs`` pairs, whatever ``method`` is;
    - ``"bias_jacobian"``: ``strength`` times the bias-Jacobian penalty (sec. 5) on
      ``last_block``, the last spatial block;
    - ``"bias_weight_decay"``: ``strength`` times the squared biases of ``last_block``;
    - anything else (cross_entropy, none, dropout, whose layer is in the model): plain
      cross-entropy.
    """
    if teacher is not None:
        if weights is None or num_pairs is None:
            raise ValueError("full-Jacobian matching needs weights and num_pairs")
        matching_weights, pairs = weights, num_pairs

        def matching(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            loss, terms = full_jacobian_matching_loss(
                m, teacher, x, y, weights=matching_weights, num_pairs=pairs, return_terms=True
            )
            return F.cross_entropy(terms.student_output, y) + loss

        return matching
    if method == "bias_jacobian":
        factor = float(strength or 0.0)

        def penalised(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            penalty, logits = bias_jacobian_penalty(
                m, x, y, layers=[last_block.name], return_output=True
            )
            return F.cross_entropy(logits, y) + factor * penalty

        return penalised
    if method == "bias_weight_decay":
        factor = float(strength or 0.0)

        def decayed(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(m(x), y) + factor * bias_weight_decay(m, last_block.modules)

        return decayed
    return cross_entropy


def environment() -> Dict[str, Any]:
    """The versions and machine a result was measured with (the JSON's ``environment``)."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
