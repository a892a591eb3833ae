"""Replay: later calls find the traced bias sources with module hooks, exactly."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from captum.attr import NoiseTunnel
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad import capture as capture_module
from captum_fullgrad import replay as replay_module
from captum_fullgrad.replay import CapturePlan, Replay
from captum_fullgrad.testing import randomize_parameters_

from .conftest import ZOO_INPUT_SIZE, build_zoo_model

# Every bias source of these sits in a Conv/Linear/BatchNorm or activation module, or is a
# product a module returns (squeeze-and-excitation): they get a plan.
REPLAYABLE = [
    "vgg11_bn",
    "alexnet",
    "resnet18",
    "densenet121",
    "squeezenet1_1",
    "googlenet",
    "shufflenet_v2_x0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "convnext_tiny",
]
# Transformers (intercepts in operations written in a forward) replay region terms:
# tests/test_replay_regions.py, which also checks that a spatial one is still traced.


class Recorders:
    """Which recorder (traced Capture or Replay) ran each forward pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kinds: list = []
        original = capture_module.forward_backward

        def spy(*args, **kwargs):
            run = original(*args, **kwargs)
            self.kinds.append(type(run.recorder).__name__)
            return run

        monkeypatch.setattr("captum_fullgrad.full_gradient.forward_backward", spy)


@pytest.fixture
def recorders(monkeypatch):
    return Recorders(monkeypatch)


def _attribute(fullgrad: FullGradient, x: torch.Tensor, target=3, **kwargs):
    return fullgrad.attribute(x, target=target, return_convergence_delta=True, **kwargs)


def replay_equals_trace(recorders, model: nn.Module, x: torch.Tensor, target) -> FullGradient:
    """Attribute ``x`` (tracing), then ``x / 2`` replayed and traced: equal maps and
    deltas, the delta closed; returns the replaying FullGradient (its plan)."""
    fullgrad = FullGradient(model)
    first, _ = _attribute(fullgrad, x, target)
    replayed, delta = _attribute(fullgrad, x * 0.5, target)
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x * 0.5, target)
    assert recorders.kinds == ["Capture", "Replay", "Capture"]
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    # Eq. 1 closes on the replay as on the trace: region terms are exact, and the steps
    # outside them are still checked (a wrong region sign shows here).
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12
    assert not torch.equal(first, replayed)  # a different input, not a cached answer
    return fullgrad


@pytest.mark.parametrize("name", REPLAYABLE)
def test_replay_equals_the_trace_on_the_zoo(name, recorders):
    model = build_zoo_model(name)
    size = ZOO_INPUT_SIZE.get(name, 48)
    x = torch.randn(
        2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    target = model(x).argmax(1)  # a live output (SqueezeNet's last ReLU zeroes others)
    replay_equals_trace(recorders, model, x, target)


def test_single_channel_layers_and_neurips_modes_replay_exactly(recorders):
    model = build_zoo_model("resnet18")
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    for kwargs, layers in [
        ({"single_channel": True}, None),
        ({"postprocess": "neurips2019"}, None),
        ({"include_input_gradient": False}, ["layer2", "layer4"]),
    ]:
        fullgrad = FullGradient(model, layers=layers)
        reference = _attribute(FullGradient(model, layers=layers, reuse_capture=False), x, **kwargs)
        _attribute(fullgrad, x, **kwargs)
        replayed = _attribute(fullgrad, x, **kwargs)
        torch.testing.assert_close(replayed, reference, rtol=1e-12, atol=1e-12)
    assert recorders.kinds.count("Replay") == 3


def test_changed_parameters_and_statistics_are_read_at_each_call():
    model = build_zoo_model("vgg11_bn")

    def change():
        with torch.no_grad():
            model.features[0].bias.add_(0.3)  # in place: a folded conv bias
            model.features[1].running_var.mul_(2.0)  # in place: a BN statistic
            model.features[5].weight = nn.Parameter(model.features[5].weight * 1.5)  # replaced
            model.classifier[0].bias.sub_(0.1)

    _replay_matches_trace(model, torch.randn(1, 3, 48, 48, dtype=torch.float64), change, target=3)


class Switch(nn.Module):
    """A forward whose module calls depend on a flag: the replay must notice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.extra = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)
        self.use_extra = False

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if self.use_extra:
            y = torch.relu(self.extra(y))
        return self.head(y.mean((2, 3)))


def test_a_forward_that_leaves_the_plan_is_traced_again(recorders):
    model = randomize_parameters_(Switch().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    model.use_extra = True
    replayed, delta = _attribute(fullgrad, x, target=1)
    reference, reference_delta = _attribute(FullGradient(model, reuse_capture=False), x, target=1)
    torch.testing.assert_close(replayed, reference, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-12
    # The mismatching replay ran the forward pass, then the call was traced.
    assert recorders.kinds == ["Capture", "Capture", "Capture"]
    model.use_extra = False
    _attribute(fullgrad, x, target=1)  # a new plan from the previous trace does not fit
    _attribute(fullgrad, x, target=1)
    assert recorders.kinds[3:] == ["Capture", "Capture"]
    # Two mismatches for the same call signature: traced from then on.
    assert len(fullgrad._plans) == 0
    assert (
        not model._forward_hooks
        and not model.conv._forward_hooks
        and not model.extra._forward_hooks
    )


class ValueDependent(nn.Module):
    """The documented blind spot: an intercept that only some input values create."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if bool(x.mean() > 0):
            y = y + 1.0  # a constant added: its own bias source
        return self.head(y.mean((2, 3)))


def test_the_delta_reveals_a_value_dependent_operation_the_guard_cannot_see():
    model = randomize_parameters_(ValueDependent().double(), 0).eval()
    negative = -torch.rand(1, 3, 8, 8, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, negative, target=1)
    _, delta = _attribute(fullgrad, -negative, target=1)
    assert delta.abs().max() > 1e-3  # the missed "+ 1" shows in the completeness gap
    _, traced_delta = _attribute(FullGradient(model, reuse_capture=False), -negative, target=1)
    assert traced_delta.abs().max() < 1e-12


def test_shape_dtype_and_batch_get_their_own_plans(recorders):
    model = build_zoo_model("resnet18")
    fullgrad = FullGradient(model)
    for shape in [(1, 3, 48, 48), (2, 3, 48, 48), (1, 3, 64, 48), (1, 3, 48, 48)]:
        _attribute(fullgrad, torch.randn(*shape, dtype=torch.float64))
    assert recorders.kinds == ["Capture", "Capture", "Capture", "Replay"]
    assert len(fullgrad._plans) == 3


def test_internal_batches_and_noise_tunnel_reuse_their_plan(recorders):
    model = build_zoo_model("vgg11_bn")
    x = torch.randn(5, 3, 48, 48, dtype=torch.float64)
    fullgrad = FullGradient(model)
    chunked = _attribute(fullgrad, x, internal_batch_size=2)  # 2, 2, 1
    whole = _attribute(FullGradient(model, reuse_capture=False), x)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    assert recorders.kinds == ["Capture", "Replay", "Capture", "Capture"]
    recorders.kinds.clear()
    NoiseTunnel(fullgrad).attribute(
        x[:2], target=1, nt_type="smoothgrad", nt_samples=4, nt_samples_batch_size=4
    )
    NoiseTunnel(fullgrad).attribute(
        x[2:4], target=1, nt_type="smoothgrad", nt_samples=4, nt_samples_batch_size=4
    )
    assert "Replay" in recorders.kinds


def test_replay_leaves_no_hook_even_when_the_forward_raises():
    model = build_zoo_model("resnet18")
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.layer3[0].conv2.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        _attribute(fullgrad, x)
    handle.remove()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    _attribute(fullgrad, x)  # and the plan still works


ACTIVATION_MODULES = [
    nn.ReLU6(inplace=True),
    nn.Hardtanh(-0.5, 0.8),
    nn.SiLU(),
    nn.GELU(approximate="tanh"),
    nn.GELU(),
    nn.Hardswish(),
    nn.Hardsigmoid(),
    nn.Mish(),
    nn.ELU(alpha=0.7),
    nn.Softplus(beta=2.0, threshold=1.5),
    nn.Sigmoid(),
    nn.Tanh(),
]


def _activation_network(activations) -> nn.Module:
    layers = []
    for i, activation in enumerate(activations):
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1), activation]
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)]
    return randomize_parameters_(nn.Sequential(*layers).double(), 0).eval()


