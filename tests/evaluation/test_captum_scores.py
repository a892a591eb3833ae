import pytest
import torch
from torch import nn

from captum_fullgrad.evaluation import (
    infidelity_score,
    sensitivity_score,
    uniform_random_map,
)


class GreyLinear(nn.Module):
    r"""logits_k = sum_p v_kp * mean_c x_cp + b_k: the gradient of the target logit with
    respect to a pixel's grey level is exactly v_tp, for every input."""

    def __init__(self, classes=3, size=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.v = nn.Parameter(torch.randn(classes, size, size, generator=g))
        self.b = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x):
        return torch.einsum("bhw,khw->bk", x.mean(dim=1), self.v) + self.b


def grey_gradient(model, inputs, target):
    # Exact map for GreyLinear: the grey-level sensitivity v_t, independent of x.
    return model.v[target].detach()[:, None]


def grad_times_input(model, inputs, target):
    x = inputs.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    return (grad * x).sum(dim=1, keepdim=True)


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


INPUTS = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
TARGET = torch.tensor([0, 1, 2, 0])


def test_infidelity_runs_and_is_zero_for_the_exact_linear_explanation():
    model = GreyLinear().eval()
    exact = infidelity_score(model, grey_gradient, INPUTS, TARGET, normalize=False)
    assert exact.shape == (4,)
    torch.testing.assert_close(exact, torch.zeros(4), atol=1e-8, rtol=0)
    random = infidelity_score(model, uniform_random_map, INPUTS, TARGET)
    assert bool(torch.isfinite(random).all()) and bool((random > 1e-3).all())


def test_infidelity_normalisation_makes_it_scale_invariant():
    model = GreyLinear().eval()
    maps = grad_times_input(model, INPUTS, TARGET) + 0.1  # an imperfect map
    a = infidelity_score(model, None, INPUTS, TARGET, maps=maps)
    b = infidelity_score(model, None, INPUTS, TARGET, maps=5.0 * maps)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    c = infidelity_score(model, None, INPUTS, TARGET, maps=5.0 * maps, normalize=False)
    assert not torch.allclose(b, c)


def test_infidelity_deterministic_with_seed_and_chunking():
    model = SmallConvNet().eval()
    a = infidelity_score(model, grad_times_input, INPUTS, TARGET, n_perturb_samples=6, seed=0)
    b = infidelity_score(model, grad_times_input, INPUTS, TARGET, n_perturb_samples=6, seed=0)
    c = infidelity_score(model, grad_times_input, INPUTS, TARGET, n_perturb_samples=6, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(torch.isfinite(a).all())
    # Chunked evaluation draws the same perturbations in the same order.
    d = infidelity_score(
        model,
        grad_times_input,
        INPUTS,
        TARGET,
        n_perturb_samples=6,
        seed=0,
        max_examples_per_batch=8,
    )
    torch.testing.assert_close(a, d)


def test_sensitivity_runs_and_separates_stable_from_unstable_maps():
    model = GreyLinear().eval()
    stable = sensitivity_score(model, grey_gradient, INPUTS, TARGET)
    assert stable.shape == (4,)
    torch.testing.assert_close(stable, torch.zeros(4), atol=1e-7, rtol=0)
    moving = sensitivity_score(model, grad_times_input, INPUTS, TARGET, perturb_radius=0.1)
    random = sensitivity_score(model, uniform_random_map, INPUTS, TARGET)
    assert bool((moving > 0).all()) and bool(torch.isfinite(moving).all())
    assert bool((random > moving).all())  # a fresh random map for every perturbed input


def test_sensitivity_on_a_conv_net_is_deterministic_and_needs_gradients_inside():
    model = SmallConvNet().eval()
    with torch.no_grad():  # the adapter re-enables gradients for the explainer
        a = sensitivity_score(model, grad_times_input, INPUTS, TARGET, n_perturb_samples=4)
    b = sensitivity_score(model, grad_times_input, INPUTS, TARGET, n_perturb_samples=4)
    assert torch.equal(a, b) and bool(torch.isfinite(a).all()) and bool((a > 0).all())
    c = sensitivity_score(model, grad_times_input, INPUTS, 1, n_perturb_samples=4, seed=3)
    assert c.shape == (4,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captum_scores_on_cuda():
    model = SmallConvNet().eval().cuda()
    x, t = INPUTS.cuda(), TARGET.cuda()
    inf = infidelity_score(model, grad_times_input, x, t)
    sens = sensitivity_score(model, grad_times_input, x, t)
    assert inf.device.type == sens.device.type == "cuda"
    assert bool(torch.isfinite(inf).all() and torch.isfinite(sens).all())
