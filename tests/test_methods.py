"""The method registry: each adapter equals the Captum call it wraps, one output convention."""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from torch import nn

from captum_fullgrad import FullGradient
from captum_fullgrad import methods as registry
from captum_fullgrad.methods import (
    DEFAULT_TABLE5_METHODS,
    AttributionMethod,
    available_methods,
    find_last_conv,
    get_method,
    register_method,
    resolve_methods,
    smoothing_noise,
    unregister_method,
)
from captum_fullgrad.testing import randomize_parameters_

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations")

BUILTINS = (
    "saliency",
    "input_x_gradient",
    "guided_backprop",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "fullgrad",
    "fullgrad_bias",
    "smoothfullgrad",
)
# Cheap settings for the expensive methods, so the whole file runs in seconds.
FAST = {
    "integrated_gradients": {"n_steps": 6},
    "smoothgrad": {"nt_samples": 3},
    "smoothfullgrad": {"nt_samples": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_cpu_thread):
    yield


@pytest.fixture
def clean_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


class SmallCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )


@pytest.fixture(scope="module")
def model():
    return randomize_parameters_(SmallCNN(), seed=1).eval()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


TARGET = torch.tensor([0, 2, 3])


def close(a, b):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Each adapter against the Captum call it wraps
# ---------------------------------------------------------------------------------------


def test_guided_backprop_is_captum_abs_channel_sum(model, inputs):
    expected = GuidedBackprop(model).attribute(inputs.clone().requires_grad_(), target=TARGET)
    close(get_method("guided_backprop")(model, inputs, TARGET), expected.abs().sum(1, keepdim=True))


def test_integrated_gradients_is_captum_with_zero_baseline(model, inputs):
    expected = IntegratedGradients(model).attribute(inputs, baselines=0.0, target=TARGET, n_steps=6)
    close(
        get_method("integrated_gradients", n_steps=6)(model, inputs, TARGET),
        expected.abs().sum(1, keepdim=True),
    )


def test_integrated_gradients_splits_batches_larger_than_its_internal_batch(model, inputs):
    """Captum refuses internal_batch_size < examples (it warns and evaluates all at once):
    the adapter splits the examples instead, with the same result and no warning."""
    import warnings

    targets = list(range(inputs.shape[0]))
    whole = get_method("integrated_gradients", n_steps=4, internal_batch_size=None)(
        model, inputs, targets
    )
    per_image_baseline = torch.full_like(inputs, -0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = get_method("integrated_gradients", n_steps=4, internal_batch_size=1)(
            model, inputs, targets
        )
        split_baseline = get_method(
            "integrated_gradients", n_steps=4, internal_batch_size=1, baseline=per_image_baseline
        )(model, inputs, targets)
    close(split, whole)
    expected = get_method(
        "integrated_gradients", n_steps=4, internal_batch_size=None, baseline=per_image_baseline
    )(model, inputs, targets)
    close(split_baseline, expected)


def test_integrated_gradients_baseline_options(model, inputs):
    baseline = torch.full_like(inputs[0], -0.5)
    expected = IntegratedGradients(model).attribute(
        inputs, baselines=baseline[None], target=TARGET, n_steps=4
    )
    expected = expected.abs().sum(1, keepdim=True)
    close(
        get_method("integrated_gradients", n_steps=4, baseline=baseline)(model, inputs, TARGET),
        expected,
    )
    close(
        get_method("integrated_gradients", n_steps=4, baseline=-0.5)(model, inputs, TARGET),
        expected,
    )
    as_callable = get_method(
        "integrated_gradients", n_steps=4, baseline=lambda x: torch.full_like(x, -0.5)
    )
    close(as_callable(model, inputs, TARGET), expected)


def test_input_x_gradient_and_saliency(model, inputs):
    expected = InputXGradient(model).attribute(inputs.clone().requires_grad_(), target=TARGET)
    close(
        get_method("input_x_gradient")(model, inputs, TARGET), expected.abs().sum(1, keepdim=True)
    )
    gradient = Saliency(model).attribute(inputs.clone().requires_grad_(), target=TARGET, abs=True)
    close(get_method("saliency")(model, inputs, TARGET), gradient.amax(1, keepdim=True))
    close(
        get_method("saliency", reduce="sum")(model, inputs, TARGET), gradient.sum(1, keepdim=True)
    )


def _noise_tunnel_by_hand(attribution, inputs, samples, noise, seed, **kwargs):
    """SmoothGrad written out: the mean attribution over the noisy copies, one copy at a
    time; std = noise * (max - min) of each example."""
    draws = smoothing_noise(inputs, samples, noise, seed)
    ranges = inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1)
    assert torch.allclose(
        draws.flatten(2).std(2).mean(0) / (noise * ranges), torch.ones(len(ranges)), atol=0.35
    )
    total = 0
    for k in range(samples):
        noisy = (inputs + draws[k]).clone().requires_grad_()
        total = total + attribution.attribute(noisy, target=TARGET, **kwargs)
    return total / samples