REPLAYED = ["Capture", "Replay", "Replay", "Capture"]


def test_activation_modules_replay_exactly(recorders):
    model = _activation_network(ACTIVATION_MODULES)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    _replay_matches_trace(model, x, lambda: None)
    assert recorders.kinds == REPLAYED


def test_in_place_activations_read_their_input_before_the_call(recorders):
    """An in-place SiLU overwrites its input before a forward hook runs: the replay takes
    g'(a) a in a pre-hook instead."""
    model = _activation_network(
        [nn.SiLU(inplace=True), nn.Hardswish(inplace=True), nn.Mish(inplace=True)]
    )
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 3
    _replay_matches_trace(model, x, lambda: None, target=0)
    assert recorders.kinds == REPLAYED


class Gate(nn.Module):
    """Squeeze-and-excitation's shape: a module that returns a product of two activations."""

    def __init__(self, product: bool = True) -> None:
        super().__init__()
        self.fc = nn.Conv2d(4, 4, 1)
        self.gate = nn.Sigmoid()
        self.product = product
        self.detach = False
        self.seen: "dict | None" = None  # a weak reference to the sigmoid's input, if set

    def forward(self, x):
        logits = self.fc(x.mean((2, 3), keepdim=True))
        if self.seen is not None:
            self.seen["gate input"] = weakref.ref(logits)
        scale = self.gate(logits)
        if self.detach:
            scale = scale.detach()  # a constant factor: no intercept
        return scale * x if self.product else x + scale


def test_a_returned_product_replays_and_its_guard_sees_a_change(recorders):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Gate(), nn.Flatten(), nn.Linear(144, 2))
    randomize_parameters_(model.double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    replayed, delta = _attribute(fullgrad, x * 0.5, target=1)
    traced, _ = _attribute(FullGradient(model, reuse_capture=False), x * 0.5, target=1)
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-10
    model[2].product = False  # the same modules, the same shapes: only the node differs
    changed, changed_delta = _attribute(fullgrad, x, target=1)
    reference, _ = _attribute(FullGradient(model, reuse_capture=False), x, target=1)
    assert recorders.kinds == ["Capture", "Replay", "Capture", "Capture", "Capture"]
    torch.testing.assert_close(changed, reference, rtol=1e-12, atol=1e-12)
    assert changed_delta.abs().max() < 1e-10


class _TokenLayerNorm(nn.Module):
    """A LayerNorm over the channels of a channels-last view (a transformer's tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4, eps=0.1)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_normalisation_modules_replay_exactly(recorders):
    """LayerNorm, GroupNorm, RMSNorm and ConvNeXt's LayerNorm2d (whose layer_norm runs on a
    channels-last tensor between two permutes) replay their closed-form intercepts."""
    from torchvision.models.convnext import LayerNorm2d

    norms = [
        LayerNorm2d(4, eps=0.1),
        nn.GroupNorm(2, 4, eps=0.1),
        _TokenLayerNorm(),
        nn.InstanceNorm2d(4, eps=0.1, affine=True),
    ]
    if hasattr(nn, "RMSNorm"):
        norms.append(nn.RMSNorm([4, 8, 8], eps=0.1))
    model = _activation_network(norms)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 0.3
    _replay_matches_trace(model, x, lambda: None)
    assert recorders.kinds == REPLAYED
    recorders.kinds.clear()
    _replay_matches_trace(
        model, x, lambda: setattr(model[3], "eps", 0.5)
    )  # a changed eps leaves the plan
    assert recorders.kinds == ["Replay", "Replay", "Capture", "Capture"]


def test_norms_returning_views_followed_by_an_in_place_activation(recorders):
    """LayerNorm2d returns a permuted view, instance_norm a reshaped one; an in-place ReLU
    on it sends the gradient through the view's base, so the replay hooks the base."""
    from torchvision.models.convnext import LayerNorm2d

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        LayerNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.InstanceNorm2d(4, affine=True),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    randomize_parameters_(model.double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _replay_matches_trace(model, x, lambda: None)
    assert recorders.kinds == REPLAYED


def test_user_hooks_that_could_change_what_the_replay_sees_prevent_a_plan(recorders):
    """A module's own pre-hook runs after the replay's global one (an in-place activation's
    input would be read before it), and a global forward hook before the replay's (it may
    replace an output): with either, calls are traced."""
    model = _activation_network([nn.SiLU(inplace=True)])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 3
    handle = model[1].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    _replay_matches_trace(model, x, lambda: None, target=0)
    handle.remove()
    assert "Replay" not in recorders.kinds
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output * 2 if isinstance(module, nn.SiLU) else None
    )
    try:
        _replay_matches_trace(_activation_network([nn.SiLU()]), x, lambda: None, target=0)
    finally:
        handle.remove()
    assert "Replay" not in recorders.kinds


