"""BiasSource reductions: each fast path against the closed form ``sum_c df/dy * c`` (float64)."""

from __future__ import annotations

import pytest
import torch

from captum_fullgrad._intercepts import Intercept
from captum_fullgrad.capture import BiasSource, Workspace


def _source(op, shape, channel_dim, intercept) -> BiasSource:
    """A spatial source of ``op`` with ``intercept``."""
    return BiasSource(
        name=op,
        module=op,
        op=op,
        index=0,
        shape=torch.Size(shape),
        channel_dim=channel_dim,
        spatial=True,
        block=op,
        intercept=intercept,
    )


def _channel_source(shape, channel_dim, vector, folded=None, block=None) -> BiasSource:
    intercept = Intercept(None, channel_vector=vector, channel_dim=channel_dim)
    source = _source("batch_norm", shape, channel_dim, intercept)
    source.folded_vector, source.block_vector = folded, block
    return source


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last", "strided", "tokens"])
def test_channel_summed_of_a_channel_vector_is_the_closed_form(batch, memory):
    generator = torch.Generator().manual_seed(batch)
    channels = 5
    if memory == "tokens":  # (B, L, E): channels last, a plain product
        grad = torch.randn(batch, 7, channels, dtype=torch.float64, generator=generator)
        channel_dim = 2
    else:
        grad = torch.randn(batch, channels, 6, 4, dtype=torch.float64, generator=generator)
        channel_dim = 1
        if memory == "channels_last":
            grad = grad.contiguous(memory_format=torch.channels_last)
        elif memory == "strided":  # neither layout: every other column of a wider tensor
            wide = torch.randn(batch, channels, 6, 8, dtype=torch.float64, generator=generator)
            grad = wide[..., ::2]
    vector = torch.randn(channels, dtype=torch.float64, generator=generator)
    folded = torch.randn(channels, dtype=torch.float64, generator=generator)
    view = [1] * grad.dim()
    view[channel_dim] = channels
    expected = (grad * vector.view(view)).sum(channel_dim)
    source = _channel_source(grad.shape, channel_dim, vector)
    summed = source.channel_summed(grad)
    assert summed.shape == expected.shape
    torch.testing.assert_close(summed, expected, rtol=1e-13, atol=1e-14)
    # A folded convolution's share, from the block vector or (without one) the sum.
    with_conv = (grad * (vector + folded).view(view)).sum(channel_dim)
    for block in (vector + folded, None):
        source = _channel_source(grad.shape, channel_dim, vector, folded, block)
        torch.testing.assert_close(
            source.channel_summed(grad, include_folded=True), with_conv, rtol=1e-13, atol=1e-14
        )
        torch.testing.assert_close(source.channel_summed(grad), expected, rtol=1e-13, atol=1e-14)


def test_a_source_contracts_its_current_vector_at_every_batch_size():
    """The rows a source keeps for its batched product (its vector, expanded to the batch)
    serve only that vector at that batch size: a new bias, a vector changed in place and
    another batch size each give the closed form."""
    generator = torch.Generator().manual_seed(4)
    vector = torch.randn(5, dtype=torch.float64, generator=generator)
    source = _channel_source((2, 5, 3, 3), 1, vector)

    def check(batch: int) -> None:
        grad = torch.randn(batch, 5, 3, 3, dtype=torch.float64, generator=generator)
        expected = (grad * source.intercept.channel_vector.view(1, 5, 1, 1)).sum(1)
        with torch.no_grad():  # as a replay reduces (rows are kept only then)
            summed = source.channel_summed(grad)
        torch.testing.assert_close(summed, expected, rtol=1e-13, atol=0)

    check(2)
    check(3)  # another batch size
    source.intercept.channel_vector = torch.randn(5, dtype=torch.float64, generator=generator)
    check(3)  # another vector (a bias replaced)
    with torch.no_grad():
        source.intercept.channel_vector.mul_(-2.0)
    check(3)  # the same vector changed in place (an optimiser step)
    check(2)
    vector = source.intercept.channel_vector
    vector.data = vector.data + 0.7  # the same object, new storage (as Module.to does)
    check(2)
    assert source._contraction_rows is not None  # the rows were kept, and checked
    # Rows kept from a reduction without gradient recording do not serve a differentiable
    # one (training's penalties): the gradient reaches the vector.
    vector = source.intercept.channel_vector.requires_grad_(True)
    grad = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        source.channel_summed(grad)
    (weight,) = torch.autograd.grad(source.channel_summed(grad).sum(), vector)
    torch.testing.assert_close(weight, grad.sum((0, 2, 3)), rtol=1e-13, atol=0)


