"""Replay regions: attention and other operations written in a forward, replayed as one
term per module call (eq. 1 on the call), checked against a fresh trace in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_fullgrad import FullGradient
from captum_fullgrad import replay as replay_module
from captum_fullgrad.testing import randomize_parameters_

from .conftest import build_zoo_model, tiny_swin
from .test_replay import Recorders, replay_equals_trace


@pytest.fixture
def recorders(monkeypatch):
    return Recorders(monkeypatch)


def _timm(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    return randomize_parameters_(model, 0).double().eval()


TRANSFORMERS = {
    "torchvision_vit": lambda: build_zoo_model("vit"),
    "torchvision_swin": tiny_swin,
    "timm_vit": lambda: _timm(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2
    ),
    "timm_swin": lambda: _timm(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
    ),
}


def _attribute(fullgrad: FullGradient, x: torch.Tensor, target=1, **kwargs):
    return fullgrad.attribute(x, target=target, return_convergence_delta=True, **kwargs)


def _plan(fullgrad: FullGradient) -> replay_module.CapturePlan:
    plans = [p for p in fullgrad._plans._plans.values() if p is not None]
    assert len(plans) == 1
    return plans[0]


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformers_replay_a_plan_equal_to_the_trace(name, recorders):
    model = TRANSFORMERS[name]()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fullgrad = replay_equals_trace(recorders, model, x, [0, 3, 4])
    assert _plan(fullgrad).boundary_starts  # attention is replayed as region terms


def test_region_weights_on_a_vit():
    """torchvision's ViT: the class token is concatenated in the model's forward and the
    position embedding added in the encoder's, so both are frames; each attention call is
    an opaque region; the layers and the patch embedding keep their steps (holes)."""
    model = build_zoo_model("vit")
    fullgrad = FullGradient(model)
    _attribute(fullgrad, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    plan = _plan(fullgrad)
    names = {id(module): name for name, module in model.named_modules()}
    weights = {
        names[id(plan.calls[returned]())]: weight
        for returned, weight in plan.boundary_starts.values()
    }
    assert weights == {
        "": 1,
        "conv_proj": -1,
        "encoder.layers": -1,
        "encoder.layers.encoder_layer_0.self_attention": 1,
        "encoder.layers.encoder_layer_1.self_attention": 1,
        "encoder.ln": -1,
        "heads": -1,
    }
    # The encoder is a frame and a hole of the model's frame at once: no boundary.
    steps = {step.template.name for step in plan.steps}
    assert "encoder.layers.encoder_layer_0.mlp.0" in steps  # the MLP keeps its steps
    assert not any("self_attention" in name for name in steps)


class _Attention(nn.Module):
    """Softmax attention written in a forward (no module hook sees its intercepts)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor = None) -> torch.Tensor:
        # Scaled first: nothing saves ``x`` itself for the backward pass (so the model
        # may change it in place afterwards).
        q, k, v = self.qkv(x * 0.5).chunk(3, -1)
        if context is not None:
            k = k + context  # a graph tensor that is not a positional argument
        weights = torch.softmax(q @ k.transpose(-1, -2), -1)
        return self.proj(weights @ v)


class _TokenNet(nn.Module):
    def __init__(self, *, keyword: bool = False, in_place: bool = False, route: bool = False):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = _Attention(8)
        self.other = _Attention(8)
        self.head = nn.Linear(8, 3)
        self.keyword, self.in_place, self.route = keyword, in_place, route
        self.use_other = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, 9, 8)
        attention = self.other if self.route and self.use_other else self.attn
        if self.keyword:
            mixed = attention(tokens, context=tokens * 0.5)
        else:
            mixed = attention(tokens)
        if self.in_place:
            tokens.mul_(2.0)  # the region's input changes after the call
        return self.head(mixed + tokens).mean(1)


def _token_net(**kwargs) -> nn.Module:
    return randomize_parameters_(_TokenNet(**kwargs), 0).double().eval()


