import math

import pytest
import torch
from torch import nn

from captum_fullgrad.evaluation import pixel_perturbation
from captum_fullgrad.evaluation._common import percent_to_count as _percent_to_count
from captum_fullgrad.evaluation._common import removal_ranks as _removal_ranks


class LinearLogits(nn.Module):
    r"""logits_k = <w_k, x> + b_k: removing pixel p changes logit k by exactly
    sum_c w_kcp (x_cp - baseline_c)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, C, H, W)
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight) + self.bias


def hand_model():
    # One channel, 2x2 image, class 0 sums the pixels, class 1 is minus that.
    weight = torch.stack([torch.ones(1, 2, 2), -torch.ones(1, 2, 2)])
    return LinearLogits(weight, torch.zeros(2)).eval()


X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # f_0(x) = 10
MAP = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])  # pixel (1, 1), value 4, least salient


def test_exact_fractional_change_on_a_2x2_hand_case():
    result = pixel_perturbation(hand_model(), X, 0, MAP, percentages=[25, 50])
    # 25 % = 1 pixel: remove x=4 -> f = 6 -> |10 - 6| / 10 = 0.4;
    # 50 % = 2 pixels: remove x=4 and x=3 -> f = 3 -> 0.7.
    torch.testing.assert_close(result.changes, torch.tensor([[0.4, 0.7]]))
    torch.testing.assert_close(result.mean_curve, torch.tensor([0.4, 0.7]))
    assert result.n_removed.tolist() == [1, 2]
    assert result.auc == pytest.approx(25 * (0.4 + 0.7) / 2)
    torch.testing.assert_close(result.auc_per_example, torch.tensor([result.auc]))
    assert (result.order, result.output) == ("least", "logit")


def test_most_salient_first_and_baseline_colour():
    result = pixel_perturbation(hand_model(), X, 0, MAP, percentages=[25, 50], order="most")
    # remove x=1 -> 9 -> 0.1; then x=2 -> 7 -> 0.3
    torch.testing.assert_close(result.changes, torch.tensor([[0.1, 0.3]]))
    result = pixel_perturbation(hand_model(), X, 0, MAP, percentages=[25], baseline=[1.0])
    # x=4 replaced by 1: f = 7 -> 0.3
    torch.testing.assert_close(result.changes, torch.tensor([[0.3]]))


def test_probability_output_hand_case():
    result = pixel_perturbation(hand_model(), X, 0, MAP, percentages=[25], output="probability")
    p_before = torch.sigmoid(torch.tensor(20.0))  # logits (10, -10)
    p_after = torch.sigmoid(torch.tensor(12.0))  # logits (6, -6)
    expected = (p_before - p_after).abs() / p_before
    torch.testing.assert_close(result.changes, expected.view(1, 1))


def random_linear_problem(seed=0, batch=8, channels=3, size=16):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, channels, size, size, generator=g)
    model = LinearLogits(weight, torch.randn(4, generator=g)).eval()
    inputs = torch.randn(batch, channels, size, size, generator=g)
    target = torch.randint(0, 4, (batch,), generator=g)
    # Exact effect of removing each pixel (baseline 0) on the target logit.
    contribution = (weight[target] * inputs).sum(dim=1)  # (B, H, W)
    return model, inputs, target, contribution


def test_perfect_map_brackets_random_and_constant_maps():
    model, inputs, target, contribution = random_linear_problem()
    percentages = [1, 2.5, 5, 10, 25]
    run = lambda maps, **kw: pixel_perturbation(  # noqa: E731
        model, inputs, target, maps, percentages=percentages, **kw
    )
    random_map = torch.rand(contribution.shape, generator=torch.Generator().manual_seed(9))
    constant_map = torch.ones_like(contribution)

    # Least-first: pixels with the smallest |contribution| change the output least.
    perfect = run(contribution.abs())
    assert perfect.auc < 0.25 * run(random_map).auc
    assert perfect.auc < 0.25 * run(constant_map).auc
    assert bool((perfect.mean_curve <= run(random_map).mean_curve).all())

    # Most-first: removing the largest positive contributions changes the output most.
    perfect_most = run(contribution, order="most")
    assert perfect_most.auc > 2.0 * run(random_map, order="most").auc
    assert perfect_most.auc > 50 * perfect.auc


def test_ties_are_broken_by_seed_deterministically():
    model, inputs, target, _ = random_linear_problem()
    constant = torch.zeros(8, 16, 16)
    first = pixel_perturbation(model, inputs, target, constant, seed=1)
    again = pixel_perturbation(model, inputs, target, constant, seed=1)
    other = pixel_perturbation(model, inputs, target, constant, seed=2)
    assert torch.equal(first.changes, again.changes)
    assert not torch.equal(first.changes, other.changes)
    gen = pixel_perturbation(model, inputs, target, constant, seed=torch.Generator().manual_seed(1))
    assert torch.equal(gen.changes, first.changes)


def test_distinct_values_are_ordered_exactly_whatever_the_seed():
    maps = torch.randperm(64, generator=torch.Generator().manual_seed(0)).float().view(1, 8, 8)
    for order, expected in (
        ("least", maps.flatten().argsort()),
        ("most", (-maps.flatten()).argsort()),
    ):
        for seed in (0, 1):
            ranks = _removal_ranks(maps, order, torch.Generator().manual_seed(seed))
            assert torch.equal(ranks[0][expected], torch.arange(64))


def test_tie_breaking_is_uniform_for_constant_maps():
    # Over many examples every pixel is removed first about equally often, i.e. the
    # order is not raster order (which would always remove pixel 0 first).
    ranks = _removal_ranks(torch.zeros(4000, 2, 2), "least", torch.Generator().manual_seed(0))
    first = (ranks == 0).float().mean(dim=0)
    torch.testing.assert_close(first, torch.full((4,), 0.25), atol=0.03, rtol=0)


def test_batch_size_and_map_layout_do_not_change_the_result():
    model, inputs, target, contribution = random_linear_problem()
    a = pixel_perturbation(model, inputs, target, contribution)
    b = pixel_perturbation(model, inputs, target, contribution[:, None], batch_size=3)
    torch.testing.assert_close(a.changes, b.changes)
    assert a.changes.shape == (8, 7)
    assert a.percentages.tolist() == [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


@pytest.mark.parametrize(
    "percent, n_pixels, expected",
    [(0.1, 4096, 4), (2.5, 4096, 102), (10, 4096, 410), (12.5, 4, 1), (100, 7, 7), (0.01, 16, 0)],
)
def test_percent_to_count_rounds_half_up(percent, n_pixels, expected):
    assert _percent_to_count(percent, n_pixels) == expected


def test_argument_validation():
    model = hand_model()
    with pytest.raises(ValueError, match="percentages"):
        pixel_perturbation(model, X, 0, MAP, percentages=[0])
    with pytest.raises(ValueError, match="percentages"):
        pixel_perturbation(model, X, 0, MAP, percentages=[50, 25])
    with pytest.raises(ValueError, match="order"):
        pixel_perturbation(model, X, 0, MAP, order="random")
    with pytest.raises(ValueError, match="output"):
        pixel_perturbation(model, X, 0, MAP, output="loss")
    with pytest.raises(ValueError, match="baseline"):
        pixel_perturbation(model, X, 0, MAP, baseline=[0.0, 0.0])
    with pytest.raises(ValueError, match="do not match"):
        pixel_perturbation(model, X, 0, torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match="target"):
        pixel_perturbation(model, X, [0, 1], MAP)


def test_zero_reference_output_gives_large_finite_change():
    model = hand_model()
    x = torch.tensor([[[[1.0, -1.0], [0.0, 0.0]]]])  # f_0(x) = 0
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # removes x=1 first: f = -1
    result = pixel_perturbation(model, x, 0, maps, percentages=[25, 50])
    assert bool(torch.isfinite(result.changes).all())
    assert result.changes[0, 0] > 1e10
    assert not math.isnan(result.auc)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, inputs, target, contribution = random_linear_problem()
    cpu = pixel_perturbation(model, inputs, target, torch.zeros_like(contribution))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare full-precision logits
    try:
        gpu = pixel_perturbation(
            model.cuda(), inputs.cuda(), target.cuda(), torch.zeros_like(contribution).cuda()
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert gpu.changes.device.type == "cuda"
    # Same tie-breaking order on both devices: the permutation is drawn on the CPU.
    torch.testing.assert_close(gpu.changes.cpu(), cpu.changes, rtol=1e-4, atol=1e-5)
