"""Eq. 1: completeness on the torchvision zoo and on every construct the capture must see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad.testing import randomize_parameters_

from .conftest import ZOO, ZOO_INPUT_SIZE, UnseenSquare, build_zoo_model, tiny_swin


def relative_gap(fj) -> torch.Tensor:
    return fj.completeness_delta.abs() / fj.output.abs()


def assert_complete(fj, rtol: float = 1e-6) -> None:
    assert torch.isfinite(fj.completeness_delta).all()
    assert (fj.output.abs() > 1e-6).all(), "pick a target with a non-negligible output"
    assert (relative_gap(fj) < rtol).all(), f"completeness gap {relative_gap(fj).tolist()}"


def assert_split_per_example(model, x, batched, targets=None) -> None:
    """Each example of a batch gets the gap and bias terms it gets alone."""
    for i in range(x.shape[0]):
        single = full_jacobian(model, x[i : i + 1], target=None if targets is None else targets[i])
        torch.testing.assert_close(
            single.completeness_delta, batched.completeness_delta[i : i + 1], rtol=0, atol=1e-12
        )
        for name, term in single.bias_terms.items():
            torch.testing.assert_close(
                term, batched.bias_terms[name][i : i + 1], rtol=1e-9, atol=1e-12
            )


def bias_share(fj) -> torch.Tensor:
    """How much of f(x) the bias terms carry: guards against vacuous zero-bias tests."""
    return (fj.output - fj.input_term).abs() / fj.output.abs()


@pytest.mark.parametrize("name", ZOO)
def test_completeness_on_torchvision_zoo(name):
    model = build_zoo_model(name)
    size = ZOO_INPUT_SIZE.get(name, 48)
    x = torch.rand(
        2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = model(x)
    target = logits.abs().argmax(1)  # non-negligible outputs
    fj = full_jacobian(model, x, target=target)
    assert_complete(fj)
    assert not fj.failed_ops
    # The bias terms matter on these networks: without them eq. 1 would be far off.
    assert (bias_share(fj) > 1e-3).all()
    assert set(fj.bias_jacobians) == set(fj.sources)


def test_completeness_on_vision_transformer():
    """Stretch goal: attention, class token and position embedding are intercepts too."""
    model = build_zoo_model("vit")
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fj = full_jacobian(model, x, target=[1, 2])
    assert_complete(fj)
    ops = {s.op for s in fj.sources.values()}
    assert {"cat", "add", "layer_norm", "multi_head_attention_forward"} <= ops


def test_bias_jacobians_match_autograd_on_a_plain_network():
    """Names, shapes and values of f^b = df/dy * b against an independent autograd computation."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).double()
    randomize_parameters_(model, 3)
    model.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fj = full_jacobian(model, x, target=2)

    conv, bn, linear = model[0], model[1], model[4]
    z1 = conv(x)
    z2 = bn(z1)
    out = linear(torch.flatten(F.relu(z2), 1))[:, 2]
    g1, g2 = torch.autograd.grad(out.sum(), (z1, z2))
    effective = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected = {
        "0": g1 * conv.bias.view(1, -1, 1, 1),
        "1": g2 * effective.view(1, -1, 1, 1),
        "4": torch.zeros(2, 3, dtype=torch.float64).index_fill_(1, torch.tensor([2]), 1.0)
        * linear.bias,
    }
    assert list(fj.bias_jacobians) == ["0", "1", "4"]
    for name, value in expected.items():
        torch.testing.assert_close(fj.bias_jacobians[name], value.detach())
    # The conv and the BN reading its output form one block (the paper's conv-BN blocks).
    assert fj.blocks == {"0": ("0", "1"), "4": ("4",)}
    torch.testing.assert_close(fj.output, out.detach())


