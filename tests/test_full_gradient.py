"""Eq. 4 against an independent reference, its options, and Captum interoperability."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F
from captum.attr import NoiseTunnel, visualization
from captum.metrics import infidelity, sensitivity_max
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad.testing import randomize_parameters_

from .conftest import build_zoo_model, vgg_features_small_head


def reference_maps(model: nn.Module, x: torch.Tensor, target, neurips: bool = False):
    """Eq. 4 written out plainly: forward hooks on Conv2d/BatchNorm2d, autograd.grad, no capture.

    Works on a copy whose ReLUs are not in place (the trap the engine must survive) and
    assumes a BatchNorm directly follows its convolution, as in VGG.
    """
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    records = []
    handles = [
        m.register_forward_hook(lambda mod, _i, out: records.append((mod, out)))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
    ]
    x = x.clone().requires_grad_(True)
    logits = model(x)
    for h in handles:
        h.remove()
    out = logits[torch.arange(x.shape[0]), torch.as_tensor(target).expand(x.shape[0])]
    grads = torch.autograd.grad(out.sum(), [x] + [o for _, o in records])
    input_grad, layer_grads = grads[0], grads[1:]
    per_layer = []
    for (module, _output), grad in zip(records, layer_grads):
        if isinstance(module, nn.Conv2d):
            bias = module.bias
        else:
            bias = module.bias - module.running_mean * module.weight / torch.sqrt(
                module.running_var + module.eps
            )
        per_layer.append((module, grad * bias.view(1, -1, 1, 1)))
    size = x.shape[2:]
    if neurips:

        def rescale(t):
            flat = t.flatten(1)
            flat = flat - flat.min(1, keepdim=True).values
            return (flat / (flat.max(1, keepdim=True).values + 1e-6)).view_as(t)

        input_map = rescale((input_grad * x).abs()).sum(1)
        bias_map = sum(
            F.interpolate(rescale(bj.abs()), size=size, mode="bilinear", align_corners=True).sum(1)
            for _, bj in per_layer
        )
        return input_map.detach(), bias_map.detach()
    blocks, i = [], 0
    while i < len(per_layer):
        module, bj = per_layer[i]
        if (
            isinstance(module, nn.Conv2d)
            and i + 1 < len(per_layer)
            and isinstance(per_layer[i + 1][0], nn.BatchNorm2d)
        ):
            bj = bj + per_layer[i + 1][1]
            i += 1
        blocks.append(bj.sum(1))
        i += 1
    bias_map = sum(
        F.interpolate(b.abs().unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
        for b in blocks
    )
    return (input_grad * x).abs().sum(1).detach(), bias_map.detach()


@pytest.fixture(scope="module")
def vgg():
    return vgg_features_small_head()


@pytest.fixture(scope="module")
def images():
    # Not square, so that a transposed map would be caught.
    return torch.rand(2, 3, 48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_eq4_matches_reference(vgg, images):
    attributions, delta = FullGradient(vgg).attribute(
        images, target=[3, 5], return_convergence_delta=True
    )
    input_map, bias_map = reference_maps(vgg, images, [3, 5])
    assert attributions.shape == images.shape
    torch.testing.assert_close(attributions.sum(1), input_map + bias_map)
    # The bias part is spread evenly over the input channels.
    spread = attributions - (
        FullGradient(vgg).attribute(images, target=[3, 5], include_input_gradient=False)
    )
    torch.testing.assert_close(spread.sum(1), input_map)
    assert delta.shape == (2,) and delta.abs().max() < 1e-10
    assert bias_map.abs().max() > 0.05 * input_map.abs().max()  # the bias part is not negligible


def test_channels_last_memory_format_gives_the_same_maps(images):
    """A model converted to torch.channels_last (what bf16 convolutions want) gives the
    same eq. 4 map, traced and replayed, without copying layer gradients to NCHW."""
    import copy

    model = vgg_features_small_head()
    reference, reference_delta = FullGradient(model).attribute(
        images, target=[3, 5], return_convergence_delta=True
    )
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = images.contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # the trace, then the replay
        attributions, delta = FullGradient(channels_last).attribute(
            x, target=[3, 5], return_convergence_delta=True
        )
        torch.testing.assert_close(attributions, reference)
        torch.testing.assert_close(delta, reference_delta, rtol=0, atol=1e-10)


def test_single_channel_and_bias_only(vgg, images):
    fullgrad = FullGradient(vgg)
    single = fullgrad.attribute(images, target=2, single_channel=True)
    bias_only = fullgrad.attribute(
        images, target=2, single_channel=True, include_input_gradient=False
    )
    input_map, bias_map = reference_maps(vgg, images, 2)
    assert single.shape == (2, 1, 48, 64)
    torch.testing.assert_close(single[:, 0], input_map + bias_map)
    torch.testing.assert_close(bias_only[:, 0], bias_map)


def test_neurips2019_postprocessing_matches_the_authors_recipe(vgg, images):
    single = FullGradient(vgg).attribute(
        images, target=4, single_channel=True, postprocess="neurips2019"
    )
    input_map, bias_map = reference_maps(vgg, images, 4, neurips=True)
    torch.testing.assert_close(single[:, 0], input_map + bias_map)


def test_layer_choice_and_interpolation(vgg, images):
    fj = full_jacobian(vgg, images, target=1)
    block = fj.spatial_maps()["features.4"]
    chosen = FullGradient(vgg, layers=["features.4"]).attribute(
        images,
        target=1,
        single_channel=True,
        include_input_gradient=False,
        interpolate_mode="nearest",
    )
    expected = F.interpolate(block.abs().unsqueeze(1), size=images.shape[2:], mode="nearest")
    torch.testing.assert_close(chosen, expected)
    # A module chosen by object, and an ancestor that contains every block.
    by_module = FullGradient(vgg, layers=[vgg.features[4]]).attribute(
        images, target=1, include_input_gradient=False
    )
    torch.testing.assert_close(
        by_module.sum(1, keepdim=True),
        F.interpolate(block.abs().unsqueeze(1), size=images.shape[2:], mode="bilinear"),
    )
    everything = FullGradient(vgg, layers=["features"]).attribute(images, target=1)
    torch.testing.assert_close(everything, FullGradient(vgg).attribute(images, target=1))
    with pytest.raises(ValueError, match="not a module"):
        FullGradient(vgg, layers=["features.99"])
    with pytest.raises(ValueError, match="no spatial bias source"):
        FullGradient(vgg, layers=["classifier"]).attribute(images, target=1)


class ChannelsLastNet(nn.Module):
    """ConvNeXt's pattern: Permute, LayerNorm and Linear on (B, H, W, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.pointwise = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = F.gelu(self.pointwise(self.norm(x)))
        x = x.permute(0, 3, 1, 2)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_channels_last_layers_land_at_the_right_place():
    model = randomize_parameters_(ChannelsLastNet().double(), 2).eval()
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    fj = full_jacobian(model, x, target=1)
    source = fj.sources["pointwise"]
    assert source.spatial and source.channel_dim == 3
    # Independent: gradient w.r.t. the Linear's (B, H, W, C) output times its bias.
    hidden = model.norm(model.stem(x).permute(0, 2, 3, 1))
    z = model.pointwise(hidden)
    out = model.head(F.adaptive_avg_pool2d(F.gelu(z).permute(0, 3, 1, 2), 1).flatten(1))[:, 1]
    (grad,) = torch.autograd.grad(out.sum(), z)
    expected = (grad * model.pointwise.bias).sum(-1)  # (B, H, W): H=5 rows, W=7 columns
    torch.testing.assert_close(fj.spatial_maps()["pointwise"], expected.detach())
    chosen = FullGradient(model, layers=["pointwise"]).attribute(
        x, target=1, single_channel=True, include_input_gradient=False
    )
    torch.testing.assert_close(chosen[:, 0], expected.abs().detach())  # same size: no resize
    assert {"norm", "gelu"} <= set(fj.sources) and fj.sources["norm"].spatial


