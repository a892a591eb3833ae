"""Training uses (seed sections 4, 5, 7): bias-Jacobian penalty, full-Jacobian matching loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from captum_fullgrad import full_jacobian
from captum_fullgrad.testing import randomize_parameters_
from captum_fullgrad.training import (
    MATCHING_PRESETS,
    MatchingWeights,
    bias_blocks,
    bias_jacobian_penalty,
    bias_weight_decay,
    full_jacobian_matching_loss,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny double-backward passes: one thread is several times faster
    than two on a shared two-core machine, where OpenMP threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vgg(widths=(4, 6), convs_per_block=1, num_classes=3, seed=0, dtype=torch.float64, inplace=True):
    """conv-BN-ReLU blocks with max-pooling, global average pool, one linear layer."""
    layers, channels = [], 3
    for width in widths:
        for _ in range(convs_per_block):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=inplace),
            ]
            channels = width
        layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return randomize_parameters_(model, seed=seed).to(dtype).eval()


class Substituted(nn.Module):
    """``model`` with some parameters replaced by given tensors (for gradcheck), names kept."""

    def __init__(self, model, values):
        super().__init__()
        self.model = model
        self.values = values

    def forward(self, x):
        return functional_call(self.model, self.values, (x,))


def batch(n=4, size=8, seed=0, dtype=torch.float64, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=dtype)
    y = torch.arange(n) % num_classes
    return x, y


# --------------------------------------------------------------------------- penalty
def test_penalty_equals_block_bias_jacobian_norm_from_engine():
    model = vgg()
    x, y = batch()
    blocks = bias_blocks(model, x)
    last = [b for b in blocks if b.spatial][-1]
    assert last.ops == ("conv2d", "batch_norm")
    fj = full_jacobian(model, x, target=y)
    block = sum(fj.bias_jacobians[name] for name in last.sources)
    expected = block.flatten(1).pow(2).sum(1).mean()
    assert expected > 1e-8  # not vacuous
    default = bias_jacobian_penalty(model, x, y)
    explicit = bias_jacobian_penalty(model, x, y, layers=[last.name])
    torch.testing.assert_close(default, expected)
    torch.testing.assert_close(explicit, expected)
    # A single source by name, and two layers add up.
    bn_only = bias_jacobian_penalty(model, x, y, layers=last.sources[1])
    torch.testing.assert_close(
        bn_only, fj.bias_jacobians[last.sources[1]].flatten(1).pow(2).sum(1).mean()
    )
    both = bias_jacobian_penalty(model, x, y, layers=[blocks[0].name, last.name])
    first = sum(fj.bias_jacobians[n] for n in blocks[0].sources).flatten(1).pow(2).sum(1).mean()
    torch.testing.assert_close(both, first + expected)


def test_penalty_gradcheck_eval_mode():
    model = vgg()
    x, y = batch()
    last = [b for b in bias_blocks(model, x) if b.spatial][-1]
    conv_name, bn_name = last.modules
    params = dict(model.named_parameters())
    names = [f"{conv_name}.bias", f"{bn_name}.weight", f"{bn_name}.bias", "10.weight"]
    start = [params[n].detach().clone().requires_grad_(True) for n in names]

    def penalty(*values):
        return bias_jacobian_penalty(
            Substituted(model, dict(zip(names, values))), x, y, layers=[f"model.{last.name}"]
        )

    assert torch.autograd.gradcheck(penalty, tuple(start), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_penalty_gradcheck_train_mode_conv_bias_and_head():
    model = vgg().train()
    x, y = batch(n=6)
    last = [b for b in bias_blocks(model, x) if b.spatial][-1]
    assert model.training  # bias_blocks restored the mode
    names = [f"{last.modules[0]}.bias", "10.weight"]
    params = dict(model.named_parameters())
    start = [params[n].detach().clone().requires_grad_(True) for n in names]

    def penalty(*values):
        return bias_jacobian_penalty(Substituted(model, dict(zip(names, values))), x, y)

    value = penalty(*start)
    assert value > 1e-8
    assert torch.autograd.gradcheck(penalty, tuple(start), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_penalty_gradcheck_train_mode_through_batch_norm():
    """Train-mode BatchNorm: the intercept's closed form ``y - (y - beta) eps / (var + eps)``
    is differentiable, so the penalty's gradient must be right through ``gamma``, ``beta``
    and the batch statistics (the convolution weight feeding the BatchNorm changes its batch
    mean and variance; an earlier BatchNorm's ``gamma`` changes every later statistic)."""
    model = vgg(widths=(3, 4)).train()
    x, y = batch(n=5)
    last = [b for b in bias_blocks(model, x) if b.spatial][-1]
    conv_name, bn_name = last.modules
    assert last.ops == ("conv2d", "batch_norm")
    names = [f"{bn_name}.weight", f"{bn_name}.bias", f"{conv_name}.weight", "1.weight", "1.bias"]
    params = dict(model.named_parameters())
    start = [params[n].detach().clone().requires_grad_(True) for n in names]

    def penalty(*values):
        return bias_jacobian_penalty(
            Substituted(model, dict(zip(names, values))), x, y, layers=[f"model.{last.name}"]
        )

    value = penalty(*start)
    assert value > 1e-6
    # Not vacuous: each of these parameters moves the penalty.
    grads = torch.autograd.grad(value, start)
    assert all(g.abs().max() > 1e-8 for g in grads)
    assert torch.autograd.gradcheck(penalty, tuple(start), eps=1e-6, atol=1e-8, rtol=1e-5)


def test_penalty_returns_output_and_decreases_under_training():
    model = vgg(seed=1).float().train()
    x, y = batch(n=8, dtype=torch.float32)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    values = []
    for _ in range(15):
        penalty, logits = bias_jacobian_penalty(model, x, y, return_output=True)
        assert logits.shape == (8, 3) and logits.requires_grad
        optimiser.zero_grad()
        penalty.backward()
        optimiser.step()
        values.append(penalty.item())
    assert values[-1] < 0.5 * values[0], values


def test_penalty_errors_list_available_layers():
    model = vgg()
    x, y = batch()
    with pytest.raises(ValueError, match=r"'2'.*Available blocks: 0, 4, 10 \(non-spatial\)"):
        bias_jacobian_penalty(model, x, y, layers=["2"])  # a ReLU has no bias source
    with pytest.raises(ValueError, match="no spatial"):
        bias_jacobian_penalty(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)).double(), x, y)
    # A non-spatial layer is allowed for the penalty.
    assert bias_jacobian_penalty(model, x, y, layers=model[10]) > 0


