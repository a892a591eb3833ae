"""The mode policy: a training model is refused only where training changes the result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad._mode import MODE_DEPENDENT_KINDS, mode_dependent_training_modules
from captum_fullgrad.methods import available_methods, get_method
from captum_fullgrad.testing import randomize_parameters_


def _plain(extra: nn.Module) -> nn.Module:
    """Conv, an extra module under test, SiLU, pooling and a head: every term non-zero."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        extra,
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return randomize_parameters_(model).double()


class DropPath(nn.Module):
    """Named like timm's: the policy knows it by name and ``drop_prob``."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.training and self.drop_prob > 0:
            keep = (torch.rand(x.shape[0], 1, 1, 1) > self.drop_prob).to(x)
            return x * keep / (1 - self.drop_prob)
        return x


MODE_FREE = [
    nn.Identity(),
    nn.Dropout(0.0),
    nn.ReLU(),
    nn.InstanceNorm2d(4, affine=True),  # instance statistics in both modes
    nn.GroupNorm(2, 4),
    DropPath(0.0),
]
MODE_DEPENDENT = [
    (nn.BatchNorm2d(4), "BatchNorm"),
    (nn.Dropout(0.2), "dropout with p=0.2"),
    (nn.Dropout2d(0.1), "dropout with p=0.1"),
    (nn.InstanceNorm2d(4, track_running_stats=True), "track_running_stats"),
    (nn.RReLU(), "RReLU"),
    (DropPath(0.1), "probability 0.1"),
]


@pytest.mark.parametrize("extra", MODE_FREE, ids=lambda m: type(m).__name__)
def test_training_without_mode_dependent_modules_runs_as_in_eval(extra):
    model = _plain(extra)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert model.training
    attributions, delta = FullGradient(model).attribute(x, target=1, return_convergence_delta=True)
    fj = full_jacobian(model, x, target=1)
    assert model.training  # left in the mode it came in
    model.eval()
    expected, expected_delta = FullGradient(model).attribute(
        x, target=1, return_convergence_delta=True
    )
    torch.testing.assert_close(attributions, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(delta, expected_delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(fj.completeness_delta, expected_delta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("extra, reason", MODE_DEPENDENT, ids=lambda m: type(m).__name__)
def test_training_mode_dependent_modules_are_refused_untouched(extra, reason):
    model = _plain(extra)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"1 \\(.*{reason}.*model.eval"):
        FullGradient(model).attribute(x, target=0)
    with pytest.raises(ValueError, match=reason):
        full_jacobian(model, x, target=0)
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # no running-statistics update
    model.eval()
    FullGradient(model).attribute(x, target=0)  # fine once evaluated


def test_attention_and_recurrent_dropout_count():
    attention = nn.MultiheadAttention(8, 2, dropout=0.1)
    quiet = nn.MultiheadAttention(8, 2)
    lstm = nn.LSTM(4, 4, num_layers=2, dropout=0.3)
    found = mode_dependent_training_modules(nn.ModuleDict({"a": attention, "q": quiet, "l": lstm}))
    assert [name for name, _ in found] == ["a", "l"]
    assert len(MODE_DEPENDENT_KINDS) == 6


def test_allow_training_mode_keeps_the_training_uses_working():
    """training.py decomposes train-mode BatchNorm on purpose."""
    model = _plain(nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    fj = full_jacobian(model, x, target=0, allow_training_mode=True)
    # Batch statistics couple the examples: eq. 1 holds for the batch's sum.
    assert abs(float(fj.completeness_delta.sum())) < 1e-10
    assert model.training


def _registry_net(with_batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4) if with_batch_norm else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return randomize_parameters_(model)


@pytest.mark.parametrize("name", available_methods())
def test_every_registry_method_follows_the_policy(name):
    method = get_method(name).fast()
    x = torch.rand(2, 3, 16, 16)
    model = _registry_net(with_batch_norm=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="BatchNorm uses batch statistics"):
        method(model, x, target=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # running statistics not updated
    assert model.training
    free = _registry_net(with_batch_norm=False)
    in_training = method(free, x, target=1)
    assert free.training
    if not method.stochastic:
        torch.testing.assert_close(in_training, method(free.eval(), x, target=1))


def test_a_registered_none_child_is_walked_past():
    """The per-call walk skips a ``None`` child (``register_module(name, None)``) and still
    finds a training dropout behind it, deeper in the tree."""
    from captum_fullgrad._mode import check_mode

    inner = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5))
    inner.register_module("absent", None)
    model = nn.Sequential(inner, nn.ReLU())
    model.register_module("also_absent", None)
    model.eval()
    check_mode(model, method="FullGradient")  # nothing training: no error
    inner[1].train()
    with pytest.raises(ValueError, match=r"0\.1 \(dropout with p=0.5\)"):
        check_mode(model, method="FullGradient")