def test_convnext_maps_are_spatial():
    model = build_zoo_model("convnext_tiny")
    x = torch.rand(1, 3, 64, 48, dtype=torch.float64)
    fj = full_jacobian(model, x, target=0)
    linear_sources = [s for s in fj.sources.values() if s.op == "linear" and s.spatial]
    assert linear_sources and all(s.channel_dim == 3 for s in linear_sources)
    attributions = FullGradient(model).attribute(x, target=0, single_channel=True)
    assert attributions.shape == (1, 1, 64, 48) and torch.isfinite(attributions).all()


def test_batched_equals_per_example_and_internal_batches(vgg, images):
    fullgrad = FullGradient(vgg)
    batched, delta = fullgrad.attribute(images, target=[1, 6], return_convergence_delta=True)
    for i, t in enumerate([1, 6]):
        torch.testing.assert_close(
            fullgrad.attribute(images[i : i + 1], target=t), batched[i : i + 1]
        )
    chunked, chunked_delta = fullgrad.attribute(
        images, target=[1, 6], internal_batch_size=1, return_convergence_delta=True
    )
    torch.testing.assert_close(chunked, batched)
    torch.testing.assert_close(chunked_delta, delta, atol=1e-12, rtol=0)


def test_target_formats_tuple_input_and_additional_args(vgg, images):
    fullgrad = FullGradient(vgg)
    expected = fullgrad.attribute(images, target=[2, 2])
    for target in (2, torch.tensor(2), torch.tensor([2, 2]), [2, 2]):
        torch.testing.assert_close(fullgrad.attribute(images, target=target), expected)
    as_tuple = fullgrad.attribute((images,), target=2)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], expected)

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, scale, offset=0.0):
            return self.inner(x) * scale + offset

    scaled = Scaled(vgg).eval()
    scale = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    attr, delta = FullGradient(scaled).attribute(
        images, target=2, additional_forward_args=(scale, 0.5), return_convergence_delta=True
    )
    assert delta.abs().max() < 1e-10
    chunked = FullGradient(scaled).attribute(
        images, target=2, additional_forward_args=(scale, 0.5), internal_batch_size=1
    )
    torch.testing.assert_close(chunked, attr)


