"""The graph replay: a ReLU network's steps found in the autograd graph, not by module hooks.

Each guard test first brings the plan to a graph replay (trace, hooked replay, graph
replay), then changes the model so that the graph replay, were it not to check, would
return a silent wrong result; the call must be traced again and equal a fresh trace.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from captum_fullgrad import FullGradient, replay
from captum_fullgrad import capture as capture_module
from captum_fullgrad.testing import randomize_parameters_

from .conftest import build_zoo_model


@pytest.fixture
def modes(monkeypatch) -> List[str]:
    """How each forward pass was recorded: ``trace``, or a replay's ``hooks`` or ``graph``
    (``graph refused``: a graph replay that raised ReplayMismatch)."""
    seen: List[str] = []
    original = capture_module.forward_backward
    enter = replay.Replay.__enter__
    last: List[str] = []

    def spy_enter(self):
        last[:] = [self.mode]
        return enter(self)

    def spy(*args, **kwargs):
        last.clear()
        try:
            run = original(*args, **kwargs)
        except replay.ReplayMismatch:
            seen.append(f"{last[0]} refused")
            raise
        seen.append(getattr(run.recorder, "mode", "trace"))
        return run

    monkeypatch.setattr(replay.Replay, "__enter__", spy_enter)
    monkeypatch.setattr("captum_fullgrad.full_gradient.forward_backward", spy)
    return seen


def _attribute(fullgrad: FullGradient, x: torch.Tensor, target: int = 1):
    return fullgrad.attribute(x, target=target, return_convergence_delta=True)


def _assert_traced_result(model: nn.Module, x: torch.Tensor, result, target: int = 1) -> None:
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x, target)
    torch.testing.assert_close(result[0], traced, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result[1], traced_delta, rtol=0, atol=1e-12)
    assert traced_delta.abs().max() < 1e-10


class _Branches(nn.Module):
    """Conv-BN pairs (folded), a convolution without a bias, two resolutions, a residual
    (an output read twice), a Linear head, and a step whose output never reaches the
    selected output (an auxiliary head computed and dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.body = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.body_bn = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.aux = nn.Conv2d(8, 2, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.body_bn(self.body(y)) + y)
        y = torch.relu(self.down(y))
        self.aux(y)  # computed, never used
        return self.head(y.mean((2, 3)))


def _branches() -> nn.Module:
    return randomize_parameters_(_Branches().double(), 0).eval()


def _hooked_then_graph(model: nn.Module, x: torch.Tensor, modes: List[str]) -> FullGradient:
    """Trace, hooked replay, graph replay: both replays equal the trace, and no hook is
    left on the model; returns the FullGradient (its plan)."""
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x * 2)
    hooked = _attribute(fullgrad, x)
    graph = _attribute(fullgrad, x)
    assert modes == ["trace", "hooks", "graph"]
    for result in (hooked, graph):
        _assert_traced_result(model, x, result)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    return fullgrad


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("captured", [True, False], ids=["captured", "hooked"])
def test_a_relu_network_replays_from_its_graph_as_the_trace(modes, monkeypatch, captured, frozen):
    if not captured:
        monkeypatch.setattr(replay, "_CAPTURED_ELEMENTS", 0)  # every step's node hooked
    # Frozen parameters have no AccumulateGrad nodes: another graph, the same steps.
    model = _branches().requires_grad_(not frozen)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fullgrad = _hooked_then_graph(model, x, modes)
    (plan,) = [p for p in fullgrad._plans._plans.values() if p is not None]
    assert plan.graph is not None and None in plan.graph.step_positions  # the dropped head


# Every replayable zoo model but ConvNeXt, whose Linear layers run on 4-D tensors (their
# nodes are not addmm's: the graph cannot show which module ran, so it stays hooked).
@pytest.mark.parametrize(
    "name",
    ["resnet18", "densenet121", "shufflenet_v2_x0_5", "mobilenet_v3_small", "efficientnet_b0"],
)
def test_the_zoo_replays_from_its_graph(modes, name):
    model = build_zoo_model(name)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x * 2, target=3)
    _attribute(fullgrad, x * 2, target=3)
    result = _attribute(fullgrad, x, target=3)
    assert modes == ["trace", "hooks", "graph"]
    _assert_traced_result(model, x, result, target=3)


