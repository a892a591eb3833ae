#!/usr/bin/env python3
r"""Statistical helpers shared by the evaluation metrics.

- :func:`trapezoid` integrates a curve sampled at arbitrary (sorted) abscissae. It is
  implemented here rather than taken from NumPy because ``np.trapz`` was removed in
  NumPy 2.4 and ``np.trapezoid`` does not exist before NumPy 2.0; we support both.
- :func:`bootstrap_ci` gives a percentile-bootstrap confidence interval for the mean of
  per-example scores, so that every number in a results table comes with its
  uncertainty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Tuple, Union

import numpy as np

from captum_fullgrad.evaluation._lazy import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

ArrayLike = Union["Tensor", np.ndarray, Sequence[float]]

# Bootstrap resampling draws an (R, N) index matrix. Above this many entries it is drawn
# in chunks of resamples so that memory stays bounded (~64 MiB of int64) for large N.
_MAX_BOOTSTRAP_ENTRIES = 8_000_000


def trapezoid(y: ArrayLike, x: ArrayLike, dim: int = -1) -> Tensor:
    r"""Area under the piecewise-linear curve through ``(x_i, y_i)`` (trapezoid rule).

    .. math::
        \mathrm{AUC} = \sum_{i=1}^{n-1} (x_{i+1} - x_i)\,\frac{y_i + y_{i+1}}{2}

    The area has the units of ``x`` times the units of ``y``; no normalisation by the
    width of the ``x`` range is applied (divide by ``x[-1] - x[0]`` for the mean height).

    Args:
        y (Tensor or array-like): Curve values; the samples lie along ``dim``.
        x (Tensor or array-like): 1-D abscissae, one per sample of ``y`` along ``dim``,
                    strictly increasing.
        dim (int, optional): Dimension of ``y`` holding the samples. Default: -1.

    Returns:
        Tensor: ``y`` with ``dim`` reduced, on ``y``'s device; a 0-d tensor for 1-D
        ``y``. With a single sample the area is 0.
    """
    y_t = torch.as_tensor(y)
    if not torch.is_floating_point(y_t):
        y_t = y_t.to(torch.get_default_dtype())
    x_t = torch.as_tensor(x, dtype=y_t.dtype, device=y_t.device)
    if x_t.dim() != 1:
        raise ValueError(f"x must be 1-D, got shape {tuple(x_t.shape)}")
    if x_t.numel() != y_t.shape[dim]:
        raise ValueError(f"x has {x_t.numel()} samples but y has {y_t.shape[dim]} along dim {dim}")
    if x_t.numel() > 1 and not bool((x_t[1:] > x_t[:-1]).all()):
        raise ValueError("x must be strictly increasing")
    y_t = y_t.movedim(dim, -1)
    widths = x_t[1:] - x_t[:-1]
    return ((y_t[..., 1:] + y_t[..., :-1]) * 0.5 * widths).sum(-1)


def bootstrap_ci(
    values: ArrayLike,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Tuple[float, float, float]:
    r"""Percentile-bootstrap confidence interval for the mean of ``values``.

    Draws ``n_resamples`` samples of size :math:`N` with replacement from the
    :math:`N` values, computes each resample's mean :math:`\bar v^{*}_r`, and returns

    .. math::
        \Big(\bar v,\; q_{\alpha/2}(\bar v^{*}),\; q_{1-\alpha/2}(\bar v^{*})\Big),
        \qquad \alpha = 1 - \text{confidence},

    where :math:`\bar v` is the mean of the original sample and :math:`q_p` the
    empirical :math:`p`-quantile with linear interpolation (NumPy's default, type 7 of
    Hyndman & Fan 1996). This is the percentile interval of Efron & Tibshirani, "An
    Introduction to the Bootstrap" (1993), ch. 13. For a paired comparison of two
    methods evaluated on the same examples, pass the per-example differences.

    All resamples are drawn at once (in chunks for large :math:`N`) from a
    ``torch.Generator`` seeded with ``seed``, on the CPU in float64, so the interval is
    reproducible and independent of the device ``values`` live on.

    Args:
        values (Tensor or array-like): 1-D per-example scores, shape ``(N,)``, N >= 1.
        n_resamples (int, optional): Number of bootstrap resamples. Default: 2000.
        confidence (float, optional): Coverage of the interval, in (0, 1).
                    Default: 0.95.
        seed (int, optional): Seed of the resampling generator. Default: 0.

    Returns:
        tuple[float, float, float]: ``(mean, low, high)`` with ``low <= mean <= high``
        in all but pathological cases (the percentile interval need not contain the
        sample mean for very skewed data). With ``N == 1`` all three are equal.

    Raises:
        ValueError: if ``values`` is not 1-D, is empty, or contains NaN or infinity
                    (a NaN usually means a metric was undefined for some example; such
                    examples must be filtered out explicitly, not silently averaged).
    """
    v = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
    if v.dim() != 1:
        raise ValueError(f"values must be 1-D of shape (N,), got shape {tuple(v.shape)}")
    if v.numel() == 0:
        raise ValueError("values is empty")
    n_nan = int(torch.isnan(v).sum())
    n_inf = int(torch.isinf(v).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"values contains {n_nan} NaN and {n_inf} infinite entries out of {v.numel()};"
            " drop the examples for which the metric is undefined before bootstrapping"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")

    n = v.numel()
    mean = float(v.mean())
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _MAX_BOOTSTRAP_ENTRIES // n)
    means = []
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        idx = torch.randint(0, n, (rows, n), generator=generator)
        means.append(v[idx].mean(dim=1))
    resampled = torch.cat(means)
    alpha = 1.0 - confidence
    q = torch.tensor([alpha / 2.0, 1.0 - alpha / 2.0], dtype=torch.float64)
    low, high = torch.quantile(resampled, q, interpolation="linear").tolist()
    return mean, float(low), float(high)