def test_a_product_with_a_detached_factor_leaves_the_plan(recorders):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Gate(), nn.Flatten(), nn.Linear(144, 2))
    randomize_parameters_(model.double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _replay_matches_trace(model, x, lambda: setattr(model[2], "detach", True))
    assert recorders.kinds == ["Capture", "Replay", "Capture", "Capture"]


def test_a_changed_activation_attribute_leaves_the_plan(recorders):
    model = _activation_network([nn.GELU(), nn.Hardtanh(-1.0, 1.0)])
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64) * 3
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=0)
    model[1].approximate = "tanh"
    model[3].max_val = 0.5
    replayed, delta = _attribute(fullgrad, x, target=0)
    traced, _ = _attribute(FullGradient(model, reuse_capture=False), x, target=0)
    assert recorders.kinds == ["Capture", "Capture", "Capture"]
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-10


def test_a_plan_needs_exact_module_types():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 1.0

    model = nn.Sequential(MyConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    randomize_parameters_(model.double(), 0).eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    from captum_fullgrad.aggregation import MapCollector

    run = capture_module.forward_backward(model, x, lambda o: o[:, 0], (), MapCollector())
    assert CapturePlan.record(run.recorder) is None
    assert isinstance(run.recorder, capture_module.Capture) and not isinstance(run.recorder, Replay)


def test_autocast_state_is_part_of_the_signature(recorders):
    model = build_zoo_model("resnet18", dtype=torch.float32)
    x = torch.randn(1, 3, 48, 48)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, delta = _attribute(fullgrad, x)
        _, delta_again = _attribute(fullgrad, x)
    assert recorders.kinds == ["Capture", "Capture", "Replay"]
    torch.testing.assert_close(delta_again, delta)


def test_plans_are_shared_per_model_and_do_not_keep_it_alive(recorders):
    import gc
    import weakref

    from captum_fullgrad import replay

    model = build_zoo_model("resnet18")
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    _attribute(FullGradient(model), x)
    _attribute(
        FullGradient(model), x
    )  # a new attribution object per batch, as Captum code often does
    assert recorders.kinds == ["Capture", "Replay"]
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert all(m is not None for m in replay._PLANS.keys())


def test_parameters_swapped_through_data_are_not_served_from_a_stale_cache():
    # ``param.data = ...`` (what ``module.to`` does) leaves the version counter unchanged.
    model = build_zoo_model("vgg11_bn")
    bn = model.features[1]

    def swap():
        bn.running_mean.data = bn.running_mean.data + 0.5
        model.features[0].bias.data = model.features[0].bias.data * 2

    _replay_matches_trace(model, torch.randn(1, 3, 48, 48, dtype=torch.float64), swap, target=3)


@pytest.mark.parametrize("change", ["data", "to"])
def test_a_bias_given_new_storage_is_read_again(change):
    """A convolution's bias (not folded into a BatchNorm) that keeps its Parameter but
    gets new storage, by ``.data = ...`` or ``Module.to``, is read again by the batched
    reduction of several examples, not from rows made from its old storage."""
    model = _activation_network([nn.ReLU(), nn.SiLU()])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def swap():
        if change == "data":
            model[0].bias.data = model[0].bias.data + 0.7
        else:
            model.float().double()  # new storage for every parameter, values rounded

    _replay_matches_trace(model, x, swap)


def _replay_matches_trace(model, x, change, target=1):
    """Record a plan, apply ``change`` to the model, and compare a replay with a trace."""
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=target)
    _attribute(fullgrad, x, target=target)
    change()
    replayed, delta = _attribute(fullgrad, x, target=target)
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x, target=target)
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)
    assert (traced_delta.abs() <= 1e-10 * (1 + traced.abs().sum())).all()


def test_statistics_updated_by_a_training_step_without_a_version_bump():
    # BatchNorm's kernel updates the running statistics in place without bumping their
    # version counter: no cache keyed on versions may serve them (reviewer's finding).
    model = vgg_like()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def train_step():
        model.train()
        model(torch.randn(4, 3, 16, 16, dtype=torch.float64) * 3 + 1)
        model.eval()

    _replay_matches_trace(model, x, train_step)


def test_in_place_writes_through_data_are_seen():
    model = vgg_like()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def write():
        model[1].running_var.data.mul_(3)
        model[1].weight.data.mul_(2)
        model[0].bias.data.add_(1)  # a convolution folded into its BatchNorm

    _replay_matches_trace(model, x, write)


def test_a_user_hook_or_a_new_bias_after_the_trace_is_not_missed():
    model = vgg_like()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    handles = []
    _replay_matches_trace(
        model, x, lambda: handles.append(model[3].register_forward_hook(lambda m, i, o: o + 1.0))
    )
    handles.pop().remove()
    _replay_matches_trace(
        model,
        x,
        lambda: handles.append(model[4].register_forward_pre_hook(lambda m, a: (a[0] * 2 + 0.5,))),
    )
    handles.pop().remove()
    _replay_matches_trace(
        model,
        x,
        lambda: handles.append(nn.modules.module.register_module_forward_hook(lambda m, i, o: o)),
    )
    handles.pop().remove()

    def add_bias():
        model[3].bias = nn.Parameter(torch.randn(5, dtype=torch.float64))

    _replay_matches_trace(model, x, add_bias)


