"""Signed attributions (postprocess="signed") and the one delta convention.

The delta is Captum's: what the decomposition claims minus the truth,
``(<grad_x f, x> + every bias term) - f(x)``; in signed mode with everything included it
is ``sum(attributions) - f(x)`` per example. Exactness is checked in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad.aggregation import area_split
from tests.conftest import UnseenSquare, odd_size_conv_net


def _reference_split(signed_map: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """Split over a common refinement: each cell into lcm/cells equal parts, each input
    position takes lcm/size consecutive parts (independent of the overlap matrix)."""
    cells = signed_map.shape[axis]
    common = math.lcm(cells, size)
    fine = torch.repeat_interleave(signed_map, common // cells, dim=axis) / (common // cells)
    shape = list(fine.shape)
    shape[axis : axis + 1] = [size, common // size]
    return fine.reshape(shape).sum(axis + 1)


@settings(max_examples=40, deadline=None)
@given(
    cells=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    size=st.tuples(st.integers(1, 17), st.integers(1, 17)),
)
def test_area_split_keeps_the_sum_and_splits_by_overlap(cells, size):
    signed_map = torch.randn(2, *cells, dtype=torch.float64)
    split = area_split(signed_map, size)
    assert split.shape == (2, *size)
    torch.testing.assert_close(split.sum((1, 2)), signed_map.sum((1, 2)), rtol=0, atol=1e-12)
    expected = _reference_split(_reference_split(signed_map, size[0], 1), size[1], 2)
    torch.testing.assert_close(split, expected, rtol=0, atol=1e-12)


def test_signed_attribution_sums_to_the_output_plus_the_delta():
    model = odd_size_conv_net()
    x = torch.randn(3, 3, 13, 13, dtype=torch.float64)
    target = [0, 2, 3]
    attributions, delta = FullGradient(model).attribute(
        x, target=target, postprocess="signed", return_convergence_delta=True
    )
    output = model(x)[torch.arange(3), target].detach()
    assert attributions.shape == x.shape
    torch.testing.assert_close(attributions.flatten(1).sum(1) - output, delta, rtol=0, atol=1e-12)
    assert (delta.abs() < 1e-10 * output.abs()).all()
    # The same delta in every mode and from the decomposition itself.
    for postprocess in ("eq4", "neurips2019"):
        _, other = FullGradient(model).attribute(
            x, target=target, postprocess=postprocess, return_convergence_delta=True
        )
        torch.testing.assert_close(other, delta, rtol=0, atol=1e-12)
    fj = full_jacobian(model, x, target=target)
    torch.testing.assert_close(fj.completeness_delta, delta, rtol=0, atol=1e-12)


def test_signed_parts_hold_only_what_was_asked_for():
    model = odd_size_conv_net()
    x = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    fj = full_jacobian(model, x, target=1)
    bias_total = sum(fj.bias_terms.values())
    bias_only = FullGradient(model).attribute(
        x, target=1, postprocess="signed", include_input_gradient=False
    )
    torch.testing.assert_close(bias_only.flatten(1).sum(1), bias_total, rtol=0, atol=1e-12)
    # One layer: its block's bias terms and the input term, nothing else.
    chosen = FullGradient(model, layers=["4"]).attribute(x, target=1, postprocess="signed")
    expected = fj.input_term + fj.bias_terms["4"]
    torch.testing.assert_close(chosen.flatten(1).sum(1), expected, rtol=0, atol=1e-12)
    # single_channel sums the channels of the same attribution.
    single = FullGradient(model).attribute(x, target=1, postprocess="signed", single_channel=True)
    full = FullGradient(model).attribute(x, target=1, postprocess="signed")
    torch.testing.assert_close(single, full.sum(1, keepdim=True), rtol=0, atol=1e-12)


def test_delta_sign_is_claimed_minus_truth():
    """f(x) = sum(x^2) through an unseen square: the input term claims <2x, x> = 2 f(x),
    so the delta is +f(x) (Captum's sign), not -f(x)."""

    def forward(x):
        return UnseenSquare.apply(x).flatten(1).sum(1)

    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    attributions, delta = FullGradient(forward).attribute(
        x, postprocess="signed", return_convergence_delta=True
    )
    output = forward(x)
    torch.testing.assert_close(delta, output, rtol=1e-12, atol=0)
    torch.testing.assert_close(attributions.flatten(1).sum(1) - output, delta)
    torch.testing.assert_close(full_jacobian(forward, x).completeness_delta, output)


def test_compute_convergence_delta_is_the_attribute_delta():
    model = odd_size_conv_net()
    fullgrad = FullGradient(model)
    x = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    attributions, delta = fullgrad.attribute(x, target=2, return_convergence_delta=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = fullgrad.compute_convergence_delta(attributions, torch.zeros_like(x), x, target=2)
        also = fullgrad.compute_convergence_delta(attributions, None, x, target=2)
    # the second call may replay where the first traced: equal up to float64 rounding
    torch.testing.assert_close(same, delta, rtol=0, atol=1e-15)
    torch.testing.assert_close(also, delta, rtol=0, atol=1e-15)
    with pytest.warns(UserWarning, match="ignores start_point"):
        fullgrad.compute_convergence_delta(attributions, x * 0.5, x, target=2)
    assert fullgrad.multiplies_by_inputs is True
    assert fullgrad.has_convergence_delta()


def test_delta_under_bf16_autocast_is_float32_and_not_rounded_away():
    model = odd_size_conv_net().float()
    x = torch.randn(2, 3, 13, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, delta = FullGradient(model).attribute(x, target=1, return_convergence_delta=True)
        fj = full_jacobian(model, x, target=1)
    assert delta.dtype == torch.float32 and fj.completeness_delta.dtype == torch.float32
    # bf16 rounding leaves a real gap; bf16 arithmetic on it would return 0 or a coarse value.
    assert (delta != 0).all()
    assert (delta.to(torch.bfloat16).float() != delta).any()
