import pytest
import torch
from torch import nn

from captum_fullgrad.evaluation import (
    BlurredRandomMap,
    SobelEdgeMap,
    UniformRandomMap,
    blurred_random_map,
    sobel_edge_map,
    uniform_random_map,
)
from captum_fullgrad.evaluation.controls import _gaussian_blur

INPUTS = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TARGET = torch.zeros(5, dtype=torch.long)
MODEL = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).eval()


@pytest.mark.parametrize("control", [uniform_random_map, blurred_random_map, sobel_edge_map])
def test_shape_dtype_device_and_method_signature(control):
    maps = control(MODEL, INPUTS, TARGET)
    assert maps.shape == (5, 1, 32, 32)
    assert maps.dtype == INPUTS.dtype and maps.device == INPUTS.device
    assert not maps.requires_grad
    assert bool((maps >= 0).all())
    assert "(" in repr(control)


@pytest.mark.parametrize("control", [uniform_random_map, blurred_random_map, sobel_edge_map])
def test_deterministic_and_independent_of_the_batch(control):
    maps = control(MODEL, INPUTS, TARGET)
    assert torch.equal(control(MODEL, INPUTS, TARGET), maps)
    # The map of an image does not depend on the other images of the batch.
    assert torch.equal(control(MODEL, INPUTS[3:4], TARGET[3:4]), maps[3:4])
    assert torch.equal(control(MODEL, INPUTS.flip(0), TARGET), maps.flip(0))


def test_random_maps_depend_on_seed_and_image():
    a = UniformRandomMap(seed=0)(MODEL, INPUTS, TARGET)
    b = UniformRandomMap(seed=1)(MODEL, INPUTS, TARGET)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # different images, different noise
    assert bool(((a >= 0) & (a < 1)).all())
    assert a.mean().item() == pytest.approx(0.5, abs=0.02)
    assert not torch.equal(
        BlurredRandomMap(seed=0)(MODEL, INPUTS), BlurredRandomMap(seed=1)(MODEL, INPUTS)
    )


def test_blurred_map_is_the_rescaled_blur_of_the_uniform_map():
    uniform = UniformRandomMap(seed=7)(MODEL, INPUTS)
    blurred = BlurredRandomMap(seed=7, sigma=2.0)(MODEL, INPUTS)
    reference = _gaussian_blur(uniform, 2.0)
    low = reference.amin(dim=(2, 3), keepdim=True)
    high = reference.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(blurred, (reference - low) / (high - low))
    assert blurred.amin(dim=(2, 3)).eq(0).all() and blurred.amax(dim=(2, 3)).eq(1).all()


def test_blur_smooths_and_preserves_constants():
    uniform = uniform_random_map(None, INPUTS)
    blurred = blurred_random_map(None, INPUTS)
    roughness = lambda m: (m[..., 1:] - m[..., :-1]).abs().mean() / m.std()  # noqa: E731
    assert roughness(blurred) < 0.2 * roughness(uniform)
    constant = torch.full((2, 1, 8, 8), 0.3)
    torch.testing.assert_close(_gaussian_blur(constant, 4.0), constant)  # replicate borders
    torch.testing.assert_close(
        _gaussian_blur(torch.full((1, 1, 40, 40), 0.3), 4.0), torch.full((1, 1, 40, 40), 0.3)
    )
    with pytest.raises(ValueError, match="sigma"):
        BlurredRandomMap(sigma=0)


def test_sobel_is_zero_on_constant_image_and_peaks_on_an_edge():
    constant = torch.full((2, 3, 16, 16), 0.7)
    assert torch.equal(sobel_edge_map(None, constant), torch.zeros(2, 1, 16, 16))
    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0  # vertical edge between columns 7 and 8
    edges = SobelEdgeMap()(None, step)[0, 0]
    assert torch.equal(edges[:, 7], torch.full((16,), 4.0))  # (1 + 2 + 1) * 1
    assert torch.equal(edges[:, 8], torch.full((16,), 4.0))
    edges[:, 7:9] = 0
    assert torch.equal(edges, torch.zeros(16, 16))
    # Orientation does not matter: the transposed edge gives the transposed map.
    assert torch.equal(
        sobel_edge_map(None, step.transpose(2, 3)), sobel_edge_map(None, step).transpose(2, 3)
    )


def test_sobel_uses_the_channel_mean_and_ignores_the_model():
    step = torch.zeros(1, 3, 8, 8)
    step[0, 0, :, 4:] = 3.0  # only the first channel changes: grey step of 1
    edges = sobel_edge_map(MODEL, step)[0, 0]
    assert edges.max().item() == pytest.approx(4.0)
    assert torch.equal(sobel_edge_map(None, step), sobel_edge_map(MODEL, step))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_controls_on_cuda_match_cpu():
    for control in (uniform_random_map, blurred_random_map, sobel_edge_map):
        gpu = control(None, INPUTS.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), control(None, INPUTS), rtol=1e-3, atol=1e-4)
