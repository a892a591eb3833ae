import numpy as np
import pytest
import torch
from torch import nn

from captum_fullgrad.evaluation import (
    SobelEdgeMap,
    cascading_randomisation,
    randomise_layer_,
    spearman_correlation,
    ssim,
)
from captum_fullgrad.testing import randomize_parameters_


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return randomize_parameters_(TinyNet(), seed=seed).eval()


def grad_times_input(model, inputs, target):
    x = inputs.detach().requires_grad_(True)
    out = model(x).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(out, x)
    return (grad * x).sum(dim=1, keepdim=True)


INPUTS = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
TARGET = torch.tensor([0, 1, 2, 3])


# ----------------------------------------------------------------------------- similarity
def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 40), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (6, 40), generator=g).float()
    rho = spearman_correlation(a, b)
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    np.testing.assert_allclose(rho.numpy(), expected, rtol=0, atol=1e-12)


def test_spearman_extremes_and_constant_maps():
    a = torch.rand(2, 4, 4)
    torch.testing.assert_close(spearman_correlation(a, a), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(spearman_correlation(a, -a), -torch.ones(2, dtype=torch.float64))
    # Rank based: invariant to monotone transformations.
    torch.testing.assert_close(spearman_correlation(a, a.exp()), torch.ones(2, dtype=torch.float64))
    assert torch.isnan(spearman_correlation(torch.ones(1, 9), torch.rand(1, 9))).all()


def test_ssim_identity_normalisation_and_dissimilarity():
    a = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))
    # Compares normalised absolute maps: scale and sign do not matter.
    torch.testing.assert_close(ssim(a, -5.0 * a[:, None]), torch.ones(3, dtype=torch.float64))
    b = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert (ssim(a, b) < 0.3).all()
    # Maps smaller than the default 7x7 window use the largest odd window that fits.
    assert ssim(torch.rand(1, 5, 6), torch.rand(1, 5, 6)).shape == (1,)


# ----------------------------------------------------------------------------- randomisation
def test_randomise_layer_draws_batchnorm_statistics_instead_of_resetting():
    bn = nn.BatchNorm2d(64)
    randomise_layer_(bn, seed=0)
    assert ((bn.weight > 0.5) & (bn.weight < 1.5)).all()
    assert ((bn.running_var > 0.5) & (bn.running_var < 1.5)).all()
    assert bn.bias.std().item() == pytest.approx(0.1, rel=0.3)
    assert bn.running_mean.std().item() == pytest.approx(0.1, rel=0.3)
    # The effective bias beta - gamma * mu / sqrt(var + eps) is not zero.
    effective = bn.bias - bn.weight * bn.running_mean / (bn.running_var + bn.eps).sqrt()
    assert effective.abs().min() > 0


def test_randomise_layer_uses_default_init_with_nonzero_biases_and_is_seeded():
    conv = nn.Conv2d(4, 16, 3)
    before = conv.weight.detach().clone()
    randomise_layer_(conv, seed=1)
    assert not torch.equal(conv.weight, before)
    bound = 1 / (4 * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound of Conv2d
    assert conv.weight.abs().max() <= bound
    assert conv.bias.abs().min() > 0 and conv.bias.std().item() == pytest.approx(0.1, rel=0.5)
    other = nn.Conv2d(4, 16, 3)
    randomise_layer_(other, seed=1)
    assert torch.equal(other.weight, conv.weight) and torch.equal(other.bias, conv.bias)


def test_randomise_layer_leaves_the_global_rng_alone():
    layers = [nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Conv1d(2, 2, 1)]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for layer in layers:
        randomise_layer_(layer, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_randomise_layer_fallback_for_modules_without_reset():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.full((100,), 3.0))
            self.table = nn.Parameter(torch.randn(50, 4) * 2.0)

    module = Scale()
    randomise_layer_(module, seed=0)
    assert module.gain.std().item() == pytest.approx(0.1, rel=0.3)  # constant: std undefined
    assert module.table.std().item() == pytest.approx(2.0, rel=0.3)  # scale preserved


# ----------------------------------------------------------------------------- cascade
def test_cascade_leaves_the_callers_model_unchanged():
    model = tiny_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cascading_randomisation(model, grad_times_input, INPUTS, TARGET)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_cascade_layer_order_and_similarity_drop_for_gradient_times_input():
    result = cascading_randomisation(tiny_net(), grad_times_input, INPUTS, TARGET, seed=0)
    assert result.steps == ["original", "head", "conv2", "bn1", "conv1"]
    assert result.spearman_abs.shape == result.ssim.shape == result.spearman.shape == (5, 4)
    # Step 0 is an unmodified copy: identical maps.
    torch.testing.assert_close(result.spearman_abs[0], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(result.ssim[0], torch.ones(4, dtype=torch.float64))
    # Once the whole network is random, the map no longer resembles the original.
    assert result.spearman[-1].abs().mean() < 0.5
    assert result.spearman_abs[-1].mean() < result.spearman_abs[0].mean() - 0.3
    assert result.ssim[-1].mean() < 0.6
    assert result.maps is None and result.original_maps.shape == (4, 16, 16)


def test_model_independent_map_stays_identical_under_randomisation():
    edges = SobelEdgeMap()
    result = cascading_randomisation(tiny_net(), edges, INPUTS, TARGET)
    torch.testing.assert_close(result.spearman_abs, torch.ones(5, 4, dtype=torch.float64))
    torch.testing.assert_close(result.ssim, torch.ones(5, 4, dtype=torch.float64))


def test_cascade_is_deterministic_and_accepts_explicit_layers_and_modes():
    model = tiny_net()
    a = cascading_randomisation(model, grad_times_input, INPUTS, TARGET, seed=3, return_maps=True)
    b = cascading_randomisation(model, grad_times_input, INPUTS, TARGET, seed=3, return_maps=True)
    assert torch.equal(a.maps, b.maps) and a.maps.shape == (5, 4, 16, 16)
    c = cascading_randomisation(model, grad_times_input, INPUTS, TARGET, seed=4, return_maps=True)
    assert not torch.equal(a.maps[1:], c.maps[1:])

    only_head = cascading_randomisation(
        model, grad_times_input, INPUTS, TARGET, layers=["head"], seed=3
    )
    assert only_head.steps == ["original", "head"]

    independent = cascading_randomisation(
        model, grad_times_input, INPUTS, TARGET, seed=3, mode="independent", return_maps=True
    )
    # Step 1 randomises the same first layer with the same seed in both modes.
    torch.testing.assert_close(independent.maps[1], a.maps[1])
    assert independent.mode == "independent"


def test_cascade_errors():
    model = tiny_net()
    with pytest.raises(ValueError, match="no parametrised module"):
        cascading_randomisation(model, grad_times_input, INPUTS, TARGET, layers=["nope"])
    with pytest.raises(ValueError, match="mode"):
        cascading_randomisation(model, grad_times_input, INPUTS, TARGET, mode="all")
    with pytest.raises(ValueError, match="no parametrised layer"):
        cascading_randomisation(nn.Flatten(), grad_times_input, INPUTS, TARGET)
