"""Completeness (eq. 1) is a law of every network: random convolutional networks must obey it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad.testing import randomize_parameters_

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "silu": lambda: nn.SiLU(),
    "silu_in_place": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "hardswish": lambda: nn.Hardswish(),
    "elu": lambda: nn.ELU(),
    "softplus": lambda: nn.Softplus(),
    "mish": lambda: nn.Mish(),
    "identity": lambda: nn.Identity(),
}
NORMS = ["none", "batch", "group", "instance"]


class Block(nn.Module):
    def __init__(self, channels: int, spec: dict) -> None:
        super().__init__()
        out = spec["width"]
        self.conv = nn.Conv2d(
            channels, out, spec["kernel"], padding=spec["kernel"] // 2, bias=spec["bias"]
        )
        norm = spec["norm"]
        self.norm = {
            "none": nn.Identity(),
            "batch": nn.BatchNorm2d(out),
            "group": nn.GroupNorm(1, out),
            "instance": nn.InstanceNorm2d(out, affine=True),
        }[norm]
        self.act = ACTIVATIONS[spec["activation"]]()
        self.residual = spec["residual"] and channels == out
        self.reuse = spec["reuse"] and channels == out
        self.gate = spec["gate"]
        self.pool = spec["pool"]

    def forward(self, x):
        y = self.act(self.norm(self.conv(x)))
        if self.reuse:
            y = self.act(self.conv(y))  # the same module twice
        if self.gate:
            y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))  # squeeze-and-excitation product
        if self.residual:
            y = y + x
        if self.pool:
            y = F.max_pool2d(y, 2)
        return y


class RandomNet(nn.Module):
    def __init__(self, specs, concat: bool, classes: int = 3) -> None:
        super().__init__()
        blocks, channels, size = [], 3, 8
        for spec in specs:
            # Keep at least 2x2 positions (instance norm needs more than one).
            spec = {**spec, "pool": spec["pool"] and size >= 4}
            blocks.append(Block(channels, spec))
            channels = spec["width"]
            size //= 2 if spec["pool"] else 1
        self.blocks = nn.ModuleList(blocks)
        self.concat = concat
        self.head = nn.Linear(channels * (2 if concat else 1), classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        pooled = x.mean((2, 3))
        if self.concat:
            pooled = torch.cat([pooled, x.amax((2, 3))], 1)
        return self.head(pooled)


def block_specs(activations, norms, gate):
    """A strategy for one Block's spec, with the activations, norms and gating given."""
    return st.fixed_dictionaries(
        {
            "width": st.sampled_from([2, 4, 6]),
            "kernel": st.sampled_from([1, 3]),
            "bias": st.booleans(),
            "norm": st.sampled_from(norms),
            "activation": st.sampled_from(activations),
            "residual": st.booleans(),
            "reuse": st.booleans(),
            "gate": gate,
            "pool": st.booleans(),
        }
    )


block_spec = block_specs(sorted(ACTIVATIONS), NORMS, st.booleans())


@st.composite
def random_networks(draw, spec):
    """``(model, input, target)``: a random float64 network of 1-4 ``spec`` blocks in eval mode."""
    specs = draw(st.lists(spec, min_size=1, max_size=4))
    concat, seed, batch = draw(st.booleans()), draw(st.integers(0, 2**16)), draw(st.integers(1, 3))
    torch.manual_seed(seed)
    model = randomize_parameters_(RandomNet(specs, concat).double(), seed).eval()
    return model, torch.randn(batch, 3, 8, 8, dtype=torch.float64), seed % 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_networks(block_spec))
def test_completeness_holds_for_random_networks(case):
    model, x, target = case
    fj = full_jacobian(model, x, target=target)
    scale = (
        fj.output.abs()
        + fj.input_term.abs()
        + sum((t.abs() for t in fj.bias_terms.values()), torch.zeros_like(fj.output))
    )
    assert not fj.failed_ops
    assert (fj.completeness_delta.abs() <= 1e-9 * scale + 1e-12).all()
    # The attribution's delta is the same gap, computed from the reduced maps.
    first, delta = FullGradient(model).attribute(x, target=target, return_convergence_delta=True)
    assert (delta.abs() <= 1e-9 * scale + 1e-12).all()
    # A second call replays the first one's plan where the network has one (bias sources
    # only in Conv/Linear/BatchNorm or activation modules): the same map and gap.
    again, delta_again = FullGradient(model).attribute(
        x, target=target, return_convergence_delta=True
    )
    torch.testing.assert_close(again, first, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(delta_again, delta, rtol=0, atol=1e-9 * float(scale.max()) + 1e-12)


# Every intercept in a Conv/Linear/BatchNorm or activation module: networks that get a
# capture plan (the gate is a functional sigmoid, group and instance norm are traced).
replayable_block_spec = block_specs(sorted(ACTIVATIONS), ["none", "batch"], st.just(False))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_networks(replayable_block_spec))
def test_replay_equals_the_trace_for_random_networks(case):
    """Networks whose every intercept sits in Conv/Linear/BatchNorm or activation modules
    (residuals, a module called twice, in-place activations, conv-BN folding or not)
    replay their plan exactly."""
    from captum_fullgrad.replay import plans_for

    model, x, target = case
    traced, traced_delta = FullGradient(model, reuse_capture=False).attribute(
        x, target=target, return_convergence_delta=True
    )
    FullGradient(model).attribute(x * 2, target=target)  # records the plan
    assert len(plans_for(model)) == 1
    replayed, delta = FullGradient(model).attribute(x, target=target, return_convergence_delta=True)
    torch.testing.assert_close(replayed, traced, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-10)