def _element_wise_source(shape, channel_dim, **parts) -> BiasSource:
    return _source("silu", shape, channel_dim, Intercept(None, **parts))


@pytest.mark.parametrize("kind", ["identity", "gated", "product"])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_large_element_wise_terms_are_channel_summed_in_slices_exactly(kind, layout, monkeypatch):
    """Above ``_SLICE_ELEMENTS`` an activation's or a product's term is formed a few examples
    at a time; every example's channel-summed map is the closed form's (float64)."""
    from captum_fullgrad import capture as capture_module

    generator = torch.Generator().manual_seed(7)
    shape = (5, 3, 4, 6) if layout == "first" else (5, 4, 6, 3)
    channel_dim = 1 if layout == "first" else 3
    a = torch.randn(shape, dtype=torch.float64, generator=generator)
    grad = torch.randn(shape, dtype=torch.float64, generator=generator)
    if kind == "gated":  # ReLU6: the gradient passes where 0 < a < 6
        y = a.clamp(0, 6)
        input_grad = grad * ((a > 0) & (a < 6))
        closed = grad * (y - a * ((a > 0) & (a < 6)))
        source = _element_wise_source(shape, channel_dim, backward_pair=(y, input_grad, None))
    elif kind == "identity":  # SiLU: c = y - silu'(a) a
        y = torch.nn.functional.silu(a)
        slope = torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a)))
        input_grad = grad * slope
        closed = grad * (y - slope * a)
        source = _element_wise_source(shape, channel_dim, backward_pair=(y, input_grad, a))
    else:  # a product of two activations: c = -y
        y = a * torch.randn(shape, dtype=torch.float64, generator=generator)
        closed = -grad * y
        source = _element_wise_source(shape, channel_dim, negated_output=y)
    expected = closed.sum(channel_dim)
    whole = source.channel_summed(grad)
    monkeypatch.setattr(capture_module, "_SLICE_ELEMENTS", 2 * grad[0].numel())  # 3 slices
    sliced = source.channel_summed(grad)
    assert sliced.shape == expected.shape
    torch.testing.assert_close(sliced, expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(sliced, whole, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("kind", ["identity", "gated", "product"])
@pytest.mark.parametrize("sliced", [False, True])
def test_terms_formed_in_a_workspace_equal_fresh_ones(kind, sliced, monkeypatch):
    """A replay's element-wise terms are formed in its workspace's memory, call after call
    (and slice after slice): the maps are those formed in fresh memory, each call's own."""
    from captum_fullgrad import capture as capture_module

    generator = torch.Generator().manual_seed(11)
    shape = (5, 3, 4, 6)
    if sliced:
        monkeypatch.setattr(capture_module, "_SLICE_ELEMENTS", 2 * 3 * 4 * 6)  # 3 slices
    workspace = Workspace()
    for _ in range(2):  # the second call overwrites the first's temporaries
        a, grad, other = (
            torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(3)
        )
        if kind == "product":
            parts = {"negated_output": a * other}
        else:
            y = a.clamp(0, 6) if kind == "gated" else torch.nn.functional.silu(a)
            parts = {"backward_pair": (y, grad * other, None if kind == "gated" else a)}
        fresh = _element_wise_source(shape, 1, **parts).channel_summed(grad)
        reused = _element_wise_source(shape, 1, **parts, workspace=workspace)
        with torch.no_grad():
            summed = reused.channel_summed(grad)
        torch.testing.assert_close(summed, fresh, rtol=0, atol=0)
    (buffer,) = workspace._buffers.values()
    assert buffer.numel() == (2 if sliced else 5) * 3 * 4 * 6  # the largest temporary only


def test_workspace_serves_contiguous_cpu_memory_without_gradient_recording():
    workspace = Workspace(limit=100)
    like = torch.randn(2, 3, 4)
    with torch.no_grad():
        view = workspace.like(like)
        assert view is not None and view.shape == like.shape and view.is_contiguous()
        assert workspace.like(like) is view  # the same memory on the next call
        assert workspace.like(like.transpose(1, 2)) is None  # not contiguous
        assert workspace.like(torch.randn(101)) is None  # above the limit
        smaller = workspace.like(torch.randn(4, 5))
        assert smaller is not None and smaller.data_ptr() == view.data_ptr()
        grown = workspace.like(torch.randn(90))  # a larger one replaces the buffer
        assert grown is not None and grown.data_ptr() != view.data_ptr()
        renewed = workspace.like(like)
        assert renewed is not None and renewed.data_ptr() == grown.data_ptr()
        assert workspace.like(like.double()) is not None  # one buffer per dtype
        assert len(workspace._buffers) == 2
    with torch.enable_grad():
        assert workspace.like(like) is None  # an out= result could not be differentiated


def test_workspace_memory_stays_on_the_cpu_under_another_default_device():
    """A default device set by the caller (``with torch.device(...)``) must not place the
    buffer that CPU gradients are formed in."""
    workspace = Workspace()
    like = torch.randn(2, 3)
    with torch.no_grad(), torch.device("meta"):
        view = workspace.like(like)
    assert view is not None and view.device.type == "cpu"


def _sources_of_every_path(generator):
    """(source, gradient) pairs for each way ``channel_summed`` reduces: channel vectors
    in each memory layout and batch size, element-wise terms, a normalisation's shrunk
    output, and a dense intercept."""
    shape = (3, 5, 6, 4)
    grad = torch.randn(shape, dtype=torch.float64, generator=generator)
    vector = torch.randn(5, dtype=torch.float64, generator=generator)
    folded = torch.randn(5, dtype=torch.float64, generator=generator)
    a, other = (torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(2))
    y = torch.nn.functional.silu(a)
    shrink = torch.rand(3, 1, 6, 4, dtype=torch.float64, generator=generator)
    tokens = torch.randn(3, 7, 5, dtype=torch.float64, generator=generator)
    return [
        (_channel_source(shape, 1, vector, folded, None), grad),
        (_channel_source((1, *shape[1:]), 1, vector), grad[:1]),
        (_channel_source(shape, 1, vector), grad.contiguous(memory_format=torch.channels_last)),
        (_channel_source(shape, 1, vector), torch.cat([grad, grad], 3)[..., ::2]),
        (_channel_source(tokens.shape, 2, vector), tokens),
        (_element_wise_source(shape, 1, backward_pair=(y, grad * other, a)), grad),
        (_element_wise_source(shape, 1, backward_pair=(a.clamp(0, 6), grad * other, None)), grad),
        (_element_wise_source(shape, 1, negated_output=a * other), grad),
        (_element_wise_source(shape, 1, shrunk_output=(y, vector.view(5, 1, 1), shrink)), grad),
        (_element_wise_source(shape, 1, dense=other), grad),
    ]


@pytest.mark.parametrize("sliced", [False, True])
def test_channel_sums_written_into_out_equal_returned_ones(sliced, monkeypatch):
    """Every reduction path writes its result into ``out`` when given one (a collector's
    reserved slot), bit for bit the result it returns without."""
    from captum_fullgrad import capture as capture_module

    if sliced:
        monkeypatch.setattr(capture_module, "_SLICE_ELEMENTS", 2 * 5 * 6 * 4)  # 2 slices
    for source, grad in _sources_of_every_path(torch.Generator().manual_seed(13)):
        expected = source.channel_summed(grad, include_folded=True)
        out = torch.full(expected.shape, float("nan"), dtype=expected.dtype)
        with torch.no_grad():
            written = source.channel_summed(grad, include_folded=True, out=out)
        assert written is out, source.intercept
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_workspace_reserve_grows_to_at_most_its_limit_and_never_shrinks():
    workspace = Workspace(limit=100)
    workspace.reserve(40, torch.float32, torch.device("cpu"))
    assert workspace._buffers[torch.float32].numel() == 40
    workspace.reserve(10, torch.float32, torch.device("cpu"))
    assert workspace._buffers[torch.float32].numel() == 40
    workspace.reserve(1000, torch.float32, torch.device("cpu"))
    assert workspace._buffers[torch.float32].numel() == 100
    assert torch.float64 not in workspace._buffers
