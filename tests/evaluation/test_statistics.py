import math

import numpy as np
import pytest
import torch

from captum_fullgrad.evaluation import statistics
from captum_fullgrad.evaluation.statistics import bootstrap_ci, trapezoid


# ----------------------------------------------------------------------------- trapezoid
def test_trapezoid_hand_case_uneven_spacing():
    # 0.5 * (0 + 1) * 1 + 0.5 * (1 + 1) * 2 = 2.5
    assert float(trapezoid([0.0, 1.0, 1.0], [0.0, 1.0, 3.0])) == pytest.approx(2.5)


def test_trapezoid_batched_along_dim_matches_numpy():
    y = torch.rand(4, 7, dtype=torch.float64)
    x = torch.tensor([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0], dtype=torch.float64)
    expected = [sum((x[i + 1] - x[i]) * (row[i] + row[i + 1]) / 2 for i in range(6)) for row in y]
    torch.testing.assert_close(trapezoid(y, x), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(trapezoid(y.t(), x, dim=0), trapezoid(y, x))
    if hasattr(np, "trapezoid"):  # NumPy >= 2.0
        np.testing.assert_allclose(trapezoid(y, x).numpy(), np.trapezoid(y.numpy(), x.numpy()))


def test_trapezoid_single_sample_and_errors():
    assert float(trapezoid([3.0], [1.0])) == 0.0
    with pytest.raises(ValueError, match="increasing"):
        trapezoid([1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="samples"):
        trapezoid([1.0, 2.0, 3.0], [0.0, 1.0])


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_known_mean_and_coverage_of_the_mean():
    values = torch.arange(10, dtype=torch.float64)  # mean 4.5
    mean, low, high = bootstrap_ci(values)
    assert mean == pytest.approx(4.5)
    assert low < 4.5 < high


def test_bootstrap_matches_normal_theory_for_large_samples():
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 1.0, size=800)
    mean, low, high = bootstrap_ci(values, n_resamples=2000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert mean == pytest.approx(values.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * half)


def test_bootstrap_narrower_with_more_data():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.normal(size=20))
    large = bootstrap_ci(rng.normal(size=2000))
    assert large[2] - large[1] < (small[2] - small[1]) / 4


def test_bootstrap_deterministic_given_seed():
    values = np.random.default_rng(2).exponential(size=50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(torch.tensor(values), seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_higher_confidence_is_wider():
    values = np.random.default_rng(5).normal(size=100)
    _, l90, h90 = bootstrap_ci(values, confidence=0.9)
    _, l99, h99 = bootstrap_ci(values, confidence=0.99)
    assert l99 < l90 and h99 > h90


def test_bootstrap_chunked_resampling_is_the_same_stream(monkeypatch):
    values = np.random.default_rng(6).normal(size=37)
    whole = bootstrap_ci(values, n_resamples=300)
    monkeypatch.setattr(statistics, "_MAX_BOOTSTRAP_ENTRIES", 37 * 7)
    assert bootstrap_ci(values, n_resamples=300) == pytest.approx(whole)


def test_bootstrap_degenerate_samples():
    assert bootstrap_ci([1.5]) == (1.5, 1.5, 1.5)
    assert bootstrap_ci([2.0] * 9) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bootstrap_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, bad, 2.0])


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
