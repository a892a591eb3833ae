"""Each operation's intercept c = g(a) - J_g(a) a against finite differences.

With ``f(x) = sum(g(x))`` every output gradient is 1, so the bias term the engine reports
for ``g`` is ``sum(c)``; ``J a`` is measured independently as the central difference
``(g(a + h a) - g(a - h a)) / 2h`` (the derivative along the ray through ``a``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_fullgrad import full_jacobian


def finite_difference_intercept(g, a: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    with torch.no_grad():
        directional = (g(a * (1 + h)) - g(a * (1 - h))) / (2 * h)
        return (g(a) - directional).flatten(1).sum(1)


ELEMENTWISE = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "elu": F.elu,
    "softplus": F.softplus,
    "mish": F.mish,
    "relu6": F.relu6,
    "hardtanh": lambda t: F.hardtanh(t, -0.5, 0.7),
    "celu": F.celu,
    "selu": F.selu,
    "exp": torch.exp,
    "square": lambda t: t * t,
    "softmax": lambda t: F.softmax(t, dim=1),
    "log_softmax": lambda t: F.log_softmax(t, dim=1),
}
NORMS = {
    "layer_norm": lambda: nn.LayerNorm([4, 5, 5]),
    "group_norm": lambda: nn.GroupNorm(2, 4),
    "instance_norm": lambda: nn.InstanceNorm2d(4, affine=True),
    "batch_norm_eval": lambda: nn.BatchNorm2d(4),
}
ZERO = {
    "relu": F.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
    "max_pool": lambda t: F.max_pool2d(t, 2),
    "avg_pool": lambda t: F.avg_pool2d(t, 2),
    "flatten_mean": lambda t: t.flatten(1).mean(1, keepdim=True),
    "interpolate": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear"),
    "abs": torch.abs,
    "permute": lambda t: t.permute(0, 2, 3, 1),
}


def _randomised(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "weight" in name else 0.0))
        for name, b in module.named_buffers():
            if "running_mean" in name:
                b.copy_(torch.randn_like(b) * 0.3)
            elif "running_var" in name:
                b.copy_(torch.rand_like(b) + 0.5)
    return module.double().eval()


def _check(g, a):
    fj = full_jacobian(lambda t: g(t).flatten(1).sum(1), a)
    engine = (
        sum(fj.bias_terms.values()) if fj.bias_terms else torch.zeros(a.shape[0], dtype=a.dtype)
    )
    expected = finite_difference_intercept(g, a)
    torch.testing.assert_close(engine, expected, rtol=1e-6, atol=1e-7)
    assert fj.completeness_delta.abs().max() < 1e-9
    return engine


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_intercepts(name):
    a = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    engine = _check(ELEMENTWISE[name], a)
    assert engine.abs().max() > 1e-3  # not a homogeneous op: a real intercept was tested


@pytest.mark.parametrize("name", sorted(NORMS))
def test_normalisation_intercepts(name):
    torch.manual_seed(0)
    module = _randomised(NORMS[name]())
    a = torch.randn(2, 4, 5, 5, dtype=torch.float64) * 2 + 0.5
    engine = _check(module, a)
    assert engine.abs().max() > 1e-3


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_on_batch_statistics_has_a_differentiable_closed_form(affine):
    """Training-mode BN: c = y - (y - beta) eps / (var_B + eps), checked against forward-mode
    AD, with gradients reaching gamma and beta through it. Batch statistics couple the
    examples, so completeness holds for the batch total, not per example."""
    torch.manual_seed(0)
    module = _randomised(nn.BatchNorm2d(4, eps=0.3, affine=affine)).train()
    a = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 0.7 + 0.2
    fj = full_jacobian(lambda t: module(t).flatten(1).sum(1), a)
    (intercept,) = fj.bias_jacobians.values()  # df/dy = 1: the bias-Jacobian is c itself

    def batch_norm(t):
        return F.batch_norm(t, None, None, module.weight, module.bias, True, 0.0, module.eps)

    with torch.no_grad():
        value, along_itself = torch.func.jvp(batch_norm, (a,), (a,))
    torch.testing.assert_close(intercept, value - along_itself, rtol=1e-10, atol=1e-12)
    assert intercept.abs().max() > 1e-3
    assert abs(float(fj.completeness_delta.sum())) < 1e-9
    if affine:
        fj = full_jacobian(
            lambda t: F.relu(module(t), inplace=True).flatten(1).sum(1),
            a,
            create_graph=True,
            allow_training_mode=True,
        )
        total = sum(t.sum() for t in fj.bias_terms.values())
        grads = torch.autograd.grad(total, [module.weight, module.bias])
        assert all(g is not None and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(ZERO))
def test_homogeneous_operations_add_nothing(name):
    a = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fj = full_jacobian(lambda t: ZERO[name](t).flatten(1).sum(1), a)
    assert len(fj.bias_jacobians) == 0
    torch.testing.assert_close(
        finite_difference_intercept(ZERO[name], a), torch.zeros(2, dtype=a.dtype), atol=1e-7, rtol=0
    )


def test_explicit_biases_of_every_layer_type():
    torch.manual_seed(0)
    layers = [
        (nn.Conv1d(3, 4, 3), (2, 3, 9)),
        (nn.Conv2d(3, 4, 3), (2, 3, 7, 7)),
        (nn.Conv3d(3, 4, 3), (2, 3, 5, 5, 5)),
        (nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5)),
        (nn.Linear(6, 4), (2, 6)),
    ]
    for layer, shape in layers:
        layer = _randomised(layer)
        a = torch.randn(*shape, dtype=torch.float64)
        engine = _check(layer, a)
        # The intercept is the bias broadcast over the output: sum over positions of b.
        out_positions = layer(a)[0, 0].numel()
        torch.testing.assert_close(engine, layer.bias.sum().detach().expand(2) * out_positions)


def test_products_constants_and_concatenation():
    constant = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    token = torch.randn(1, 4, 1, 5, dtype=torch.float64)
    cases = {
        "product_of_activations": lambda t: torch.sigmoid(t.mean((2, 3), keepdim=True)) * t,
        "matmul_of_activations": lambda t: t.flatten(2) @ t.flatten(2).transpose(1, 2),
        "einsum_three_operands": lambda t: torch.einsum("bchw,bchw,bchw->bc", t, t, t),
        "add_constant": lambda t: t + constant,
        "radd_scalar": lambda t: 2.5 + t,
        "rsub": lambda t: 1.0 - t,
        "sub_alpha": lambda t: torch.sub(t, constant, alpha=0.5),
        "cat_constant": lambda t: torch.cat([token.expand(t.shape[0], -1, -1, -1), t], 2),
        "pad_value": lambda t: F.pad(t, (1, 1), value=0.3),
        "division_by_activation": lambda t: 1.0 / (1.5 + t.abs()),
        "where_clamp": lambda t: torch.clamp(t, -0.5, 0.5),
    }
    a = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for g in cases.values():
        _check(g, a)


def test_in_place_nonlinearities():
    a = torch.randn(2, 4, 5, 5, dtype=torch.float64) * 3

    def g(t):
        t = t * 1.0
        F.hardswish(t, inplace=True)
        t = t * 1.0
        t.sigmoid_()
        t = t * 2.0
        t += 0.25
        t[:, 0] = 0.5
        F.elu(t, inplace=True)
        return t

    _check(g, a)


CLOSED_FORM = {
    "silu": lambda t, inplace: F.silu(t, inplace=inplace),
    "gelu": lambda t, inplace: F.gelu(t),
    "gelu_tanh": lambda t, inplace: F.gelu(t, approximate="tanh"),
    "hardswish": lambda t, inplace: F.hardswish(t, inplace=inplace),
    "hardsigmoid": lambda t, inplace: F.hardsigmoid(t, inplace=inplace),
    "relu6": lambda t, inplace: F.relu6(t, inplace=inplace),
    "relu6_module": lambda t, inplace: nn.ReLU6(inplace=inplace)(t),
    "hardtanh": lambda t, inplace: F.hardtanh(t, -0.5, 0.7, inplace=inplace),
    "mish": lambda t, inplace: F.mish(t, inplace=inplace),
    "softplus": lambda t, inplace: F.softplus(t, beta=2.0, threshold=3.0),
    "elu": lambda t, inplace: F.elu(t, alpha=0.7, inplace=inplace),
    "sigmoid": lambda t, inplace: torch.sigmoid(t),
    "tanh": lambda t, inplace: t.tanh(),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_activation_closed_forms_equal_forward_mode_ad(name, inplace):
    """The activations' closed forms (their backward kernel applied to the input) give the
    intercept forward-mode AD gives, in place or not: the input an in-place activation
    overwrites was read before the call."""
    a = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    a[0, 0, 0, :3] = torch.tensor([0.0, 6.0, -0.5], dtype=torch.float64)  # kinks of relu6/hardtanh

    def g(t):
        return CLOSED_FORM[name](t * 1.0, inplace)

    fj = full_jacobian(lambda t: g(t).flatten(1).sum(1), a)
    (intercept,) = fj.bias_jacobians.values()  # df/dy = 1: the bias-Jacobian is c itself
    with torch.no_grad():
        value, along_itself = torch.func.jvp(
            lambda t: CLOSED_FORM[name](t.clone(), False), (a,), (a,)
        )
    torch.testing.assert_close(intercept, value - along_itself, rtol=1e-12, atol=1e-12)
    assert fj.completeness_delta.abs().max() < 1e-10


NORM_CLOSED_FORMS = {
    "layer_norm_chw": (lambda: nn.LayerNorm([4, 5, 5], eps=0.2), (2, 4, 5, 5)),
    "layer_norm_tokens": (lambda: nn.LayerNorm(5, eps=0.2), (2, 3, 5)),
    "layer_norm_no_affine": (lambda: nn.LayerNorm(5, eps=0.2, elementwise_affine=False), (2, 4, 5)),
    "group_norm": (lambda: nn.GroupNorm(2, 4, eps=0.2), (2, 4, 5, 5)),
    "group_norm_1d": (lambda: nn.GroupNorm(4, 4, eps=0.2), (2, 4, 7)),
    "layer_norm_vectors": (lambda: nn.LayerNorm(6, eps=0.2), (3, 6)),
    "instance_norm": (lambda: nn.InstanceNorm2d(4, eps=0.2, affine=True), (2, 4, 5, 5)),
    "instance_norm_plain_1d": (lambda: nn.InstanceNorm1d(4, eps=0.2), (2, 4, 7)),
}
if hasattr(nn, "RMSNorm"):
    NORM_CLOSED_FORMS["rms_norm"] = (lambda: nn.RMSNorm(5, eps=0.2), (2, 3, 5))
    NORM_CLOSED_FORMS["rms_norm_default_eps"] = (lambda: nn.RMSNorm([4, 5]), (2, 3, 4, 5))


@pytest.mark.parametrize("name", sorted(NORM_CLOSED_FORMS))
def test_normalisation_closed_forms_equal_forward_mode_ad(name):
    """Layer/group/RMS/instance norm: ``c = y - (y - beta) eps / (var + eps)`` equals
    forward-mode AD's intercept (a large ``eps`` so that the correction term is far from
    rounding)."""
    torch.manual_seed(0)
    make, shape = NORM_CLOSED_FORMS[name]
    module = _randomised(make())
    a = torch.randn(*shape, dtype=torch.float64) * 0.4 + 0.1
    fj = full_jacobian(lambda t: module(t).flatten(1).sum(1), a)
    (intercept,) = fj.bias_jacobians.values()
    with torch.no_grad():
        value, along_itself = torch.func.jvp(module, (a,), (a,))
    torch.testing.assert_close(intercept, value - along_itself, rtol=1e-10, atol=1e-12)
    if "default_eps" not in name:
        assert (intercept - value).abs().max() > 1e-3  # the eps term was exercised
    assert fj.completeness_delta.abs().max() < 1e-10


def _torch_norm_calls():
    generator = torch.Generator().manual_seed(2)
    weight, bias = (
        torch.rand(4, dtype=torch.float64, generator=generator) + 0.5,
        torch.randn(4, dtype=torch.float64, generator=generator),
    )
    mean, var = (
        torch.randn(4, dtype=torch.float64, generator=generator),
        torch.rand(4, dtype=torch.float64, generator=generator) + 0.5,
    )
    return {
        # torch.* take the affine terms before the running statistics, F.* after them.
        "torch.batch_norm_eval": lambda t: torch.batch_norm(
            t, weight, bias, mean, var, False, 0.1, 0.2, False
        ),
        "torch.instance_norm": lambda t: torch.instance_norm(
            t, weight, bias, None, None, True, 0.1, 0.2, False
        ),
        "torch.layer_norm": lambda t: torch.layer_norm(t, [5, 5], None, None, 0.2, False),
        "torch.group_norm": lambda t: torch.group_norm(t, 2, weight, bias, 0.2, False),
        "elu_with_scales": lambda t: torch._C._nn.elu(t, 0.7, 1.3, 0.8),
    }


@pytest.mark.parametrize("name", sorted(_torch_norm_calls()))
def test_direct_torch_calls_read_their_own_argument_order(name):
    a = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    _check(_torch_norm_calls()[name], a)


# ------------------------------------------------------------ registering a closed form
# The worked example of docs/extending.md ("An intercept rule"): CELU, which the package
# linearises by forward-mode AD, given a closed form in one call and taken out again.


def _extending_example() -> str:
    """The Python block of docs/extending.md's "An intercept rule" section."""
    text = (Path(__file__).parents[1] / "docs" / "extending.md").read_text()
    section = text.split("## An intercept rule", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _register_celu(calls: list, monkeypatch):
    """Run the documented example, counting the calls of its closed form."""
    from captum_fullgrad import _intercepts

    registrations = []
    original = _intercepts.register_activation

    def counting(name, linear_part, **kwargs):
        def counted(*args):
            calls.append(name)
            return linear_part(*args)

        registrations.append(original(name, counted, **kwargs))
        return registrations[-1]

    monkeypatch.setattr(_intercepts, "register_activation", counting)
    exec(compile(_extending_example(), "docs/extending.md", "exec"), {})
    monkeypatch.undo()
    (registration,) = registrations
    return registration


def _celu_network() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.CELU(alpha=0.7),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.CELU(alpha=1.3),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    return _randomised(model.double())


def test_a_registered_activation_equals_the_generic_rule_and_replays(monkeypatch):
    from captum_fullgrad import FullGradient
    from captum_fullgrad._intercepts import activation_settings
    from captum_fullgrad.replay import plans_for

    model = _celu_network()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = x * 2
    generic = full_jacobian(model, x, target=1)
    FullGradient(model).attribute(x, target=1)
    assert len(plans_for(model)) == 0  # unregistered: CELU is an unfamiliar module

    calls: list = []
    registration = _register_celu(calls, monkeypatch)
    try:
        closed = full_jacobian(model, x, target=1)
        assert calls, "the trace did not use the registered closed form"
        assert list(closed.bias_jacobians) == list(generic.bias_jacobians)
        for name, value in generic.bias_jacobians.items():
            torch.testing.assert_close(closed.bias_jacobians[name], value, rtol=1e-12, atol=1e-13)
        assert closed.completeness_delta.abs().max() < 1e-12

        fullgrad = FullGradient(model)
        fullgrad.attribute(x, target=1)  # traced: records a plan
        assert len(plans_for(model)) == 1
        replayed, delta = fullgrad.attribute(x * 0.5, target=1, return_convergence_delta=True)
        traced, traced_delta = FullGradient(model, reuse_capture=False).attribute(
            x * 0.5, target=1, return_convergence_delta=True
        )
        torch.testing.assert_close(replayed, traced, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-12)
    finally:
        registration.remove()
        plans_for(model).clear()
    assert activation_settings(nn.CELU()) is None
    from captum_fullgrad._intercepts import RULES

    assert F.celu not in RULES and torch.celu not in RULES


def test_holding_the_input_is_for_a_node_that_saves_only_the_output():
    """``holds_input`` keeps an activation's input for the replay's term: meant for a node
    that saves the output (``reads="both"``); anything else is refused before registering."""
    from captum_fullgrad._intercepts import register_activation

    for reads, node in (("input", "XBackward0"), ("both", None)):
        with pytest.raises(ValueError, match="holds_input"):
            register_activation(
                "x", lambda a, y: a, reads=reads, backward_node=node, holds_input=True
            )