def test_multidimensional_output_with_tuple_targets():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.tanh(self.conv(x))  # (B, 4, H, W): a target is (channel, row, col)

    model = randomize_parameters_(Dense().double()).eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    attr, delta = FullGradient(model).attribute(x, target=(1, 2, 3), return_convergence_delta=True)
    assert attr.shape == x.shape and delta.abs().max() < 1e-10
    per_example = FullGradient(model).attribute(x, target=[(1, 2, 3), (0, 0, 0)])
    torch.testing.assert_close(per_example[:1], attr[:1])


def test_noise_tunnel_smoothfullgrad(vgg, images):
    fullgrad = FullGradient(vgg)
    tunnel = NoiseTunnel(fullgrad)
    smooth, delta = tunnel.attribute(
        images,
        target=3,
        nt_type="smoothgrad",
        nt_samples=3,
        stdevs=0.0,
        return_convergence_delta=True,
    )
    torch.testing.assert_close(smooth, fullgrad.attribute(images, target=3))
    assert delta.shape == (6,) and delta.abs().max() < 1e-10
    noisy = tunnel.attribute(images, target=3, nt_type="smoothgrad_sq", nt_samples=2, stdevs=0.1)
    assert noisy.shape == images.shape and torch.isfinite(noisy).all()


def test_captum_metrics_and_visualisation(vgg, images):
    fullgrad = FullGradient(vgg)
    attributions = fullgrad.attribute(images, target=3)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    score = infidelity(vgg, perturb, images, attributions, target=3, n_perturb_samples=2)
    assert score.shape == (2,) and torch.isfinite(score).all()
    with torch.no_grad():  # sensitivity_max calls explanations under no_grad, with tuples
        sensitivity = sensitivity_max(fullgrad.attribute, images, target=3, n_perturb_samples=2)
    assert sensitivity.shape == (2,) and torch.isfinite(sensitivity).all()
    figure, _axis = visualization.visualize_image_attr(
        attributions[0].permute(1, 2, 0).numpy(),
        images[0].permute(1, 2, 0).numpy(),
        method="blended_heat_map",
        sign="absolute_value",
        use_pyplot=False,
    )
    assert figure is not None