@pytest.mark.parametrize("kind", ["keyword", "in_place"])
def test_a_region_that_breaks_its_identity_is_traced(kind, recorders):
    """A graph tensor reaching the call as a keyword argument, or the call's input changed
    in place after it: the term would be wrong (the guard is what keeps the delta at 0)."""
    model = _token_net(**{kind: True})
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    replayed, delta = _attribute(fullgrad, x)
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x)
    # The replay found the problem before the backward pass and traced the call instead.
    assert recorders.kinds == ["Capture", "Capture", "Capture"]
    assert sum(fullgrad._plans._mismatches.values()) == 1
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-12 and traced_delta.abs().max() < 1e-12


def test_a_plain_region_replays(recorders):
    model = _token_net()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    _, delta = _attribute(fullgrad, x)
    assert recorders.kinds == ["Capture", "Replay"]
    assert delta.abs().max() < 1e-12


def test_a_routed_region_is_not_replayed_with_the_wrong_module(recorders):
    """Mixture-of-experts routing: same call count and shapes, another attention module."""
    model = _token_net(route=True)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    model.use_other = True
    routed, delta = _attribute(fullgrad, x)
    traced, _ = _attribute(FullGradient(model, reuse_capture=False), x)
    assert recorders.kinds == ["Capture", "Capture", "Capture"]
    assert sum(fullgrad._plans._mismatches.values()) == 1
    torch.testing.assert_close(routed, traced, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-12


class _SpatialBias(nn.Module):
    """A learned bias map added in a forward: a spatial source no region may cover."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 4, 6, 6))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((torch.tanh(self.conv(x)) + self.shift).mean((2, 3)))


def test_no_region_over_a_spatial_source(recorders):
    model = randomize_parameters_(_SpatialBias(), 0).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    _, delta = _attribute(fullgrad, x)
    assert recorders.kinds == ["Capture", "Capture"]
    assert len(fullgrad._plans) == 0
    assert delta.abs().max() < 1e-12


def test_a_layer_filter_traces_transformers(recorders):
    """Region terms cannot be selected by layer: with ``layers`` the call is traced."""
    model = build_zoo_model("vit")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fullgrad = FullGradient(model, layers=["conv_proj"])
    first = _attribute(fullgrad, x)
    second = _attribute(fullgrad, x)
    assert recorders.kinds == ["Capture", "Capture"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_no_hook_left_after_a_region_replay():
    model = build_zoo_model("vit")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    _attribute(fullgrad, x)
    from torch.nn.modules import module as module_file

    assert not module_file._global_forward_hooks and not module_file._global_forward_pre_hooks
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# ----------------------------------------------------------------- random token networks


class _RandomBlock(nn.Module):
    def __init__(self, width: int, spec: dict) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if spec["norm"] else nn.Identity()
        self.attn = _Attention(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.residual, self.gate = spec["residual"], spec["gate"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm(x))
        if self.gate:
            y = y * torch.sigmoid(y)  # an element-wise gate written in the block's forward
        x = x + y if self.residual else y
        return x + self.mlp(x) if self.residual else self.mlp(x)


class _RandomTokenNet(nn.Module):
    """Patch embedding (a convolution), optional class token and position embedding added
    in this forward, then blocks of attention written in a forward."""

    def __init__(self, specs, width: int, class_token: bool, position: bool) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 2, stride=2)
        self.class_token = nn.Parameter(torch.randn(1, 1, width)) if class_token else None
        self.position = nn.Parameter(torch.randn(1, 16 + class_token, width)) if position else None
        self.blocks = nn.Sequential(*(_RandomBlock(width, spec) for spec in specs))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, width)
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], 1)
        if self.position is not None:
            tokens = tokens + self.position
        return self.head(self.blocks(tokens)[:, 0])


@st.composite
def random_token_networks(draw):
    spec = st.fixed_dictionaries(
        {"norm": st.booleans(), "residual": st.booleans(), "gate": st.booleans()}
    )
    specs = draw(st.lists(spec, min_size=1, max_size=3))
    width = draw(st.sampled_from([4, 6]))
    class_token, position = draw(st.booleans()), draw(st.booleans())
    seed, batch = draw(st.integers(0, 2**16)), draw(st.integers(1, 3))
    torch.manual_seed(seed)
    model = _RandomTokenNet(specs, width, class_token, position)
    model = randomize_parameters_(model, seed).double().eval()
    return model, torch.randn(batch, 3, 8, 8, dtype=torch.float64), seed % 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_token_networks())
def test_regions_replay_the_trace_for_random_token_networks(case):
    """Eq. 1 on a module call holds for every network: the replay's region terms (opaque
    attention, frames around class tokens, position embeddings and gates) give the traced
    map and delta."""
    model, x, target = case
    traced, traced_delta = FullGradient(model, reuse_capture=False).attribute(
        x, target=target, return_convergence_delta=True
    )
    fullgrad = FullGradient(model)
    fullgrad.attribute(x * 2, target=target)  # records the plan
    assert _plan(fullgrad).boundary_starts
    replayed, delta = fullgrad.attribute(x, target=target, return_convergence_delta=True)
    torch.testing.assert_close(replayed, traced, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-10)


def test_timm_norms_and_gelu_are_steps(recorders):
    """timm's LayerNorm, LayerNorm2d and GELU run ``F.layer_norm`` / ``F.gelu`` (with the
    fused norm off): they are normalisation and activation steps, so a timm ConvNeXt gets a
    plan (no region: its norms are spatial) and a timm ViT's norms are not regions."""
    from captum_fullgrad import _intercepts

    model = _timm("convnext_atto")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fullgrad = replay_equals_trace(recorders, model, x, [0, 2])
    assert not _plan(fullgrad).boundary_starts
    norm = model.stem[1]
    assert _intercepts.normalisation_settings(norm)[0] == "channel_layer_norm"
    norm._fast_norm = True  # its fused kernel: not F.layer_norm, so not recognised
    assert _intercepts.normalisation_settings(norm) is None
    vit = TRANSFORMERS["timm_vit"]()
    fullgrad = FullGradient(vit)
    _attribute(fullgrad, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    names = {id(module): name for name, module in vit.named_modules()}
    plan = _plan(fullgrad)
    regions = {
        names[id(plan.calls[k]())] for k, weight in plan.boundary_starts.values() if weight == 1
    }
    assert regions and not any("norm" in name for name in regions)  # holes may be norms


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("efficientnet_b0", {}),
        ("mobilenetv3_small_100", {}),
        ("regnety_002", {}),
        ("resnet10t", {}),
    ],
)
def test_timm_batch_norm_act_is_a_step(recorders, name, kwargs):
    """timm's BatchNormAct2d runs F.batch_norm and then its ``act`` child: its BatchNorm is
    a step whose gradient is taken at the BatchNorm's own autograd node, under the
    activation, so timm's EfficientNet, MobileNet-V3 and RegNet replay a plan."""
    model = _timm(name, **kwargs)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    fullgrad = replay_equals_trace(recorders, model, x, [0, 3])
    inside = [s for s in _plan(fullgrad).steps if s.batch_norm_inside]
    assert inside or name == "resnet10t"


def test_a_batch_norm_act_that_skips_its_batch_norm_is_traced(recorders):
    """The BatchNorm node found under a BatchNormAct2d's output must be its own: when its
    forward no longer normalises (here replaced on the instance), the node under its
    activation is the previous layer's, whose statistics are another module's."""
    timm = pytest.importorskip("timm")
    norm_act = timm.layers.BatchNormAct2d
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        norm_act(4, act_layer=nn.Identity),
        norm_act(4, act_layer=nn.ReLU),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model = randomize_parameters_(model, 0).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    fullgrad = FullGradient(model)
    _attribute(fullgrad, x)
    skipping = model[2]
    skipping.forward = lambda t: skipping.act(skipping.drop(t))  # no batch_norm
    replayed, delta = _attribute(fullgrad, x)
    traced, traced_delta = _attribute(FullGradient(model, reuse_capture=False), x)
    assert recorders.kinds == ["Capture", "Capture", "Capture"]  # the replay was refused
    torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-10