def vgg_like() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(5 * 8 * 8, 3),
    )
    return randomize_parameters_(model.double(), 0).eval()


# ------------------------------------------------------------- guards, each for its bug
# Each test below fails on a mutant that the rest of the suite passed: a silent wrong
# result, not an exception.


def test_a_replaced_bias_parameter_is_read_not_served_from_the_cache(recorders):
    """A layer's bias Parameter replaced by a new one (not folded into a BatchNorm): the
    replay reads the new bias, it does not serve the source built from the old one."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, 3),
    )
    model = randomize_parameters_(model.double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def replace():
        model[2].bias = nn.Parameter(model[2].bias.detach() + 0.7)
        model[6].bias = nn.Parameter(model[6].bias.detach() - 0.4)

    _replay_matches_trace(model, x, replace)
    assert recorders.kinds == ["Capture", "Replay", "Replay", "Capture"]  # it did replay


class Routed(nn.Module):
    """Routing by a flag (as in a mixture of experts): ``bn_a`` or ``bn_b``, the same number
    of calls and the same shapes either way; only the module identity differs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.route = "a"

    def forward(self, x):
        bn = self.bn_a if self.route == "a" else self.bn_b
        return self.head(torch.relu(bn(self.conv(x))).mean((2, 3)))


def test_a_forward_routed_to_another_module_of_the_same_shape_is_not_replayed(recorders):
    model = randomize_parameters_(Routed().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    model.route = "b"
    routed, delta = _attribute(fullgrad, x, target=1)
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x, target=1)
    torch.testing.assert_close(routed, traced, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)
    # The replay saw bn_b where the plan has bn_a, and the call was traced instead.
    assert recorders.kinds == ["Capture", "Capture", "Capture"]


class _AddHalf(torch.autograd.Function):
    """An intercept the capture cannot see (a custom autograd Function)."""

    @staticmethod
    def forward(ctx, x):
        return x + 0.5

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Hidden(nn.Module):
    def forward(self, x):
        return _AddHalf.apply(x)


def test_the_replayed_delta_has_the_traced_sign_and_size(recorders):
    """With a real completeness gap (an intercept hidden in a custom autograd Function),
    the replay's delta is the trace's and the decomposition's, sign included: a flipped
    sign in one of them cannot hide behind ``abs()``, whichever convention they share."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        _Hidden(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    model = randomize_parameters_(model.double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    _, replayed_delta = _attribute(fullgrad, x, target=1)
    _, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x, target=1)
    decomposed_delta = full_jacobian(model, x, target=1).completeness_delta
    assert recorders.kinds == ["Capture", "Replay", "Capture"]
    assert (traced_delta.abs() > 1e-3).all()  # a real gap, so the sign means something
    torch.testing.assert_close(replayed_delta, traced_delta, rtol=1e-12, atol=0)
    torch.testing.assert_close(traced_delta, decomposed_delta.to(traced_delta), rtol=1e-12, atol=0)


class _OverwrittenActivation(nn.Module):
    """A SiLU output overwritten in place after the activation (``y += z``): the
    backward-pass identity must not read the overwritten ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.act(self.conv(x))
        y += self.skip(x)  # two graph tensors: no intercept of its own, the plan holds
        return self.head(y.mean((2, 3)))


def test_activation_terms_come_from_the_backward_pass(recorders, monkeypatch):
    """Replayed activations whose node saves their input form no intercept tensor in the
    forward pass (``<df/dy, y> - <J^T df/dy, a>`` from the node's backward), in place or
    not, and stay equal to the trace's closed forms in float64."""
    model = _activation_network(
        [
            nn.SiLU(),
            nn.SiLU(inplace=True),
            nn.ReLU6(inplace=True),
            nn.GELU(),
            nn.Mish(),
            nn.Sigmoid(),  # its node saves the output: the replay keeps the input
            nn.Tanh(),
        ]
    )
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x * 3, target=0)

    def no_forward_intercept(*args, **kwargs):
        raise AssertionError("the replay formed an activation's intercept in the forward pass")

    monkeypatch.setattr("captum_fullgrad.replay.activation_linear_part", no_forward_intercept)
    replayed, delta = _attribute(fullgrad, x * 3, target=0)
    monkeypatch.undo()
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x * 3, target=0)
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)


