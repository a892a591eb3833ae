"""BiasSource reductions: each fast path against the closed form ``sum_c df/dy * c`` (float64)."""

from __future__ import annotations

import pytest
import torch

from captum_fullgrad._intercepts import Intercept
from captum_fullgrad.capture import BiasSource


def _channel_source(shape, channel_dim, vector, folded=None, block=None) -> BiasSource:
    source = BiasSource(
        name="layer",
        module="layer",
        op="batch_norm",
        index=0,
        shape=torch.Size(shape),
        channel_dim=channel_dim,
        spatial=True,
        block="layer",
        intercept=Intercept(None, channel_vector=vector, channel_dim=channel_dim),
    )
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
