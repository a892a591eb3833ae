"""The argument checks that FullGradient and LayerFullGradient share (_validation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_fullgrad import FullGradient, LayerFullGradient
from captum_fullgrad.testing import randomize_parameters_


class _Net(nn.Module):
    """conv-BN-ReLU, a Linear head, and an additive constant passed as a forward argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.mean((2, 3))) + shift


def _net() -> _Net:
    return randomize_parameters_(_Net()).double().eval()


ATTRIBUTIONS = {
    "FullGradient": lambda net: FullGradient(net),
    "LayerFullGradient": lambda net: LayerFullGradient(net, net.conv),
}


@pytest.mark.parametrize("method", list(ATTRIBUTIONS))
def test_bad_arguments_name_the_class(method):
    net = _net()
    attribution = ATTRIBUTIONS[method](net)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"^{method}: postprocess must be one of .*'nope'"):
        attribution.attribute(x, target=0, postprocess="nope")
    with pytest.raises(TypeError, match=f"^{method}: internal_batch_size must be a positive"):
        attribution.attribute(x, target=0, internal_batch_size=1.0)
    with pytest.raises(ValueError, match=f"^{method}: internal_batch_size must be a positive"):
        attribution.attribute(x, target=0, internal_batch_size=0)
    net.bn.train()
    with pytest.raises(ValueError, match=f"^{method} needs the model's mode-dependent"):
        attribution.attribute(x, target=0)


@pytest.mark.parametrize("method", list(ATTRIBUTIONS))
def test_one_forward_argument_and_batch_chunks_give_the_same_answer(method):
    """A lone additional_forward_args value is one argument; chunks change nothing."""
    net = _net()
    attribution = ATTRIBUTIONS[method](net)
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 1])
    whole, delta = attribution.attribute(
        x, target=target, additional_forward_args=0.5, return_convergence_delta=True
    )
    parts, part_delta = attribution.attribute(
        x,
        target=target,
        additional_forward_args=(0.5,),
        internal_batch_size=2,
        return_convergence_delta=True,
    )
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(part_delta, delta, rtol=0, atol=1e-12)


def _nonfinite(*values: float) -> torch.Tensor:
    x = torch.rand(1, 3, 8, 8)
    for i, value in enumerate(values):
        x[0, 0, 0, i] = value
    return x


@pytest.mark.parametrize(
    "inputs",
    [_nonfinite(float("nan")), _nonfinite(float("inf"), float("-inf")), _nonfinite(float("-inf"))],
    ids=["nan", "inf_minus_inf", "minus_inf"],
)
def test_one_nonfinite_value_is_refused(inputs):
    """The check sums the input first (cheap), then confirms element by element."""
    from captum_fullgrad._validation import format_single_input

    with pytest.raises(ValueError, match="NaN or Inf"):
        format_single_input(inputs, method="FullGradient")


def test_finite_values_whose_sum_overflows_are_accepted():
    from captum_fullgrad._validation import format_single_input

    huge = torch.full((1, 3, 8, 8), torch.finfo(torch.float32).max / 2)
    assert not torch.isfinite(huge.sum())  # the cheap test alone would refuse it
    checked, _ = format_single_input(huge, method="FullGradient")
    assert checked is huge