class _GateInputChanged(nn.Module):
    """A sigmoid whose input is changed in place after the call: its node saved only the
    output, so the input the replay kept no longer gives the term. ``where``:
    ``"spatial"``, a gate of every position; ``"pooled"``, one position per channel
    (squeeze-excitation's), whose closed form the replay forms after the backward pass;
    ``"slice"``, a gate of one slice of a tensor whose other slice an in-place ReLU
    overwrites afterwards, on every call (the values the sigmoid read are unchanged, but
    the version counter it shares with them moves)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8 if where == "slice" else 4, 3, padding=1)
        self.gate = nn.Sigmoid()
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)
        self.where = where
        self.change = False

    def forward(self, x):
        z = self.conv(x)
        if self.where == "slice":
            y = self.gate(z[:, :4])
            return self.head((y + self.act(z[:, 4:])).mean((2, 3)))
        a = z.mean((2, 3), keepdim=True) if self.where == "pooled" else z
        y = self.gate(a)
        if self.change:
            with torch.no_grad():  # no node in the graph: only the version shows it
                a.mul_(3.0)  # allowed: sigmoid's backward reads only y
        return self.head((y + a).mean((2, 3)))


@pytest.mark.parametrize("where", ["spatial", "pooled", "slice"])
def test_an_activation_input_changed_after_the_call_keeps_its_closed_form(recorders, where):
    """The call whose kept input changed is traced; the plan holds, and from the next call
    that step forms its closed form in the forward pass (no retrace on every call)."""
    model = randomize_parameters_(_GateInputChanged(where).double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    if where != "slice":
        _attribute(fullgrad, x, target=1)
        model.change = True  # the same calls, shapes and nodes: only the values differ
    changed, delta = _attribute(fullgrad, x, target=1)  # the replay stops; a trace
    again, again_delta = _attribute(fullgrad, x, target=1)  # a replay, closed form
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x, target=1)
    # The first call traces; a replay before the change (not with "slice") fits.
    before = [] if where == "slice" else ["Replay"]
    assert recorders.kinds == ["Capture", *before, "Capture", "Replay", "Capture"]
    for result, result_delta in ((changed, delta), (again, again_delta)):
        torch.testing.assert_close(result, traced, rtol=1e-12, atol=1e-12)
        # (A change the graph does not record leaves eq. 1 open, for the trace too.)
        torch.testing.assert_close(result_delta, traced_delta, rtol=0, atol=1e-12)


class _PooledGates(nn.Module):
    """Squeeze-excitation gates of one position per channel, in place or not, one with its
    output then overwritten in place (hardsigmoid's node saves only the input, so that is
    allowed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gates = nn.ModuleList(
            [nn.Hardsigmoid(inplace=True), nn.Sigmoid(), nn.SiLU(inplace=True), nn.Tanh()]
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        z = self.conv(x)
        pooled = z.mean((2, 3), keepdim=True)
        scale = self.gates[0](pooled * 4.0)
        scale += pooled  # overwritten: the replay recomputes it from the input it kept
        for gate in self.gates[1:]:
            scale = gate(scale * 2.0)
        return self.head((z + scale).mean((2, 3)))


def test_pooled_gates_form_their_closed_forms_after_the_backward_pass(recorders, monkeypatch):
    """Small gates outside the maps get no Python hook: their gradients come back with the
    input gradient, and their closed forms (the trace's values) are formed from the input
    and output kept since the forward pass, the overwritten output recomputed."""
    model = randomize_parameters_(_PooledGates().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    formed: list = []
    original = Replay._deferred_intercepts

    def spy(self):
        formed.append(len(self._deferred))
        original(self)

    monkeypatch.setattr(Replay, "_deferred_intercepts", spy)
    monkeypatch.setattr(
        replay_module, "_identity_hook", lambda *args, **kwargs: pytest.fail("a gate was hooked")
    )
    replayed, delta = _attribute(fullgrad, x * 2, target=1)
    assert recorders.kinds == ["Capture", "Replay"]
    monkeypatch.undo()
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x * 2, target=1)
    assert formed == [4]
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12


def test_an_activation_output_overwritten_later_is_recomputed(recorders):
    model = randomize_parameters_(_OverwrittenActivation().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _replay_matches_trace(model, x * 2, lambda: None)
    assert recorders.kinds == REPLAYED


class _OverwrittenGate(nn.Module):
    """A returned product overwritten in place by its caller (``y += z``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.skip = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.gate(torch.relu(self.conv(x)))
        y += self.skip(x)
        return self.head(y.mean((2, 3)))


def test_a_returned_product_overwritten_later_is_recomputed(recorders):
    model = randomize_parameters_(_OverwrittenGate().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    _replay_matches_trace(model, x * 2, lambda: None)
    assert recorders.kinds == REPLAYED


def test_a_gated_activation_term_is_the_general_identity_bit_for_bit():
    """Hardtanh/ReLU6 pass df/dy unchanged where y = a and nothing elsewhere, so the replay's
    ``(df/dy - J^T df/dy) * y`` (no saved input read) is ``df/dy * y - (J^T df/dy) * a``
    exactly, saturated elements on both sides included."""
    from captum_fullgrad._intercepts import Intercept

    generator = torch.Generator().manual_seed(11)
    a = torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=generator) * 5
    a[0, 0, 0, :2] = torch.tensor([0.0, 6.0], dtype=torch.float64)  # the kinks themselves
    grad = torch.randn(a.shape, dtype=torch.float64, generator=generator)
    y = torch.nn.functional.relu6(a)
    input_grad = torch.ops.aten.hardtanh_backward(grad, a, 0.0, 6.0)
    source = capture_module.BiasSource(
        name="act",
        module="act",
        op="hardtanh",
        index=0,
        shape=a.shape,
        channel_dim=1,
        spatial=True,
        block="act",
        intercept=Intercept(None, backward_pair=(y, input_grad, None)),
    )
    gated = source.bias_jacobian(grad)
    source.intercept.backward_pair = (y, input_grad, a)
    general = source.bias_jacobian(grad)
    closed = grad * (y - torch.ops.aten.hardtanh_backward(y, y, 0.0, 6.0))
    assert torch.equal(gated, closed)
    torch.testing.assert_close(gated, general, rtol=0, atol=1e-15)
    assert (gated != 0).any() and (gated == 0).any()


def test_replayed_relu6_reads_no_saved_input(recorders, monkeypatch):
    """The gated form is what a replayed ReLU6 uses: its backward pair carries no input."""
    model = _activation_network([nn.ReLU6(inplace=True), nn.ReLU6()])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x * 3, target=0)
    pairs = []
    original = capture_module._pair_term

    def spy(grad, y, input_grad, a, *rest):
        pairs.append((y, input_grad, a))
        return original(grad, y, input_grad, a, *rest)

    monkeypatch.setattr(capture_module, "_pair_term", spy)
    replayed, delta = _attribute(fullgrad, x * 3, target=0)
    monkeypatch.undo()
    assert recorders.kinds == ["Capture", "Replay"]
    assert len(pairs) == 2 and all(p[2] is None for p in pairs)
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x * 3, target=0)
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)


class _OverwrittenNorm(nn.Module):
    """A normalisation's output overwritten in place by its caller (``y += z``), where its
    gradient is not zero (an in-place ReLU would only clear where the gradient is)."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        from torchvision.models.convnext import LayerNorm2d

        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.channels_last = channels_last
        self.norm = nn.LayerNorm(4) if channels_last else LayerNorm2d(4)
        self.skip = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        z = self.conv(x)
        if self.channels_last:
            y = self.norm(z.permute(0, 2, 3, 1))
            y += self.skip(x).permute(0, 2, 3, 1)
            return self.head(y.mean((1, 2)))
        y = self.norm(z)
        y += self.skip(x)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_normalisation_output_overwritten_later_is_recomputed(recorders, channels_last):
    """The replay forms a normalisation's intercept only in the backward pass, from the
    output; overwritten since, the output is recomputed from the input (float64, against
    the trace's closed form, which is formed in the forward pass)."""
    model = randomize_parameters_(_OverwrittenNorm(channels_last).double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    _replay_matches_trace(model, x * 2, lambda: None)
    assert recorders.kinds == REPLAYED


@pytest.mark.parametrize(
    "settings, channel_dim, layout",
    [
        (("layer_norm", 1, 0.1), 3, "last"),  # ConvNeXt's block LayerNorm, channels last
        (("channel_layer_norm", 1, 0.1), 1, "first"),  # LayerNorm2d
        (("rms_norm", 3, 0.1), 1, "first"),  # over channels and positions: s per example
        (("group_norm", 2, 0.1), 1, "first"),  # s varies with the channel: no factored form
    ],
)
def test_a_normalisations_channel_sum_equals_its_closed_form(settings, channel_dim, layout):
    """The replay's channel sum of a normalisation's term, ``(1 - s) sum_c g y + s g.beta``
    where ``s`` is constant along the channels, against ``sum_c g * c`` with the closed form
    ``c = y - (y - beta) s`` (float64)."""
    from captum_fullgrad._intercepts import Intercept, normalisation_intercept, normalisation_parts

    generator = torch.Generator().manual_seed(13)
    shape = (2, 4, 5, 3) if layout == "first" else (2, 5, 3, 4)
    a = torch.randn(shape, dtype=torch.float64, generator=generator) * 0.3 + 0.2
    grad = torch.randn(shape, dtype=torch.float64, generator=generator)
    channels = shape[channel_dim]
    weight = torch.randn(channels, dtype=torch.float64, generator=generator)
    bias = None if settings[0] == "rms_norm" else torch.randn(channels, dtype=torch.float64)
    if settings[0] == "layer_norm":
        y = torch.nn.functional.layer_norm(a, (channels,), weight, bias, settings[2])
    elif settings[0] == "channel_layer_norm":
        y = torch.nn.functional.layer_norm(
            a.permute(0, 2, 3, 1), (channels,), weight, bias, settings[2]
        ).permute(0, 3, 1, 2)
    elif settings[0] == "rms_norm":
        y = torch.nn.functional.rms_norm(a, shape[1:], None, settings[2])
    else:
        y = torch.nn.functional.group_norm(a, settings[1], weight, bias, settings[2])
    closed = (grad * normalisation_intercept(settings, a, y, bias)).sum(channel_dim)
    source = capture_module.BiasSource(
        name="norm",
        module="norm",
        op=settings[0],
        index=0,
        shape=a.shape,
        channel_dim=channel_dim,
        spatial=True,
        block="norm",
        intercept=Intercept(None, shrunk_output=normalisation_parts(settings, a, y, bias)),
    )
    factored = capture_module._shrunk_channel_sum(grad, source.intercept.shrunk_output, channel_dim)
    assert (factored is None) == (settings[0] == "group_norm")
    torch.testing.assert_close(source.channel_summed(grad), closed, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(
        source.per_example_sum(grad), closed.flatten(1).sum(1), rtol=1e-13, atol=1e-14
    )


@pytest.mark.parametrize("layer_norm_2d", [False, True])
def test_layer_norm_statistics_come_from_the_kernel(recorders, monkeypatch, layer_norm_2d):
    """A replayed LayerNorm (and ConvNeXt's LayerNorm2d) reads ``1 / sqrt(var + eps)`` from
    its autograd node instead of a second pass over the input for the variance; the map and
    the delta are the trace's (which computes the variance) to rounding."""
    from torchvision.models.convnext import LayerNorm2d

    from captum_fullgrad import _intercepts

    model = _activation_network([LayerNorm2d(4, eps=0.1) if layer_norm_2d else _TokenLayerNorm()])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x, target=1)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    with monkeypatch.context() as patch:

        def no_variance(*args, **kwargs):
            raise AssertionError("the replay recomputed a variance")

        patch.setattr(torch.Tensor, "var", no_variance)
        replayed, delta = _attribute(fullgrad, x, target=1)
    assert recorders.kinds == ["Capture", "Capture", "Replay"]
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)
    # The kernel's statistic against the closed form's, directly.
    norm = model[1] if layer_norm_2d else model[1].norm
    a = torch.randn(2, 4, 8, 8, dtype=torch.float64).requires_grad_()
    settings = _intercepts.normalisation_settings(norm)
    if layer_norm_2d:
        y = norm(a)
        rstd = _intercepts.saved_layer_norm_rstd(settings, y)
        reference = _intercepts.normalisation_parts(settings, a, y, norm.bias)
    else:
        tokens = a.permute(0, 2, 3, 1)
        y = norm(tokens)
        rstd = _intercepts.saved_layer_norm_rstd(settings, y)
        reference = _intercepts.normalisation_parts(settings, tokens, y, norm.bias)
    assert rstd is not None
    shrink = _intercepts.normalisation_parts(settings, a, y, norm.bias, rstd=rstd)[2]
    torch.testing.assert_close(shrink, reference[2], rtol=1e-14, atol=0)


# ------------------------------------------------- BatchNorm vectors on flat tensors


def _mixed_batch_norms(kind: str) -> nn.Module:
    """BatchNorms of different widths and eps, two folded into a convolution, one reading a
    bias-free convolution, one reading a ReLU (the flat path's split and eps placement);
    ``"all_folded"`` keeps the first two only, ``"non_affine"`` makes the last non-affine."""
    affine_last = kind != "non_affine"
    layers = [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, eps=1e-3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6, eps=0.1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.BatchNorm2d(5, eps=0.05, affine=affine_last),
    ]
    if kind == "all_folded":
        layers = layers[:6]
    width = [m for m in layers if isinstance(m, nn.BatchNorm2d)][-1].num_features
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 3))
    return randomize_parameters_(model.double(), 0).eval()


@pytest.mark.parametrize("kind", ["affine", "non_affine", "all_folded"])
def test_flat_batch_norm_vectors_match_each_layers_formula(kind):
    from captum_fullgrad.replay import _foreach_batch_norm_vectors

    model = _mixed_batch_norms(kind)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x, target=1)
    plan = next(p for p in fullgrad._plans._plans.values() if p is not None)
    vectors = plan.batch_norm_vectors()
    assert vectors is not None and len(vectors) == (2 if kind == "all_folded" else 4)
    steps = sorted(vectors)
    modules = [plan.calls[plan.step_call[s]]() for s in steps]
    convs = [
        None
        if plan.steps[s].absorbs is None
        else plan.calls[plan.step_call[plan.steps[s].absorbs]]()
        for s in steps
    ]
    assert [c is not None for c in convs] == [True, True, False, False][: len(steps)]
    with torch.no_grad():
        expected = _foreach_batch_norm_vectors(modules, convs)
        for bn, conv, got, want in zip(modules, convs, (vectors[s] for s in steps), expected):
            scale = (bn.running_var + bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight
            effective = -bn.running_mean * scale
            if bn.bias is not None:
                effective = effective + bn.bias
            assert [v is None for v in got] == [v is None for v in want]
            torch.testing.assert_close(got[0], scale, rtol=1e-15, atol=0)
            torch.testing.assert_close(got[1], effective, rtol=1e-15, atol=1e-16)
            if conv is not None:
                torch.testing.assert_close(got[2], conv.bias * scale, rtol=1e-15, atol=0)
                torch.testing.assert_close(
                    got[3], effective + conv.bias * scale, rtol=1e-14, atol=1e-16
                )


@pytest.mark.parametrize("kind", ["affine", "non_affine", "all_folded"])
def test_mixed_batch_norms_replay_the_trace_after_a_training_step(kind):
    model = _mixed_batch_norms(kind)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def train_step():
        model.train()
        model(torch.randn(4, 3, 8, 8, dtype=torch.float64) * 2 + 1)
        model.eval()
        model[4].weight.data.mul_(-1.5)  # a flat view's layer, written without a version bump

    _replay_matches_trace(model, x, train_step)


# ------------------------------------------------- gradients captured by the backward pass


class _Resolutions(nn.Module):
    """Layers of several resolutions and kinds: conv-BN blocks (folded), a BatchNorm after
    an in-place ReLU-free path, a convolution without a BatchNorm, one of two readers of a
    layer's output, a branch that does not reach the output, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(True))
        self.same = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.plain = nn.Conv2d(6, 5, 1)
        self.down = nn.Sequential(
            nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.BatchNorm2d(7), nn.ReLU(True)
        )
        self.unused = nn.Conv2d(7, 2, 1)
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.same(x)
        z = self.plain(y)
        z = z + z.relu()  # two readers of the convolution's output
        z = self.down(z)
        self.unused(z)  # reaches nothing the target depends on: no gradient
        return self.head(z.mean((2, 3)))


def _captured_network() -> nn.Module:
    return randomize_parameters_(_Resolutions().double(), 0).eval()


def _sizes_passed(monkeypatch, owner: type, name: str) -> list:
    """Spy on method ``name`` of ``owner``: the list it returns gets the length of the
    sequence passed to each call (captured pairs or gradients)."""
    sizes: list = []
    original = getattr(owner, name)

    def spy(self, items):
        sizes.append(len(items))
        return original(self, items)

    monkeypatch.setattr(owner, name, spy)
    return sizes


def test_captured_gradients_give_the_hooked_and_traced_result(recorders, monkeypatch):
    """Small layers' gradients captured by the backward pass (and handed over together
    after it) give what per-layer hooks and the trace give, maps and delta."""
    from captum_fullgrad import aggregation, replay

    batches = _sizes_passed(monkeypatch, aggregation.MapCollector, "on_gradients")
    model = _captured_network()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    traced = _attribute(FullGradient(model, reuse_capture=False), x)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x * 2)
    captured = _attribute(fullgrad, x)
    assert batches and max(batches) >= 2  # several layers were captured
    monkeypatch.setattr(replay, "_CAPTURED_ELEMENTS", 0)
    hooked = _attribute(fullgrad, x)
    assert recorders.kinds == ["Capture", "Capture", "Replay", "Replay"]
    for result in (captured, hooked):
        torch.testing.assert_close(result[0], traced[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result[1], traced[1], rtol=0, atol=1e-10)
    assert traced[1].abs().max() < 1e-10


def test_captured_gradients_with_other_postprocessing_and_autocast(recorders):
    """The NeurIPS and signed modes, ``layers=``, one channel and autocast take the same
    captured gradients one by one: equal to the trace."""
    model = _captured_network()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for kwargs in ({"postprocess": "neurips2019"}, {"postprocess": "signed"}, {}):
        for layers in (None, ["same.1"]):
            if layers is not None and kwargs.get("postprocess") == "signed":
                continue
            fullgrad = FullGradient(model, layers=layers)
            _attribute(fullgrad, x * 2, **kwargs)
            replayed = _attribute(fullgrad, x, **kwargs)
            traced = _attribute(
                FullGradient(model, layers=layers, reuse_capture=False), x, **kwargs
            )
            torch.testing.assert_close(replayed[0], traced[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(replayed[1], traced[1], rtol=0, atol=1e-10)
    assert "Replay" in recorders.kinds
    float_model = randomize_parameters_(_Resolutions(), 0).eval()
    xf = x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fullgrad = FullGradient(float_model)
        _attribute(fullgrad, xf)
        replayed = _attribute(fullgrad, xf)
        traced = _attribute(FullGradient(float_model, reuse_capture=False), xf)
    torch.testing.assert_close(replayed[0], traced[0])
    torch.testing.assert_close(replayed[1], traced[1])


def test_without_gradient_edges_the_replay_hooks_every_layer(recorders, monkeypatch):
    """On a torch whose ``autograd.grad`` takes no autograd edges, nothing is captured and
    the result is unchanged."""
    from captum_fullgrad import replay

    assert replay.gradient_edges_supported()  # this torch: the captured path is tested
    model = _captured_network()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    expected = _attribute(fullgrad, x)
    monkeypatch.setattr(replay, "_EDGES_SUPPORTED", False)
    edges = _sizes_passed(monkeypatch, replay.Replay, "deliver_gradients")
    result = _attribute(fullgrad, x)
    assert edges == [] and recorders.kinds[-1] == "Replay"
    torch.testing.assert_close(result[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result[1], expected[1], rtol=0, atol=1e-12)


def test_captured_layers_read_a_bias_written_through_data(recorders):
    """A convolution's bias written through ``.data`` (no version bump) between two
    replays: the layers reduced together with it use the new bias, not the last call's
    weights; BatchNorm statistics written the same way give new vectors too."""
    model = _captured_network()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    _attribute(fullgrad, x)
    for write in (
        lambda: model.plain.bias.data.add_(0.5),
        lambda: model.same[1].running_var.data.mul_(3.0),
    ):
        write()
        replayed = _attribute(fullgrad, x)
        traced = _attribute(FullGradient(model, reuse_capture=False), x)
        torch.testing.assert_close(replayed[0], traced[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(replayed[1], traced[1], rtol=0, atol=1e-10)
    assert recorders.kinds.count("Replay") == 3


def test_batch_norm_inputs_concatenated_in_parts_equal_one_concatenation():
    """Above torch.cat's serial threshold the BatchNorm inputs are concatenated in parts
    (a column of layers of uneven sizes, a column with none): the same flat tensor."""
    from captum_fullgrad.replay import _SERIAL_CAT_ELEMENTS, _concatenated

    generator = torch.Generator().manual_seed(5)
    sizes = [16, 960, 32, 2048, 96, 7, 1280, 640] * 6
    columns = [[torch.randn(n, generator=generator) for n in sizes] for _ in range(4)] + [[]]
    per_column = sum(sizes)
    assert per_column * len(columns) >= _SERIAL_CAT_ELEMENTS
    expected = torch.cat([t for column in columns for t in column])
    assert torch.equal(_concatenated(columns, per_column), expected)
    few = [column[:3] for column in columns]
    assert torch.equal(_concatenated(few, sum(sizes[:3])), torch.cat([t for c in few for t in c]))


class _Inline(nn.Module):
    """An operation written in a forward (a region: one term per call)."""

    def forward(self, x):
        return x * torch.tanh(x)


class _Recorded(nn.Module):
    """The tensors that a replay's gradient hooks read, each kept by the model only as a
    weak reference: a region's input, an activation's output, a sigmoid's input (its node
    saves only the output; a spatial one is hooked, a pooled one's closed form is formed
    after the backward pass), a returned product, and a normalisation's input and output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.inline = _Inline()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.sigmoid = nn.Sigmoid()  # spatial: hooked, its input kept for the hook
        self.gate = Gate()
        self.conv4 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4, eps=0.1)
        self.seen: dict = {}
        self.gate.seen = self.seen
        self.conv5 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        activation_output = self.act(self.conv2(self.conv1(x)))
        sigmoid_input = self.conv3(activation_output)
        product = self.gate(self.sigmoid(sigmoid_input))
        norm_input = self.conv4(product)
        norm_output = self.norm(norm_input)
        # A region over positions would hold spatial sources (traced, never a region).
        region_input = self.conv5(norm_output).mean((2, 3))
        for name, tensor in [
            ("region input", region_input),
            ("activation output", activation_output),
            ("sigmoid input", sigmoid_input),
            ("product", product),
            ("normalisation input", norm_input),
            ("normalisation output", norm_output),
        ]:
            self.seen[name] = weakref.ref(tensor)
        return self.head(self.inline(region_input))