def _module_step_networks():
    from torchvision.models.convnext import LayerNorm2d

    from .test_replay import ACTIVATION_MODULES, Gate, _activation_network

    gated = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Gate(), nn.Flatten(), nn.Linear(144, 2))
    norms = [LayerNorm2d(4, eps=0.1), nn.GroupNorm(2, 4, eps=0.1)]
    shared = nn.SiLU()  # one module, two steps
    return {
        "activations": _activation_network(ACTIVATION_MODULES),
        "in_place": _activation_network(
            [nn.SiLU(inplace=True), nn.Hardswish(inplace=True), nn.ReLU6(inplace=True)]
        ),
        "product": randomize_parameters_(gated.double(), 0).eval(),
        "normalisations": _activation_network(norms),
        "shared_module": _activation_network([shared, nn.ReLU(), shared]),
    }


@pytest.mark.parametrize("name", list(_module_step_networks()))
def test_module_steps_replay_from_the_graph_as_the_trace(modes, name):
    """Activations, normalisations and returned products keep a hook on their own module
    (their terms need its call); every other layer is found in the graph."""
    model = _module_step_networks()[name]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    _hooked_then_graph(model, x, modes)


def test_regions_keep_the_hooked_replay(modes):
    """A region's boundary copies tensors in the forward pass: no graph replay."""
    from .test_replay_regions import _token_net

    model = _token_net()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fullgrad = FullGradient(model)
    for _ in range(3):
        _attribute(fullgrad, x)
    assert modes == ["trace", "hooks", "hooks"]
    (plan,) = [p for p in fullgrad._plans._plans.values() if p is not None]
    assert plan.boundary_starts and not plan.graph_eligible and plan.graph is None


def _to_graph_replay(model: nn.Module, x: torch.Tensor, modes: List[str]) -> FullGradient:
    fullgrad = FullGradient(model)
    for _ in range(3):
        _attribute(fullgrad, x)
    assert modes[-1] == "graph"
    modes.clear()
    return fullgrad


def _refused_after(model: nn.Module, x: torch.Tensor, modes: List[str], change) -> None:
    """Bring the plan to a graph replay, ``change()`` the model: the graph replay must
    refuse (and the call be traced), with the fresh trace's result."""
    fullgrad = _to_graph_replay(model, x, modes)
    change()
    result = _attribute(fullgrad, x)
    assert modes == ["graph refused", "trace"]
    _assert_traced_result(model, x, result)