def test_smoothgrad_is_noise_tunnel_over_saliency_with_relative_noise(model, inputs):
    expected = _noise_tunnel_by_hand(Saliency(model), inputs, 3, 0.15, seed=7, abs=True)
    method = get_method("smoothgrad", nt_samples=3, seed=7)
    close(method(model, inputs, TARGET), expected.sum(1, keepdim=True))
    # Mean of |grad| (Captum's Saliency(abs=True)), not |mean grad|, unless asked.
    signed = _noise_tunnel_by_hand(Saliency(model), inputs, 3, 0.15, seed=7, abs=False)
    close(
        get_method("smoothgrad", nt_samples=3, seed=7, abs_before_mean=False)(
            model, inputs, TARGET
        ),
        signed.abs().sum(1, keepdim=True),
    )


def test_smoothgrad_is_seeded_and_leaves_the_global_rng_alone(model, inputs):
    method = get_method("smoothgrad", nt_samples=2)
    state = torch.get_rng_state()
    first = method(model, inputs, TARGET)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, method(model, inputs, TARGET))
    assert not torch.equal(
        first, get_method("smoothgrad", nt_samples=2, seed=1)(model, inputs, TARGET)
    )


def test_gradcam_is_layer_gradcam_on_the_last_conv_upsampled(model, inputs):
    cam = LayerGradCam(model, model[4]).attribute(inputs, target=TARGET, relu_attributions=True)
    expected = LayerAttribution.interpolate(cam, (16, 16), interpolate_mode="bilinear")
    close(get_method("gradcam")(model, inputs, TARGET), expected)
    earlier = LayerGradCam(model, model[0]).attribute(inputs, target=TARGET, relu_attributions=True)
    close(get_method("gradcam", layer="0")(model, inputs, TARGET), earlier)
    close(get_method("gradcam", layer=model[0])(model, inputs, TARGET), earlier)


def test_fullgrad_methods_are_full_gradient(model, inputs):
    full = FullGradient(model).attribute(inputs, target=TARGET, single_channel=True)
    bias = FullGradient(model).attribute(
        inputs, target=TARGET, single_channel=True, include_input_gradient=False
    )
    close(get_method("fullgrad")(model, inputs, TARGET), full)
    close(get_method("fullgrad_bias")(model, inputs, TARGET), bias)
    authors = FullGradient(model).attribute(
        inputs, target=TARGET, single_channel=True, postprocess="neurips2019"
    )
    close(get_method("fullgrad", postprocess="neurips2019")(model, inputs, TARGET), authors)


def test_smoothfullgrad_is_noise_tunnel_over_full_gradient(model, inputs):
    expected = _noise_tunnel_by_hand(
        FullGradient(model), inputs, 2, 0.15, seed=0, single_channel=True
    )
    close(get_method("smoothfullgrad", nt_samples=2)(model, inputs, TARGET), expected)
    # Chunks of samples give the same mean; batched equals per-example.
    chunked = get_method("smoothfullgrad", nt_samples=2, nt_samples_batch_size=1)(
        model, inputs, TARGET
    )
    close(chunked, expected)


# ---------------------------------------------------------------------------------------
# One output convention for every built-in
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_output_convention(name, model, inputs):
    method = get_method(name, **FAST.get(name, {}))
    maps = method(model, inputs, TARGET)
    assert maps.shape == (3, 1, 16, 16)
    assert maps.dtype == torch.float32
    assert maps.device == inputs.device
    assert not maps.requires_grad
    assert torch.isfinite(maps).all()
    assert (maps >= 0).all()
    assert maps.sum() > 0


