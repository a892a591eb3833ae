"""Several inputs (Captum's tuples): one attribution per input, bias terms on one of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad.testing import randomize_parameters_


class TwoStreams(nn.Module):
    """An image and a second image-shaped input (a depth map) fused after one conv each."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb = nn.Conv2d(3, 4, 3, padding=1)
        self.depth = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, rgb, depth, scale=1.0):
        fused = nn.functional.silu(self.rgb(rgb)[:, :, ::2, ::2] + self.depth(depth))
        return self.head(self.fuse(fused).mean((2, 3))) * scale


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_parameters_(TwoStreams()).double().eval()


def test_each_input_gets_its_own_input_term(model):
    rgb = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    depth = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    fullgrad = FullGradient(model)
    (a_rgb, a_depth), delta = fullgrad.attribute(
        (rgb, depth), target=1, postprocess="signed", return_convergence_delta=True
    )
    assert a_rgb.shape == rgb.shape and a_depth.shape == depth.shape
    fj = full_jacobian(model, (rgb, depth), target=1)
    assert isinstance(fj.input_jacobian, tuple) and len(fj.input_terms) == 2
    # The second input holds exactly its input term; the bias terms went to input 0.
    torch.testing.assert_close(a_depth, fj.input_jacobian[1] * depth, rtol=0, atol=1e-12)
    bias_total = sum(fj.bias_terms.values())
    torch.testing.assert_close(
        a_rgb.flatten(1).sum(1), fj.input_terms[0] + bias_total, rtol=0, atol=1e-12
    )
    output = model(rgb, depth)[:, 1].detach()
    total = a_rgb.flatten(1).sum(1) + a_depth.flatten(1).sum(1)
    torch.testing.assert_close(total - output, delta, rtol=0, atol=1e-12)
    assert (delta.abs() < 1e-10 * output.abs()).all()
    torch.testing.assert_close(fj.completeness_delta, delta, rtol=0, atol=1e-12)
    # Each input's gradient is its own, not the other's.
    rgb_only = torch.autograd.functional.jacobian(lambda r: model(r, depth)[:, 1].sum(), rgb)
    torch.testing.assert_close(fj.input_jacobian[0], rgb_only)


def test_bias_input_moves_the_bias_maps(model):
    rgb = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    depth = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    fullgrad = FullGradient(model)
    first = fullgrad.attribute((rgb, depth), target=0, postprocess="signed")
    second, delta = fullgrad.attribute(
        (rgb, depth), target=0, postprocess="signed", bias_input=1, return_convergence_delta=True
    )
    fj = full_jacobian(model, (rgb, depth), target=0)
    torch.testing.assert_close(second[0], fj.input_jacobian[0] * rgb, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        sum(a.flatten(1).sum(1) for a in second), sum(a.flatten(1).sum(1) for a in first)
    )
    assert (delta.abs() < 1e-10).all()
    # eq4 maps follow the bias input too, and a chunked batch gives the same tuple.
    eq4 = fullgrad.attribute((rgb, depth), target=0, bias_input=1)
    chunked = fullgrad.attribute((rgb, depth), target=0, bias_input=1, internal_batch_size=1)
    for a, b in zip(eq4, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (eq4[0] >= 0).all() and torch.equal(eq4[0], (fj.input_jacobian[0] * rgb).abs())


def test_additional_forward_args_follow_the_inputs(model):
    rgb = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    depth = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    attributions, delta = FullGradient(model).attribute(
        (rgb, depth),
        target=2,
        additional_forward_args=(0.5,),
        postprocess="signed",
        return_convergence_delta=True,
    )
    output = model(rgb, depth, 0.5)[:, 2].detach()
    total = sum(a.flatten(1).sum(1) for a in attributions)
    torch.testing.assert_close(total, output + delta, rtol=0, atol=1e-12)