def test_autocast_bfloat16_reports_its_gap():
    model = build_zoo_model("vgg11_bn", dtype=torch.float32)
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attributions, delta = FullGradient(model).attribute(
            x, target=1, return_convergence_delta=True
        )
    exact, exact_delta = FullGradient(model).attribute(x, target=1, return_convergence_delta=True)
    assert attributions.shape == x.shape and torch.isfinite(attributions).all()
    with torch.no_grad():
        # The logits' scale, not the one selected logit (which may lie near zero): the
        # rounding of eq. 1's terms scales with the network's values.
        scale = model(x).abs().amax(1)
    assert (exact_delta.abs() / scale).max() < 1e-4
    assert (delta.abs() / scale).max() < 0.5  # bf16 rounding, reported, not hidden
    assert (delta.abs() / scale).max() > 1e-4  # and really bf16's, not float32's
    correlation = torch.corrcoef(torch.stack([attributions.flatten().float(), exact.flatten()]))[
        0, 1
    ]
    assert correlation > 0.9


def test_model_without_bias_sources_gives_input_times_gradient():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2, bias=False)
    )
    model = model.double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    attributions, delta = FullGradient(model).attribute(x, target=1, return_convergence_delta=True)
    x_ = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x_)[:, 1].sum(), x_)
    torch.testing.assert_close(attributions, (grad * x).abs())
    assert delta.abs().max() < 1e-12


def test_one_and_three_dimensional_inputs():
    signal = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.BatchNorm1d(4),
        nn.SiLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    signal = randomize_parameters_(signal.double()).eval()
    x = torch.randn(2, 2, 20, dtype=torch.float64)
    attr, delta = FullGradient(signal).attribute(x, target=0, return_convergence_delta=True)
    assert attr.shape == x.shape and delta.abs().max() < 1e-10
    volume = nn.Sequential(
        nn.Conv3d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 2)
    )
    volume = randomize_parameters_(volume.double()).eval()
    v = torch.randn(1, 1, 6, 7, 8, dtype=torch.float64)
    attr, delta = FullGradient(volume).attribute(v, target=1, return_convergence_delta=True)
    assert attr.shape == v.shape and delta.abs().max() < 1e-10


class ConvOutputReused(nn.Module):
    """A convolution whose output feeds its BatchNorm and something else (before or after)."""

    def __init__(self, reuse_before: bool) -> None:
        super().__init__()
        self.reuse_before = reuse_before
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        z = self.conv(x)
        side = torch.tanh(z) if self.reuse_before else None
        y = F.relu(self.bn(z))
        if side is None:
            side = torch.tanh(z)
        y = F.relu(self.bn2(self.conv2(y))) + side  # conv2 -> bn2 is a clean pair
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("reuse_before", [True, False])
def test_conv_bn_folding_respects_other_readers(reuse_before):
    """Eq. 4 reduces a conv-BN pair in one pass over the BN gradient, which is exact only
    while nothing else reads the convolution's output."""
    model = randomize_parameters_(ConvOutputReused(reuse_before).double(), 4).eval()
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    attributions, delta = FullGradient(model).attribute(
        x, target=2, single_channel=True, return_convergence_delta=True
    )
    assert delta.abs().max() < 1e-10
    fj = full_jacobian(model, x, target=2)
    expected = (fj.input_jacobian * x).abs().sum(1) + sum(
        m.abs() for m in fj.spatial_maps().values()
    )
    torch.testing.assert_close(attributions[:, 0], expected)
