"""The user's world is left as it was found, and bad input gets a clear exception."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad.testing import randomize_parameters_


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Hardswish(inplace=True),
        )
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu_(self.features(x))
        return self.head(self.dropout(x.mean((2, 3))))


@pytest.fixture
def net():
    return randomize_parameters_(Net()).eval()


def snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {k: p.grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "inplace": {k: m.inplace for k, m in model.named_modules() if hasattr(m, "inplace")},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for k, m in model.named_modules()
        },
        "global_hooks": (
            len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks),
        ),
    }


def assert_unchanged(before, model):
    after = snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"].values())
    assert after["training"] == before["training"]
    assert after["inplace"] == before["inplace"]
    assert after["hooks"] == before["hooks"]
    assert after["global_hooks"] == before["global_hooks"] == (0, 0)
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def test_attribution_leaves_model_and_input_unchanged(net):
    before = snapshot(net)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    x_copy = x.detach().clone()
    FullGradient(net).attribute(x, target=[1, 2], return_convergence_delta=True)
    full_jacobian(net, x, target=1)
    assert_unchanged(before, net)
    assert torch.equal(x.detach(), x_copy) and x.grad is None and x.requires_grad
    plain = torch.rand(1, 3, 16, 16)
    FullGradient(net).attribute(plain, target=0)
    assert not plain.requires_grad and plain.grad is None


def test_hooks_are_removed_when_the_forward_raises(net):
    class Failing(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom")

    failing = Failing(net).eval()
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="boom"):
        FullGradient(failing).attribute(torch.rand(1, 3, 8, 8), target=0)
    assert_unchanged(before, net)
    # No mode is left active either: ordinary torch calls are not intercepted afterwards.
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_hooks_are_removed_when_target_is_bad(net):
    before = snapshot(net)
    with pytest.raises(ValueError, match="out of range"):
        FullGradient(net).attribute(torch.rand(2, 3, 8, 8), target=7)
    assert_unchanged(before, net)


def test_training_mode_is_refused_and_left_as_it_was(net):
    net.train()
    before = snapshot(net)
    with pytest.raises(ValueError, match="eval mode"):
        FullGradient(net).attribute(torch.rand(2, 3, 8, 8), target=0)
    with pytest.raises(ValueError, match="model.eval"):
        full_jacobian(net, torch.rand(2, 3, 8, 8), target=0)
    assert_unchanged(before, net)
    assert net.training
    # The training uses may decompose a training-mode model on purpose.
    fj = full_jacobian(net, torch.rand(4, 3, 8, 8), target=0, allow_training_mode=True)
    assert torch.isfinite(fj.completeness_delta).all()


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (torch.full((1, 3, 8, 8), float("nan")), ValueError, "NaN or Inf"),
        (torch.tensor([[[[float("inf")]]]]).expand(1, 3, 8, 8), ValueError, "NaN or Inf"),
        (torch.rand(3, 8, 8).unsqueeze(0).flatten(1), ValueError, "rank"),
        (torch.randint(0, 255, (1, 3, 8, 8)), TypeError, "floating-point"),
        ([torch.rand(1, 3, 8, 8)], TypeError, "torch.Tensor"),
        ((torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8)), ValueError, "batch sizes"),
        ((), ValueError, "empty tuple"),
    ],
)
def test_bad_inputs(net, inputs, error, match):
    with pytest.raises(error, match=match):
        FullGradient(net).attribute(inputs, target=0)


@pytest.mark.parametrize(
    "target, error, match",
    [
        (5, ValueError, "out of range"),
        (-1, ValueError, "out of range"),
        ([0, 1, 2], ValueError, "3 entries for a batch of 2"),
        (torch.tensor([0, 9]), ValueError, "out of range"),
        (torch.tensor([[0, 1]]), ValueError, "does not match the batch"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer class indices"),
        (None, ValueError, "pass `target`"),
        ((0, 1), ValueError, "tuple"),
        ("cat", TypeError, "unsupported target"),
    ],
)
def test_bad_targets(net, target, error, match):
    with pytest.raises(error, match=match):
        FullGradient(net).attribute(torch.rand(2, 3, 8, 8), target=target)


def test_bad_options(net):
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="postprocess"):
        FullGradient(net).attribute(x, target=0, postprocess="fancy")
    with pytest.raises(ValueError, match="interpolate_mode"):
        FullGradient(net).attribute(x, target=0, interpolate_mode="spline")
    with pytest.raises(ValueError, match="internal_batch_size"):
        FullGradient(net).attribute(x, target=0, internal_batch_size=0)
    # Not silently read as 1, nor a raw TypeError from range().
    for value in (True, 1.5, "2"):
        with pytest.raises(TypeError, match="internal_batch_size must be a positive int"):
            FullGradient(net).attribute(x, target=0, internal_batch_size=value)
    with pytest.raises(ValueError, match="bias_input=2 is out of range for 1 input"):
        FullGradient(net).attribute(x, target=0, bias_input=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        FullGradient(net, layout="nhwc")
    with pytest.raises(TypeError, match="must return a tensor"):
        FullGradient(lambda t: {"logits": net(t)}).attribute(x, target=0)


def test_tuple_target_out_of_range_gets_our_error():
    """Captum's own IndexError used to surface from a tuple index past an output axis."""

    def forward(t):
        return t.flatten(1)[:, :6].reshape(-1, 2, 3)

    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"out of range on output axis 2 \(size 3"):
        FullGradient(forward).attribute(x, target=(1, 3))
    with pytest.raises(ValueError, match="out of range on output axis 1"):
        FullGradient(forward).attribute(x, target=[(0, 0), (2, 0)])
    FullGradient(forward).attribute(x, target=[(0, 0), (1, 2)])