class _Constructs(nn.Module):
    """Everything the capture must see that leaf-module hooks would miss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)  # called twice
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.tied = nn.Linear(8, 8)
        self.head = nn.Linear(16, 5)
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x), inplace=True)  # functional in-place
        y = self.shared(x)
        y = F.silu(self.bn(y))
        y = self.shared(y) + x  # second call of the same module, residual
        y = y + self.offset  # constant added in forward
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        y = scale * y  # squeeze-and-excitation: product of two activations
        y.mul_(1.5)
        y = torch.cat([y, torch.tanh(y)], 1)
        pooled = F.adaptive_avg_pool2d(y, 1).flatten(1)
        a, b = pooled.split(8, 1)
        b = F.linear(b, self.tied.weight, self.tied.bias)  # shared weights, functional call
        b = self.tied(b)
        return self.head(torch.cat([a, F.gelu(b)], 1))


def test_completeness_on_every_construct():
    model = _Constructs().double()
    randomize_parameters_(model, 1)
    model.eval()
    x = torch.rand(3, 3, 10, 12, dtype=torch.float64)
    fj = full_jacobian(model, x, target=[0, 3, 4])
    assert_complete(fj, rtol=1e-9)
    names = list(fj.bias_jacobians)
    # A module run twice gets a call index; operations written in the root's forward are
    # named by their op (in a submodule's forward: "module:op").
    assert names == [
        "stem",
        "shared#0",
        "bn",
        "silu",
        "shared#1",
        "add",
        "fc1",
        "fc2",
        "sigmoid",
        "mul",
        "tanh",
        "linear",
        "tied",
        "gelu",
        "head",
    ]
    assert fj.blocks["shared#0"] == ("shared#0", "bn")


def test_in_place_activation_modules_give_the_same_decomposition():
    """The in-place trap (docs/math.md): an in-place ReLU overwrites the conv output that a
    forward hook saved."""
    torch.manual_seed(0)

    def make(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(6, 6, 3),
            nn.Hardswish(inplace=inplace),
            nn.Conv2d(6, 4, 1),
            nn.ReLU6(inplace=inplace),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        ).double()
        return randomize_parameters_(model, 0).eval()

    x = torch.randn(2, 3, 9, 9, dtype=torch.float64) * 3  # ReLU6 saturates somewhere
    inplace, copy = full_jacobian(make(True), x, target=1), full_jacobian(make(False), x, target=1)
    assert_complete(inplace, rtol=1e-9)
    assert list(inplace.bias_jacobians) == list(copy.bias_jacobians)
    for name in inplace.bias_jacobians:
        torch.testing.assert_close(inplace.bias_jacobians[name], copy.bias_jacobians[name])


def test_functional_model_and_additional_forward_args():
    weight = torch.randn(5, 12, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)

    def forward(x, shift, temperature=2.0):
        hidden = torch.tanh(x.flatten(1) @ weight.T + bias + shift)
        return F.softmax(hidden / temperature, dim=1)

    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    shift = torch.randn(4, 5, dtype=torch.float64)
    fj = full_jacobian(forward, x, target=1, additional_forward_args=(shift, 3.0))
    assert_complete(fj, rtol=1e-9)
    torch.testing.assert_close(fj.output, forward(x, shift, 3.0)[:, 1])


def test_missing_intercept_shows_in_the_delta():
    """An op the capture cannot see (a custom autograd Function) is never hidden."""

    def forward(x):
        return UnseenSquare.apply(x).flatten(1).sum(1)

    x = torch.randn(2, 4, dtype=torch.float64)
    fj = full_jacobian(forward, x)
    # Unseen, the decomposition claims <2x, x> = 2 f(x): a gap of exactly +f(x); 0 if seen.
    seen = torch.allclose(fj.completeness_delta, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    hidden = torch.allclose(fj.completeness_delta, fj.output)
    assert seen or hidden


def test_model_without_bias_sources_reduces_to_input_times_gradient():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2, bias=False)
    )
    model = model.double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fj = full_jacobian(model, x, target=0)
    assert len(fj.bias_jacobians) == 0
    torch.testing.assert_close(fj.output, fj.input_term)
    assert fj.completeness_delta.abs().max() < 1e-12


def test_target_formats_agree():
    model = build_zoo_model("resnet18")
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    by_list = full_jacobian(model, x, target=[2, 2, 2])
    for target in (2, torch.tensor(2), torch.tensor([2, 2, 2])):
        other = full_jacobian(model, x, target=target)
        torch.testing.assert_close(other.output, by_list.output)
        torch.testing.assert_close(other.input_jacobian, by_list.input_jacobian)


def test_batched_equals_per_example():
    model = build_zoo_model("mobilenet_v3_small")
    x = torch.rand(3, 3, 48, 48, dtype=torch.float64)
    batched = full_jacobian(model, x, target=[1, 4, 7])
    for i, t in enumerate([1, 4, 7]):
        single = full_jacobian(model, x[i : i + 1], target=t)
        torch.testing.assert_close(single.input_jacobian, batched.input_jacobian[i : i + 1])
        for name in single.bias_jacobians:
            torch.testing.assert_close(
                single.bias_jacobians[name], batched.bias_jacobians[name][i : i + 1]
            )


@pytest.mark.parametrize("batch", [1, 3])
def test_windowed_attention_is_complete_per_example(batch):
    """Swin folds windows into the batch axis, ``(B * windows, tokens, C)``, and splits
    ``q, k, v = qkv[0], qkv[1], qkv[2]``: every term must still be split per example (a
    single example once had its terms summed per window, several had them dropped)."""
    model = tiny_swin()
    x = torch.rand(
        batch, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    target = list(range(batch))
    fj = full_jacobian(model, x, target=target)
    assert not fj.failed_ops
    assert_complete(fj, rtol=1e-9)
    assert (bias_share(fj) > 1e-3).all()
    _, delta = FullGradient(model).attribute(x, target=target, return_convergence_delta=True)
    assert (delta.abs() < 1e-9 * fj.output.abs()).all()
    if batch > 1:
        assert_split_per_example(model, x, fj, target)


def test_batch_axis_followed_through_reshapes_and_indexing():
    """Patches folded into the batch axis with the example outermost, an index that drops
    an axis before it, ``unbind``: each example keeps its own terms."""
    torch.manual_seed(0)
    proj = nn.Linear(4, 12).double()
    randomize_parameters_(proj, 0)

    def model(t):
        b = t.shape[0]
        patches = t.reshape(b, 4, 4, 4).permute(0, 2, 1, 3).reshape(b * 4, 4, 4)  # (B*4, 4, 4)
        qkv = proj(patches).reshape(b * 4, 4, 3, 4).permute(2, 0, 1, 3)  # (3, B*4, 4, 4)
        q, k = qkv[0], qkv[1]
        _, _, v = qkv.unbind(0)
        mixed = torch.softmax(q @ k.transpose(-1, -2), -1) @ v + 0.3
        return mixed.reshape(b, -1).tanh().sum(1)

    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    fj = full_jacobian(model, x)
    assert not fj.failed_ops
    assert_complete(fj, rtol=1e-9)
    assert_split_per_example(model, x, fj)


class InPlaceOnView(nn.Module):
    """An in-place activation on a slice of a tensor that is then read through its base."""

    def __init__(self, activation, read_view: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.activation = activation
        self.read_view = read_view
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        view = self.activation(y[:, 1:3])
        if view is None:
            view = y[:, 1:3]
        pooled = (view if self.read_view else y).mean((2, 3))
        return self.head(pooled.repeat(1, 2)[:, :4])


IN_PLACE_ON_VIEWS = {
    "silu_module": lambda: nn.SiLU(inplace=True),
    "elu": lambda: lambda t: F.elu(t, inplace=True),
    "sigmoid_": lambda: lambda t: t.sigmoid_(),
    "relu6_module": lambda: nn.ReLU6(inplace=True),
}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("read_view", [False, True])
@pytest.mark.parametrize("name", sorted(IN_PLACE_ON_VIEWS))
def test_in_place_activation_on_a_view_read_through_its_base(name, read_view, memory_format):
    """The gradient of the overwritten slice reaches the base's node, not the view's: the
    activation's term was lost (completeness gap 0.03-0.25) until the hook went on the base
    (laid out like the base, channels-last included)."""
    model = randomize_parameters_(
        InPlaceOnView(IN_PLACE_ON_VIEWS[name](), read_view).double(), 0
    ).eval()
    model = model.to(memory_format=memory_format)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    x = x.contiguous(memory_format=memory_format)
    fj = full_jacobian(model, x, target=0)
    assert_complete(fj, rtol=1e-9)
    _, delta = FullGradient(model).attribute(x, target=0, return_convergence_delta=True)
    _, replayed_delta = FullGradient(model).attribute(x, target=0, return_convergence_delta=True)
    assert delta.abs().max() < 1e-10 and replayed_delta.abs().max() < 1e-10


def test_batch_axis_followed_through_stack_and_unsqueeze():
    """``stack([y, 2y], 0)`` puts a new axis before the batch axis: its first axis has
    the batch's length when B = 2, but it is not the batch axis."""
    conv = randomize_parameters_(nn.Conv2d(3, 4, 3, padding=1).double(), 0)

    def model(t):
        y = conv(t)
        stacked = torch.sigmoid(torch.stack([y, 2 * y], 0)) + y.unsqueeze(0).tanh()
        return stacked.sum(0).mean((1, 2, 3))

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fj = full_jacobian(model, x)
    assert not fj.failed_ops
    assert_complete(fj, rtol=1e-9)
    assert_split_per_example(model, x, fj)