def test_a_batch_norm_routed_to_other_statistics_is_traced(modes):
    from .test_replay import Routed

    routed = Routed()
    # Without affine parameters, only the statistics tell the two BatchNorms apart.
    routed.bn_a, routed.bn_b = nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4, affine=False)
    model = randomize_parameters_(routed.double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _refused_after(model, x, modes, lambda: setattr(model, "route", "b"))


class _RoutedLayers(nn.Module):
    """A convolution and a Linear head, each one of two of the same shape by a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.head_a = nn.Linear(4, 2)
        self.head_b = nn.Linear(4, 2)
        self.conv_route = self.head_route = "a"

    def forward(self, x):
        conv = self.conv_a if self.conv_route == "a" else self.conv_b
        head = self.head_a if self.head_route == "a" else self.head_b
        return head(torch.relu(conv(x)).mean((2, 3)))


@pytest.mark.parametrize("routed", ["conv_route", "head_route"])
def test_a_layer_routed_to_another_of_the_same_shape_is_traced(modes, routed):
    model = randomize_parameters_(_RoutedLayers().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _refused_after(model, x, modes, lambda: setattr(model, routed, "b"))


class _Optional(nn.Module):
    """An operation with an intercept (``+ 0.5``) that a flag adds between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.shift = False

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.shift:
            y = y + 0.5
        return self.head(y.mean((2, 3)))


def test_an_operation_added_to_the_forward_is_traced(modes):
    model = randomize_parameters_(_Optional().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _refused_after(model, x, modes, lambda: setattr(model, "shift", True))


def test_a_bias_given_to_a_convolution_without_one_is_traced(modes):
    # Frozen, as models often are for attribution: a new bias that requires no gradient
    # adds no node (a trainable one would add its AccumulateGrad).
    model = _branches().requires_grad_(False)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    # ``body`` had no bias (not a step): the same operations, one more source.
    bias = nn.Parameter(torch.randn(6, dtype=torch.float64), requires_grad=False)
    _refused_after(model, x, modes, lambda: setattr(model.body, "bias", bias))


def test_a_module_hook_added_after_the_plan_is_traced(modes):
    """The graph replay checks every planned module's hooks as the hooked replay does:
    a hook may change what a module computes in ways its operations do not show."""
    model = _branches()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    handles = []
    try:
        _refused_after(
            model,
            x,
            modes,
            lambda: handles.append(model.down.register_forward_hook(lambda m, a, o: None)),
        )
    finally:
        for handle in handles:
            handle.remove()


class _TwoActivations(nn.Module):
    """Two activation modules; a flag swaps the places where they are used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.act_a = nn.GELU()
        self.act_b = nn.GELU(approximate="tanh")
        self.head = nn.Linear(4, 2)
        self.swapped = False

    def forward(self, x):
        first, second = (self.act_b, self.act_a) if self.swapped else (self.act_a, self.act_b)
        y = second(self.conv_b(first(self.conv_a(x))))
        return self.head(y.mean((2, 3)))


def test_activation_modules_used_at_other_places_are_traced(modes):
    model = randomize_parameters_(_TwoActivations().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    _refused_after(model, x, modes, lambda: setattr(model, "swapped", True))


@pytest.mark.parametrize("change", ["attribute", "extra_call", "missing_call"])
def test_a_module_step_that_leaves_its_plan_is_traced(modes, change):
    from .test_replay import _activation_network

    shared = nn.SiLU()
    model = _activation_network([nn.GELU(), shared, shared])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    changes = {
        "attribute": lambda: setattr(model[1], "approximate", "tanh"),  # same node, other c
        "extra_call": lambda: model.__setitem__(1, shared),  # the shared SiLU thrice, no GELU
        "missing_call": lambda: model.__setitem__(5, nn.SiLU()),  # the shared SiLU once
    }
    _refused_after(model, x, modes, changes[change])


def test_parameters_changed_between_graph_replays_are_read(modes):
    model = _branches()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    fullgrad = _to_graph_replay(model, x, modes)
    with torch.no_grad():
        model.stem.bias.add_(0.3)  # folded into stem_bn
        model.down.bias.data.mul_(-2)  # captured, written through .data
        model.head.bias = nn.Parameter(model.head.bias.detach() + 1)  # replaced
        model.body_bn.running_var.mul_(2)
    result = _attribute(fullgrad, x)
    assert modes == ["graph"]
    _assert_traced_result(model, x, result)


@pytest.mark.parametrize(
    "options",
    [
        {"postprocess": "neurips2019"},
        {"postprocess": "signed"},
        {"layers": ["stem_bn", "down"]},
        {"single_channel": True},
        {"channels_last": True},
    ],
    ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()),
)
def test_graph_replays_in_every_mode_equal_the_trace(modes, options):
    options = dict(options)
    layers = options.pop("layers", None)
    model = _branches()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    if options.pop("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fullgrad = FullGradient(model, layers=layers)
    for scale in (2, 1, 1):
        result = fullgrad.attribute(x * scale, target=1, return_convergence_delta=True, **options)
    assert modes == ["trace", "hooks", "graph"]
    traced = FullGradient(model, layers=layers, reuse_capture=False).attribute(
        x, target=1, return_convergence_delta=True, **options
    )
    torch.testing.assert_close(result[0], traced[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result[1], traced[1], rtol=0, atol=1e-12)


def test_autocast_keeps_the_hooked_replay(modes):
    """Under autocast a layer's node saved a cast copy of its weight, not the module's:
    the graph cannot show which module ran, so the plan keeps the hooked replay."""
    model = randomize_parameters_(_Branches(), 0).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fullgrad = FullGradient(model)
        for scale in (2, 1, 1):
            result = _attribute(fullgrad, x * scale)
        traced = _attribute(FullGradient(model, reuse_capture=False), x)
    assert modes[:3] == ["trace", "hooks", "hooks"]
    torch.testing.assert_close(result[0], traced[0])
    torch.testing.assert_close(result[1], traced[1])


# ------------------------------------------------- what the graph cannot tell apart
# Found by review: each of these gave a silent wrong result in the graph replay (the hooked
# replay refused or was right). The plan either refuses to learn its graph, or the graph
# replay refuses the call.


class _Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(torch.relu(self.c3(y)).mean((2, 3)))


def test_a_layer_whose_output_shape_changed_is_traced(modes):
    """ResNet's 'last stride = 1' edit, in place: the same operations and parameters, but
    ``c3``'s output goes from 1x1 (not spatial: no map) to 2x2 (spatial)."""
    model = randomize_parameters_(_Strided().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    _refused_after(model, x, modes, lambda: setattr(model.c3, "stride", (1, 1)))


class _Tied(nn.Module):
    """Two convolutions with one (tied) weight and their own biases, chosen by a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b.weight = self.conv_a.weight
        self.head = nn.Linear(4, 2)
        self.route = "a"

    def forward(self, x):
        conv = self.conv_a if self.route == "a" else self.conv_b
        return self.head(torch.relu(conv(x)).mean((2, 3)))


class _TwoLevels(nn.Module):
    """One convolution called on two pyramid levels; a flag picks the one that is used."""

    def __init__(self) -> None:
        super().__init__()
        self.fine, self.coarse = nn.AvgPool2d(2), nn.AvgPool2d(8)
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 3)
        self.route = "a"

    def forward(self, x):
        fine, coarse = self.conv(self.fine(x)), self.conv(self.coarse(x))
        return self.head(torch.relu(fine if self.route == "a" else coarse).mean((2, 3)))


class _Padded(nn.Module):
    """A zero padding (no source) or one that fills 0.5 (a source), chosen by a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pad_zero, self.pad_half = nn.ConstantPad2d(1, 0.0), nn.ConstantPad2d(1, 0.5)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4, 3)
        self.route = "a"

    def forward(self, x):
        pad = self.pad_zero if self.route == "a" else self.pad_half
        return self.head(torch.relu(self.c2(pad(torch.relu(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("network", [_Tied, _TwoLevels, _Padded])
def test_plans_the_graph_cannot_tell_apart_keep_the_hooked_replay(modes, network):
    """Tied weights (a node shows the weight, not whose bias it added), a layer called
    twice (its nodes saved the same weight), a leaf module of a kind that may have an
    intercept (a padding's fill): the graph replay could not see the switch."""
    model = randomize_parameters_(network().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    fullgrad = FullGradient(model)
    for _ in range(3):
        _attribute(fullgrad, x)
    assert modes == ["trace", "hooks", "hooks"]
    model.route = "b"
    _assert_traced_result(model, x, _attribute(fullgrad, x))


class _TaskBiases(nn.Module):
    """A model run with another task's biases, swapped in for the call only
    (``torch.func.functional_call``); the biases are trainable tensors of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _branches()
        self.task_biases: dict = {}

    def forward(self, x):
        from torch.func import functional_call

        return functional_call(self.inner, self.task_biases, (x,))


def test_biases_swapped_in_for_the_call_are_seen_where_they_leave_an_edge(modes):
    """The graph replay reads a layer's bias after the forward pass, when the module has
    its own back; a bias that requires a gradient shows in the node's edge which tensor
    the call added, and the replay refuses. (One that requires none leaves no trace: see
    docs/usage.md.)"""
    model = _TaskBiases().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    biases = {
        "down.bias": (model.inner.down.bias.detach() + 1).requires_grad_(),
        "head.bias": (model.inner.head.bias.detach() - 1).requires_grad_(),
    }
    _refused_after(model, x, modes, lambda: model.task_biases.update(biases))