@pytest.mark.parametrize("name", ["guided_backprop", "gradcam", "fullgrad"])
def test_float64_inputs_no_grad_and_default_target(name, model, inputs):
    method = get_method(name)
    predicted = model(inputs).argmax(1)
    with torch.no_grad():  # e.g. captum.metrics.sensitivity_max calls explanations under no_grad
        maps = method(model.double(), inputs.double(), None)
    model.float()
    assert maps.dtype == torch.float32
    close(maps, method(model, inputs, predicted))


def test_all_builtins_registered_with_labels_and_references():
    for name in BUILTINS:
        method = get_method(name)
        assert isinstance(method, AttributionMethod)
        assert method.label and method.reference and method.description
    assert available_methods()[: len(BUILTINS)] == list(BUILTINS)
    assert set(DEFAULT_TABLE5_METHODS) <= set(available_methods())
    assert get_method("integrated_gradients").defaults["n_steps"] == 50
    assert get_method("smoothgrad").defaults["nt_samples"] == 50
    assert get_method("smoothgrad").defaults["noise"] == 0.15
    assert get_method("smoothfullgrad").defaults["nt_samples"] == 25


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


def test_unknown_name_lists_registered_methods():
    with pytest.raises(
        ValueError, match="unknown method 'nope'; registered methods: .*gradcam.*fullgrad"
    ):
        get_method("nope")


def test_names_are_case_and_dash_insensitive():
    assert get_method("Integrated-Gradients").name == "integrated_gradients"


def test_configured_variants():
    ig = get_method("integrated_gradients", n_steps=20)
    assert ig.params == {"n_steps": 20}
    assert ig.parameters["n_steps"] == 20 and ig.parameters["method"] == "gausslegendre"
    assert get_method("integrated_gradients").params == {}
    assert ig.configure(internal_batch_size=4).parameters == {
        **ig.parameters,
        "internal_batch_size": 4,
    }
    assert get_method(ig) is ig
    assert ig == get_method("integrated_gradients", n_steps=20) and ig != get_method("fullgrad")
    assert len({ig, get_method("integrated_gradients", n_steps=20), get_method("fullgrad")}) == 2
    with pytest.raises(ValueError, match="no parameter 'steps'.*n_steps"):
        get_method("integrated_gradients", steps=3)
    for name, bad in [
        ("integrated_gradients", {"n_steps": 0}),
        ("smoothgrad", {"noise": -0.1}),
        ("smoothgrad", {"nt_samples": 2.5}),
        ("gradcam", {"interpolate_mode": "cubic"}),
        ("fullgrad", {"postprocess": "eq5"}),
        ("saliency", {"reduce": "mean"}),
    ]:
        with pytest.raises(ValueError, match=name):
            get_method(name, **bad)


def test_register_get_overwrite_unregister(clean_registry, model, inputs):
    def edges(model, inputs, target, *, power=1.0):
        return inputs.diff(dim=-1, append=inputs[..., -1:]).abs().sum(1, keepdim=True) ** power

    method = register_method("edges", edges, label="Edges")
    assert method.label == "Edges" and method.defaults == {"power": 1.0}
    assert "edges" in available_methods()
    maps = get_method("edges", power=2.0)(model, inputs, TARGET)
    close(maps, edges(model, inputs, TARGET, power=2.0))
    with pytest.raises(ValueError, match="already registered"):
        register_method("edges", edges)
    replaced = register_method(
        "edges", lambda m, x, t: x.abs().sum(1, keepdim=True), overwrite=True
    )
    assert replaced.label == "edges" and replaced.defaults == {}
    with pytest.raises(ValueError, match="already registered"):
        register_method("fullgrad", edges)
    unregister_method("edges")
    assert "edges" not in available_methods()
    with pytest.raises(ValueError, match="unknown method"):
        unregister_method("edges")
    with pytest.raises(ValueError, match="invalid method name"):
        register_method("2 bad", edges)
    with pytest.raises(TypeError):
        register_method("notcallable", 3)


def test_user_methods_are_held_to_the_convention(clean_registry, model, inputs):
    register_method("wrong_shape", lambda m, x, t: x)
    register_method("signed", lambda m, x, t: x.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="shape"):
        get_method("wrong_shape")(model, inputs, TARGET)
    with pytest.raises(ValueError, match="non-negative"):
        get_method("signed")(model, inputs, TARGET)
    seen = {}

    def record(model, inputs, target):
        seen["target"] = target
        return inputs.abs().sum(1, keepdim=True)

    register_method("record", record)
    get_method("record")(model, inputs)
    assert torch.equal(seen["target"], model(inputs).argmax(1))