def test_a_gate_times_activation_is_a_map_in_either_operand_order():
    """``s * x`` with a (B, C, 1, 1) gate ``s`` has ``x``'s layout: its bias-Jacobian enters
    the eq. 4 map whichever operand comes first."""
    conv = randomize_parameters_(nn.Conv2d(3, 4, 3, padding=1).double(), 0)

    def model(t, gate_first):
        y = torch.relu(conv(t))
        gate = torch.sigmoid(y.mean((2, 3), keepdim=True))
        spatial_gate = torch.sigmoid(y.mean(1, keepdim=True))  # (B, 1, H, W)
        # Neither (B, C, 1, 1) nor (B, 1, H, W) has the product's shape.
        both = gate * spatial_gate if gate_first else spatial_gate * gate
        return (gate * y if gate_first else y * gate).mean((1, 2, 3)) + both.mean((1, 2, 3))

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    maps = [
        FullGradient(model).attribute(x, additional_forward_args=(first,))
        for first in (True, False)
    ]
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-12, atol=1e-14)
    sources = full_jacobian(model, x, additional_forward_args=(True,)).sources
    assert [s.spatial for s in sources.values() if s.op == "mul"] == [True, True]


def test_a_term_without_a_batch_axis_is_reported():
    """An in-place activation on one example's slice: its term cannot be split per example
    in a batch, so it is left out with a warning, and the delta shows it."""
    conv = randomize_parameters_(nn.Conv2d(3, 4, 3, padding=1).double(), 0)

    def model(t):
        y = conv(t)
        F.silu(y.select(0, 0), inplace=True)
        return y.mean((1, 2, 3))

    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="no batch axis"):
        _, delta = FullGradient(model).attribute(x, return_convergence_delta=True)
    assert delta[0].abs() > 1e-4
    _, exact = FullGradient(model).attribute(
        x, return_convergence_delta=True, internal_batch_size=1
    )
    assert exact.abs().max() < 1e-12


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d(4, affine=True), nn.GroupNorm(2, 4)])
def test_norms_returning_views_survive_in_place_activations(norm):
    """instance_norm returns a view of an internal tensor; an in-place ReLU then rebases it."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), norm, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )
    model = randomize_parameters_(model.double(), 5).eval()
    fj = full_jacobian(model, torch.randn(2, 3, 6, 6, dtype=torch.float64), target=1)
    assert_complete(fj, rtol=1e-9)


def test_no_activation_outlives_the_call():
    """Hooks close over their sources; a source holding its output tensor would be a cycle
    through autograd that leaks every activation (seen as 139 GB on an H200)."""
    import gc
    import weakref

    model = build_zoo_model("resnet18")
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    seen = []

    def remember(_module, _inputs, output):
        seen.append(weakref.ref(output))

    handle = model.bn1.register_forward_hook(remember)  # a bias source's output
    try:
        from captum_fullgrad import FullGradient

        FullGradient(model).attribute(x, target=1)
        full_jacobian(model, x, target=1)
    finally:
        handle.remove()
    gc.collect()
    assert seen and all(ref() is None for ref in seen)


def test_hooks_do_not_fire_again_in_a_later_backward_pass():
    """With create_graph=True the caller backpropagates through the result; the capture's
    gradient hooks must not run (and collect) a second time."""
    from captum_fullgrad.capture import forward_backward

    calls = []

    class Counting:
        def on_source(self, source):
            pass

        def on_gradient(self, source, grad):
            calls.append(source.name)

    model = randomize_parameters_(
        nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).double()
    )
    model.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    run = forward_backward(model, x, lambda out: out[:, 0], (), Counting(), create_graph=True)
    first = len(calls)
    assert first == 3
    run.input_gradient.pow(2).sum().backward()
    assert len(calls) == first
    assert model[0].bias.grad is not None  # the double backward itself went through


class _Checkpointed(nn.Module):
    """Blocks under non-reentrant activation checkpointing (recomputed in the backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = self.stem(x)
        x = x + checkpoint(self.block, x, use_reentrant=False)
        return self.head(x.mean((2, 3)))


def test_activation_checkpointing_is_named_and_leaves_no_hook():
    """The trace's intercepts are not recomputed with a checkpointed block: the error says
    so and how to avoid it, instead of torch's count of saved tensors, and no hook stays."""
    model = randomize_parameters_(_Checkpointed().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    global_hooks = dict(torch.nn.modules.module._global_forward_hooks)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        FullGradient(model).attribute(x, target=1)
    assert dict(torch.nn.modules.module._global_forward_hooks) == global_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