def test_hooks_release_what_they_read_when_the_backward_pass_has_read_it(monkeypatch):
    """Every tensor that a replay's hook reads is freed when the backward pass no longer
    needs it, not kept by the hook until the graph is dropped after the pass: otherwise
    each activation output outlives the node that read it and a CPU backward pass takes
    fresh memory for its gradients (EfficientNet-B0's resident peak, docs/benchmarks.md)."""
    model = randomize_parameters_(_Recorded().double(), 0).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fullgrad = FullGradient(model)
    first, _ = _attribute(fullgrad, x, target=1)
    original = Replay.remove_gradient_hooks
    alive: dict = {}

    def spy(self):
        # After the backward pass, while the graph (and every hook on it) still exists.
        assert self.plan.boundary_starts  # the inline operation is a region
        gc.collect()
        alive.update({name: ref() is not None for name, ref in model.seen.items()})
        original(self)

    monkeypatch.setattr(Replay, "remove_gradient_hooks", spy)
    replayed, delta = _attribute(fullgrad, x, target=1)
    assert len(alive) == 7 and not any(alive.values()), alive
    torch.testing.assert_close(replayed, first, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-10


def test_a_hook_that_runs_twice_says_so():
    held = replay_module._Held(torch.ones(1))
    held.release()
    with pytest.raises(RuntimeError, match="ran twice"):
        held.release()


def test_a_replay_reserves_its_workspace_before_the_forward_pass(monkeypatch):
    """The first replay on a thread grows that thread's workspace to its largest term
    before the forward pass, not step by step in the memory the backward pass frees."""
    model = _activation_network([nn.SiLU(), nn.Mish(), nn.GELU()])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grown: list = []
    original = capture_module.Workspace.like

    def like(self, tensor):
        buffer = self._buffers.get(tensor.dtype)
        grown.append(buffer is None or buffer.numel() < tensor.numel())
        return original(self, tensor)

    monkeypatch.setattr(capture_module.Workspace, "like", like)
    errors: list = []

    def attribute_twice() -> None:  # a thread of its own: a workspace of its own
        try:
            fullgrad = FullGradient(model)
            _attribute(fullgrad, x, target=1)
            _attribute(fullgrad, x, target=1)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=attribute_twice)
    thread.start()
    thread.join()
    assert not errors, errors
    assert grown and not any(grown)  # terms formed in it, none grew it
