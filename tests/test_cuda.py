"""CUDA checks (skipped where no CUDA device is present; run by benchmarks/gpu.sh)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import NoiseTunnel

from captum_fullgrad import FullGradient, full_jacobian

from .conftest import build_zoo_model, vgg_features_small_head

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "densenet121"]
)
def test_completeness_float64_on_cuda(name):
    model = build_zoo_model(name).cuda()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        target = model(x).abs().argmax(1)
    fj = full_jacobian(model, x, target=target)
    assert (fj.completeness_delta.abs() / fj.output.abs()).max() < 1e-6
    assert not fj.failed_ops


def test_cuda_equals_cpu():
    model = vgg_features_small_head()
    x = torch.rand(2, 3, 48, 64, dtype=torch.float64)
    cpu = FullGradient(model).attribute(x, target=[1, 2])
    gpu = FullGradient(model.cuda()).attribute(x.cuda(), target=torch.tensor([1, 2], device="cuda"))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    model.cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda_reports_its_gap(dtype):
    model = build_zoo_model("vgg11_bn", dtype=torch.float32).cuda()
    x = torch.rand(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        attr, delta = FullGradient(model).attribute(x, target=3, return_convergence_delta=True)
    with torch.no_grad():
        output = model(x)[:, 3].abs()
    assert torch.isfinite(attr).all() and attr.shape == x.shape
    assert (delta.abs() / output).max() < 0.5


def test_noise_tunnel_and_state_on_cuda():
    model = build_zoo_model("resnet18", dtype=torch.float32).cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda")
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    smooth = NoiseTunnel(FullGradient(model)).attribute(
        x, target=1, nt_type="smoothgrad", nt_samples=4, stdevs=0.05
    )
    assert smooth.shape == x.shape and smooth.device.type == "cuda"
    assert (
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        == hooks_before
    )
    assert all(p.grad is None for p in model.parameters())


def test_replay_on_cuda_equals_the_trace_and_follows_a_device_move():
    model = vgg_features_small_head().float()
    x = torch.rand(3, 3, 48, 48)
    cpu = FullGradient(model).attribute(x, target=1)
    model.cuda()
    xc = x.cuda()
    traced = FullGradient(model, reuse_capture=False).attribute(xc, target=1)
    FullGradient(model).attribute(xc, target=1)
    replayed, delta = FullGradient(model).attribute(xc, target=1, return_convergence_delta=True)
    torch.testing.assert_close(replayed, traced)
    torch.testing.assert_close(replayed.cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert (delta.abs() < 1e-3).all()
    model.cpu()
    again = FullGradient(model).attribute(x, target=1)  # the CPU plan, after .cuda().cpu()
    torch.testing.assert_close(again, cpu)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "convnext_tiny"])
def test_replayed_activation_norm_and_product_steps_on_cuda(name):
    """Plans with activation modules (in-place ones through the pre-hook), squeeze-and-
    excitation products and LayerNorm2d: the replay equals the trace on the GPU too."""
    model = build_zoo_model(name).cuda()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, device="cuda")
    traced, traced_delta = FullGradient(model, reuse_capture=False).attribute(
        x, target=1, return_convergence_delta=True
    )
    FullGradient(model).attribute(x, target=1)
    replayed, delta = FullGradient(model).attribute(x, target=1, return_convergence_delta=True)
    torch.testing.assert_close(replayed, traced, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(delta, traced_delta, rtol=0, atol=1e-10)