def test_bias_weight_decay():
    model = vgg()
    expected = model[4].bias.pow(2).sum() + model[5].bias.pow(2).sum()
    torch.testing.assert_close(bias_weight_decay(model, ["4", "5"]), expected)
    torch.testing.assert_close(bias_weight_decay(model, [model[4], model[5]]), expected)
    bias_weight_decay(model, ["4"]).backward()
    assert model[4].bias.grad is not None and model[5].bias.grad is None
    with pytest.raises(ValueError, match="no bias"):
        bias_weight_decay(model, ["3"])
    with pytest.raises(ValueError, match="not a module.*modules with a bias: 0, 1"):
        bias_weight_decay(model, ["nope"])


# --------------------------------------------------------------------------- matching
def flags(model):
    return [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("preset", list(MATCHING_PRESETS))
def test_every_preset_is_zero_for_a_copy_and_positive_for_a_perturbed_student(preset):
    teacher = vgg()
    x, y = batch()
    student = copy.deepcopy(teacher)
    loss, terms = full_jacobian_matching_loss(
        student, teacher, x, y, weights=preset, return_terms=True
    )
    assert loss.item() == 0.0
    weights = MATCHING_PRESETS[preset]
    for name in ("output", "input_jacobian", "bias_jacobian", "attention"):
        assert (getattr(terms, name) is None) == (getattr(weights, name) == 0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    perturbed = full_jacobian_matching_loss(student, teacher, x, y, weights=preset)
    assert perturbed.item() > 1e-6
    assert all(p.grad is None for p in teacher.parameters())


def test_bias_jacobian_term_matches_engine_maps():
    teacher = vgg()
    student = vgg(widths=(5, 7), seed=3)
    x, y = batch()
    weights = MatchingWeights(output=0.0, input_jacobian=0.0, bias_jacobian=1.0)
    loss, terms = full_jacobian_matching_loss(
        student, teacher, x, y, weights=weights, num_pairs=2, return_terms=True
    )
    assert terms.pairs == [("0", "0"), ("4", "4")]
    s_maps, t_maps = (
        full_jacobian(student, x, target=y).spatial_maps(),
        full_jacobian(teacher, x, target=y).spatial_maps(),
    )
    expected = torch.stack(
        [
            (F.normalize(s_maps[n].flatten(1), dim=1) - F.normalize(t_maps[n].flatten(1), dim=1))
            .pow(2)
            .sum(1)
            .mean()
            for n in ("0", "4")
        ]
    ).mean()
    torch.testing.assert_close(loss, expected)


def test_gradients_reach_the_student_only():
    teacher = vgg()
    student = vgg(widths=(5, 6), convs_per_block=2, seed=2).train()
    for p in list(teacher.parameters())[:3]:
        p.requires_grad_(False)  # mixed flags must survive as they are
    before = flags(teacher)
    x, y = batch()
    loss = full_jacobian_matching_loss(student, teacher, x, y, weights="full_jacobian_attention")
    loss.backward()
    assert flags(teacher) == before
    assert all(p.grad is None for p in teacher.parameters())
    # Every student parameter gets a gradient (conv biases only through the bias-Jacobian maps).
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert any(p.grad.abs().sum() > 0 for n, p in student.named_parameters() if n.endswith("bias"))


def test_teacher_in_train_mode_is_refused():
    teacher = vgg().train()
    x, y = batch()
    with pytest.raises(ValueError, match="teacher.*eval mode"):
        full_jacobian_matching_loss(copy.deepcopy(teacher), teacher, x, y)


def test_matching_loss_decreases_under_training():
    teacher = vgg(widths=(4, 6)).float()
    student = vgg(widths=(6, 8), convs_per_block=2, seed=5).float().train()
    x, y = batch(n=8, dtype=torch.float32)
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-2)
    values = []
    for _ in range(25):
        loss = full_jacobian_matching_loss(
            student, teacher, x, y, weights="full_jacobian_attention", num_pairs=2
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        values.append(loss.item())
    assert min(values[-5:]) < 0.7 * values[0], values


def test_pairs_of_different_resolution_are_interpolated():
    teacher = vgg(widths=(4, 6))  # maps at 8x8 and 4x4
    student = vgg(widths=(5, 6, 7), seed=1)  # 8x8, 4x4, 2x2
    x, y = batch()
    loss, terms = full_jacobian_matching_loss(
        student,
        teacher,
        x,
        y,
        layer_pairs=[("8", "0"), ("0", "4")],
        weights="full_jacobian_attention",
        return_terms=True,
    )
    assert torch.isfinite(loss) and terms.bias_jacobian > 0 and terms.attention > 0
    assert terms.pairs == [("8", "0"), ("0", "4")]
    # Modules are accepted in pairs, and automatic pairing takes the deepest blocks.
    _, auto = full_jacobian_matching_loss(
        student, teacher, x, y, weights="full_jacobian", return_terms=True
    )
    assert auto.pairs == [("4", "0"), ("8", "4")]
    _, by_module = full_jacobian_matching_loss(
        student, teacher, x, y, layer_pairs=[(student[8], teacher[0])], return_terms=True
    )
    assert by_module.pairs == [("8", "0")]


def test_layer_pairing_errors():
    teacher, student = vgg(), vgg(seed=1)
    x, y = batch()
    with pytest.raises(
        ValueError,
        match=(
            r"teacher layer 'bogus'.*Available blocks: 0, 4, 10 \(non-spatial\); "
            r"single sources: 1, 5"
        ),
    ):
        full_jacobian_matching_loss(student, teacher, x, y, layer_pairs=[("0", "bogus")])
    with pytest.raises(ValueError, match=r"student layer '3'.*Available"):
        full_jacobian_matching_loss(student, teacher, x, y, layer_pairs=[("3", "0")])
    with pytest.raises(ValueError, match=r"teacher layer '10' \(linear.*not a spatial map"):
        full_jacobian_matching_loss(
            student, teacher, x, y, layer_pairs=[("0", "10")], weights="attention"
        )
    with pytest.raises(ValueError, match="must be \\(student_layer, teacher_layer\\)"):
        full_jacobian_matching_loss(student, teacher, x, y, layer_pairs=["0"])
    with pytest.raises(ValueError, match="unknown preset 'fj'"):
        full_jacobian_matching_loss(student, teacher, x, y, weights="fj")
    with pytest.raises(ValueError, match="MatchingWeights.attention"):
        MatchingWeights(attention=-1.0)
    with pytest.raises(ValueError, match="differs from the teacher"):
        full_jacobian_matching_loss(vgg(num_classes=4), teacher, x, y, weights="activation")


def test_no_reference_cycle_keeps_activations_alive():
    """The capture's hooks close over the collector: it must hold nothing once the loss is built,
    or hook -> collector -> activation/graph -> hook is a cycle that Python cannot collect."""
    import weakref

    teacher = vgg()
    student = vgg(widths=(5, 6), seed=2).train()
    x, y = batch()
    seen = []
    handle = student[5].register_forward_hook(
        lambda module, args, out: seen.append(weakref.ref(out))
    )
    loss = full_jacobian_matching_loss(student, teacher, x, y, weights="full_jacobian_attention")
    loss.backward()
    penalty = bias_jacobian_penalty(student, x, y)
    penalty.backward()
    handle.remove()
    del loss, penalty
    assert len(seen) == 2 and all(ref() is None for ref in seen)