# ---------------------------------------------------------------------------------------
# Grad-CAM's last convolution
# ---------------------------------------------------------------------------------------


class OutOfOrder(nn.Module):
    """``late`` is defined first but runs last; ``unused`` is defined last and never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(4, 4, 3, padding=1)
        self.early = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = torch.relu(self.late(torch.relu(self.early(x))))
        return self.head(x.mean((2, 3)))


def test_find_last_conv_follows_execution_order(model, inputs):
    assert find_last_conv(model, inputs) == ("4", model[4])
    odd = randomize_parameters_(OutOfOrder()).eval()
    assert find_last_conv(odd, inputs)[0] == "late"
    maps = get_method("gradcam")(odd, inputs, 1)
    assert maps.shape == (3, 1, 16, 16)


def test_find_last_conv_resnet18():
    net = randomize_parameters_(torchvision.models.resnet18(num_classes=5), seed=0).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    name, module = find_last_conv(net, x)
    assert name == "layer4.1.conv2" and module is net.layer4[1].conv2
    cam = LayerGradCam(net, module).attribute(x, target=[1, 3], relu_attributions=True)
    expected = LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")
    close(get_method("gradcam")(net, x, torch.tensor([1, 3])), expected)


def test_find_last_conv_without_convolution():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        get_method("gradcam")(mlp, torch.randn(1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="no module named"):
        get_method("gradcam", layer="features.99")(mlp, torch.randn(1, 3, 4, 4), 0)


def test_bad_inputs_are_refused(model):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        get_method("fullgrad")(model, torch.randn(3, 16, 16), 0)
    with pytest.raises(TypeError, match="floating-point"):
        get_method("fullgrad")(model, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 0)


# ---------------------------------------------------------------------------------------
# Cost and behaviour traits, declared with the method
# ---------------------------------------------------------------------------------------


def test_builtin_traits():
    ig = get_method("integrated_gradients")
    assert (ig.stochastic, ig.passes, ig.cost_params) == (False, 50, ("n_steps",))
    assert get_method("integrated_gradients", n_steps=7).passes == 7
    for name, samples in (("smoothgrad", 50), ("smoothfullgrad", 25)):
        method = get_method(name)
        assert method.stochastic and method.traits.samples_param == "nt_samples"
        assert method.passes == samples and method.cost_params == ("nt_samples",)
        assert get_method(name, nt_samples=3).passes == 3
    for name in ("saliency", "input_x_gradient", "guided_backprop", "gradcam", "fullgrad"):
        method = get_method(name)
        assert (method.stochastic, method.passes, method.cost_params) == (False, 1, ()), name
        assert method.traits.samples_param is None and method.fast() is method
    assert get_method("integrated_gradients").fast().parameters["n_steps"] == 8
    assert get_method("smoothgrad", noise=0.2).fast().params == {"noise": 0.2, "nt_samples": 4}


def test_user_method_traits_default_to_one_deterministic_pass(clean_registry, model, inputs):
    def plain(model, inputs, target, *, scale=1.0):
        return inputs.abs().sum(1, keepdim=True) * scale

    method = register_method("plain", plain)
    assert (method.stochastic, method.passes, method.cost_params) == (False, 1, ())
    assert method.traits.fast_params == {} and method.fast() is method
    assert resolve_methods("plain")[0](model, inputs, TARGET).shape == (3, 1, 16, 16)


def test_decorator_declares_checks_and_traits(clean_registry):
    @register_method(
        "repeated_edges",
        label="Edges x k",
        checks={"repeats": registry.is_positive_int, "mode": registry.is_one_of("a", "b")},
        stochastic=True,
        passes=lambda p: 2 * p["repeats"],
        cost_params=("repeats",),
        samples_param="repeats",
        fast_params={"repeats": 1},
    )
    def repeated_edges(model, inputs, target, *, repeats=5, mode="a"):
        return inputs.abs().sum(1, keepdim=True)

    assert callable(repeated_edges) and not isinstance(repeated_edges, AttributionMethod)
    method = get_method("repeated_edges")
    assert method.label == "Edges x k" and method.stochastic and method.passes == 10
    assert method.fast().passes == 2 and method.cost_params == ("repeats",)
    with pytest.raises(ValueError, match="repeated_edges: repeats must be a positive integer"):
        get_method("repeated_edges", repeats=0)
    with pytest.raises(ValueError, match=r"repeated_edges: mode must be one of \['a', 'b'\]"):
        method.configure(mode="c")


def test_declarations_naming_missing_parameters_are_refused(clean_registry):
    def fn(model, inputs, target, *, steps=3):
        return inputs.abs().sum(1, keepdim=True)

    for bad in (
        {"checks": {"n_steps": registry.is_positive_int}},
        {"passes": "n_steps"},
        {"cost_params": ("n_steps",)},
        {"fast_params": {"n_steps": 1}},
        {"samples_param": "n_steps"},
    ):
        with pytest.raises(ValueError, match="names 'n_steps'.*its parameters: steps"):
            register_method("declared", fn, **bad)
    with pytest.raises(ValueError, match="declared: steps must be a positive integer"):
        register_method(
            "declared", fn, checks={"steps": registry.is_positive_int}, fast_params={"steps": 0}
        )
    assert "declared" not in available_methods()


# ---------------------------------------------------------------------------------------
# resolve_methods: the one reader of method lists
# ---------------------------------------------------------------------------------------


def test_resolve_methods_reads_lists():
    assert [m.name for m in resolve_methods(None)] == list(DEFAULT_TABLE5_METHODS)
    assert [m.name for m in resolve_methods(None, default=None)] == available_methods()
    assert [m.name for m in resolve_methods(" FullGrad, Integrated-Gradients ,,smoothgrad")] == [
        "fullgrad",
        "integrated_gradients",
        "smoothgrad",
    ]
    ig = get_method("integrated_gradients", n_steps=3)
    assert resolve_methods([ig, "fullgrad"])[0] is ig
    assert resolve_methods(ig) == [ig]
    configured = resolve_methods(
        "integrated_gradients,fullgrad", params={"Integrated-Gradients": {"n_steps": 4}}
    )
    assert configured[0].params == {"n_steps": 4} and configured[1].params == {}


def test_resolve_methods_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'; registered methods: saliency"):
        resolve_methods("fullgrad,nope")
    with pytest.raises(ValueError, match="at least one method"):
        resolve_methods(" , ")
    with pytest.raises(ValueError, match="at least one method"):
        resolve_methods([])
    with pytest.raises(ValueError, match="repeated: fullgrad"):
        resolve_methods("fullgrad,gradcam,FullGrad")
    with pytest.raises(TypeError, match="name or an AttributionMethod"):
        resolve_methods(["fullgrad", 3])
    with pytest.raises(ValueError, match="integrated_gradients: n_steps must be a positive"):
        resolve_methods("integrated_gradients", params={"integrated_gradients": {"n_steps": 0}})
    with pytest.raises(ValueError, match="not among the selected methods"):
        resolve_methods("fullgrad", params={"smoothgrad": {"nt_samples": 2}})
    assert resolve_methods(
        "fullgrad", params={"smoothgrad": {"nt_samples": 2}}, unselected_params="ignore"
    ) == [get_method("fullgrad")]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_methods("fullgrad", params={"nope": {}}, unselected_params="ignore")


def test_resolve_methods_rejects_two_keys_for_one_method():
    """Two ``params`` keys that normalise to one method: an error naming both, not one
    dict silently replacing the other (n_steps would have been 8 here)."""
    params = {"Integrated-Gradients": {"n_steps": 4}, "integrated_gradients": {"n_steps": 8}}
    with pytest.raises(ValueError, match="'Integrated-Gradients' and 'integrated_gradients'"):
        resolve_methods("integrated_gradients", params=params)
    with pytest.raises(ValueError, match="'Integrated-Gradients' and 'integrated_gradients'"):
        resolve_methods("fullgrad", params=params, unselected_params="ignore")


def test_configured_methods_pickle_with_their_checks():
    """Worker processes receive methods by pickling: declarations must not be closures."""
    import pickle

    for name in BUILTINS:
        method = get_method(name).fast()
        copy = pickle.loads(pickle.dumps(method))
        assert copy == method and copy.traits == method.traits, name
    copy = pickle.loads(pickle.dumps(get_method("integrated_gradients")))
    with pytest.raises(ValueError, match="integrated_gradients: n_steps must be a positive"):
        copy.configure(n_steps=0)
