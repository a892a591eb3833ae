"""Aggregation: eq. 4's block maps and eq. 1's sums, one source at a time or several."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from captum_fullgrad import aggregation
from captum_fullgrad._intercepts import Intercept
from captum_fullgrad.aggregation import MapCollector
from captum_fullgrad.capture import BiasSource

Pair = Tuple[BiasSource, torch.Tensor]


def _source(name: str, block: str, shape, spatial: bool, dense: bool, batch_size=None):
    """A conv-like source with a random channel vector, or (``dense``) a gate-like one with
    a random intercept of the output's shape; random values seeded by the name."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    if dense:
        intercept = Intercept(
            None, dense=torch.randn(shape, dtype=torch.float64, generator=generator)
        )
    else:
        vector = torch.randn(shape[1], dtype=torch.float64, generator=generator)
        intercept = Intercept(None, channel_vector=vector, channel_dim=1)
    return BiasSource(
        name=name,
        module=name,
        op="sigmoid" if dense else "conv2d",
        index=0,
        shape=torch.Size(shape),
        channel_dim=1,
        spatial=spatial,
        block=block,
        intercept=intercept,
        batch_size=batch_size,
    )


def _channel_source(name: str, block: str, shape, spatial: bool = True) -> BiasSource:
    return _source(name, block, shape, spatial, dense=False)


def _pairs(batch: int) -> List[Pair]:
    """Layers at two resolutions; ``b`` has two sources (a conv and a BatchNorm that were
    not folded), ``f`` a folded convolution's share, ``head`` is not spatial."""
    generator = torch.Generator().manual_seed(batch)
    layout = [
        ("a", "a", (batch, 3, 6, 6)),
        ("b_conv", "b", (batch, 4, 6, 6)),
        ("b_norm", "b", (batch, 4, 6, 6)),
        ("c", "c", (batch, 5, 3, 3)),
        ("f", "f", (batch, 2, 3, 3)),
        ("d", "d", (batch, 6, 6, 6)),
    ]
    pairs = []
    for name, block, shape in layout:
        source = _channel_source(name, block, shape)
        if name == "f":
            source.folded_vector = torch.randn(2, dtype=torch.float64, generator=generator)
        pairs.append((source, torch.randn(shape, dtype=torch.float64, generator=generator)))
    head = _channel_source("head", "head", (batch, 7), spatial=False)
    pairs.append((head, torch.randn(batch, 7, dtype=torch.float64, generator=generator)))
    return pairs


def _one_by_one(pairs: List[Pair]) -> MapCollector:
    collector = MapCollector()
    for source, grad in pairs:
        collector.on_gradient(source, grad)
    return collector


def _assert_same_result(
    collector: MapCollector, expected: MapCollector, map_rtol: float = 0.0
) -> None:
    """The same block maps (to ``map_rtol``), completeness sum and eq. 4 map."""
    assert list(collector.block_maps) == list(expected.block_maps)
    for block, expected_map in expected.block_maps.items():
        torch.testing.assert_close(collector.block_maps[block], expected_map, rtol=map_rtol, atol=0)
    # Non-spatial terms batched are summed in another order (one dot product over
    # concatenated rows): equal up to rounding of the terms' magnitude, not of their sum.
    torch.testing.assert_close(collector.bias_sum, expected.bias_sum, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(
        collector.bias_map((12, 12), "bilinear", False),
        expected.bias_map((12, 12), "bilinear", False),
        rtol=1e-13,
        atol=0,
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_several_gradients_at_once_equal_one_at_a_time(batch):
    pairs = _pairs(batch)
    expected = _one_by_one(pairs)
    collector = MapCollector()
    collector.on_gradients(pairs)
    _assert_same_result(collector, expected, map_rtol=1e-13)
    assert sorted(s.name for s in collector.mapped_sources) == sorted(
        s.name for s in expected.mapped_sources
    )


@pytest.mark.parametrize("late", ["new_block", "same_block", "before"])
def test_maps_added_around_a_batch_are_not_lost(late):
    """A later block of a batch's resolution, more added to one of its blocks, and a block
    that had a map before the batch all enter the map (the stacked maps are rebuilt)."""
    pairs = _pairs(2)
    name, block = {"new_block": ("e", "e"), "same_block": ("a2", "a"), "before": ("a0", "a")}[late]
    other = _channel_source(name, block, (2, 3, 6, 6))
    generator = torch.Generator().manual_seed(7)
    other_pair = (other, torch.randn(other.shape, dtype=torch.float64, generator=generator))
    expected = _one_by_one(pairs + [other_pair])
    collector = MapCollector()
    if late == "before":
        collector.on_gradient(*other_pair)
    collector.on_gradients(pairs)
    if late != "before":
        collector.on_gradient(*other_pair)
    torch.testing.assert_close(
        collector.bias_map((6, 6), "bilinear", False),
        expected.bias_map((6, 6), "bilinear", False),
        rtol=1e-13,
        atol=0,
    )
    # The batch's non-spatial terms are summed in another order (one dot product over
    # concatenated rows): equal up to rounding of the terms' magnitude, not of their sum.
    torch.testing.assert_close(collector.bias_sum, expected.bias_sum, rtol=1e-13, atol=1e-12)


def test_half_precision_and_strided_gradients_at_once():
    """Channels-last gradients give the same maps; half-precision maps come out in float32."""
    pairs = [(s, g.float()) for s, g in _pairs(2)]
    strided = [
        (s, g.to(memory_format=torch.channels_last)) if g.dim() == 4 else (s, g) for s, g in pairs
    ]
    halves = [(s, g.to(torch.bfloat16)) for s, g in pairs]
    exact = _one_by_one(_pairs(2)).block_maps
    for variant, ulps in ((strided, 1e-6), (halves, 2**-7)):
        collector = MapCollector()
        collector.on_gradients(variant)
        for block, exact_map in exact.items():
            assert collector.block_maps[block].dtype == torch.float32
            # bfloat16 keeps 8 bits: within a unit or two of the largest value's last place.
            tolerance = ulps * float(exact_map.abs().max())
            torch.testing.assert_close(
                collector.block_maps[block].double(), exact_map, rtol=0, atol=tolerance
            )


def _dense_source(name: str, shape, batch_size=None) -> BiasSource:
    return _source(name, name, shape, spatial=False, dense=True, batch_size=batch_size)


def test_non_spatial_terms_at_once_equal_one_at_a_time():
    """Squeeze-excitation layers (1x1 outputs), a classifier and dense gates enter eq. 1's sum
    through one dot product per example; each term keeps its example, including a float32
    layer beside float64 ones, and a layer with several slices per example (reduced alone)."""
    generator = torch.Generator().manual_seed(3)
    batch = 3
    sources = [
        _channel_source("se_reduce", "se_reduce", (batch, 5, 1, 1), spatial=False),
        _dense_source("gate", (batch, 5, 1, 1)),
        _channel_source("head", "head", (batch, 7), spatial=False),
        _dense_source("windows", (batch * 2, 4), batch_size=batch),
        _channel_source("pooled", "pooled", (batch, 4, 2, 1), spatial=False),
    ]
    pairs = [(s, torch.randn(s.shape, dtype=torch.float64, generator=generator)) for s in sources]
    single = _channel_source("single", "single", (batch, 6), spatial=False)
    single.intercept.channel_vector = single.intercept.channel_vector.float()
    pairs.append((single, torch.randn(single.shape, generator=generator)))
    expected = [s.per_example_sum(g).double() for s, g in pairs]
    collector = MapCollector()
    collector.on_gradients(pairs)
    # One value per example, each example's own terms (a row of another example's
    # gradient against this one's gate would not match).
    torch.testing.assert_close(collector.bias_sum, sum(expected), rtol=1e-6, atol=1e-6)
    # The float64 terms exactly (to rounding) without the float32 layer.
    float64 = MapCollector()
    float64.on_gradients(pairs[:-1])
    torch.testing.assert_close(float64.bias_sum, sum(expected[:-1]), rtol=1e-13, atol=1e-12)


def test_reserved_maps_equal_unreserved_ones(monkeypatch):
    monkeypatch.setattr(aggregation, "_RESERVED_BYTES", 0)  # these maps are small
    """Maps reserved before the pass (from an earlier call's layout) give the same maps,
    sums and eq. 4 map; they are written in the reserved memory, one buffer per resolution,
    and that buffer is the stack eq. 4 reads (nothing is copied at the end)."""
    pairs = _pairs(2)
    layout = _one_by_one(pairs).layout()
    assert {keys for *_, keys in layout} == {("a", "b", "d"), ("c", "f")}
    expected = _one_by_one(_pairs(2))
    collector = MapCollector()
    collector.reserve(layout)
    buffers = [buffer for buffer, _ in collector._buffers]
    with torch.no_grad():  # as in a backward pass's hooks
        for source, grad in _pairs(2):
            collector.on_gradient(source, grad)
    _assert_same_result(collector, expected)
    assert collector.layout() is layout  # every map in its slot: nothing to record again
    # "b" has two sources: the second was added to its slot, not to a fresh tensor.
    for block in ("a", "b", "c", "d", "f"):
        block_map = collector.block_maps[block]
        assert any(block_map.data_ptr() - b.data_ptr() in range(b.nbytes) for b in buffers)
    assert all(any(g._base is b for b in buffers) for g in collector._grouped())


def test_reserved_slots_that_get_no_map_or_another_shape(monkeypatch):
    monkeypatch.setattr(aggregation, "_RESERVED_BYTES", 0)  # these maps are small
    """A reserved block that no gradient reaches adds nothing (its slot is zero, whatever
    the memory held); a block of another shape than its slot, and one with no slot, are
    kept apart and still counted, in a resolution that mixes slots and other maps too."""
    pairs = _pairs(2)
    layout = _one_by_one(pairs).layout()
    extra = _channel_source("e", "e", (2, 3, 6, 6))
    generator = torch.Generator().manual_seed(11)
    extra_pair = (extra, torch.randn(extra.shape, dtype=torch.float64, generator=generator))
    reshaped = _channel_source("c", "c", (2, 5, 4, 4))
    reshaped_grad = torch.randn(reshaped.shape, dtype=torch.float64, generator=generator)
    reshaped_pair = (reshaped, reshaped_grad)
    # "d" never arrives; "c" comes at another resolution; "e" has no slot.
    arriving = [p for p in pairs if p[0].block not in ("c", "d")] + [reshaped_pair, extra_pair]
    expected = _one_by_one(arriving)
    collector = MapCollector()
    collector.reserve(layout)
    for buffer, _ in collector._buffers:
        buffer.fill_(float("nan"))  # what uninitialised memory may hold
    with torch.no_grad():
        for source, grad in arriving:
            collector.on_gradient(source, grad)
    assert "d" not in collector.block_maps
    _assert_same_result(collector, expected)
    assert collector.layout() == ()  # "c" did not fit its slot: no more reservations


def test_reserved_slots_are_not_written_while_gradients_are_recorded(monkeypatch):
    monkeypatch.setattr(aggregation, "_RESERVED_BYTES", 0)  # these maps are small
    """A map that is part of a graph (a differentiable backward pass, a bias that
    requires grad) is not written into reserved memory: it keeps its graph."""
    pairs = _pairs(2)
    layout = _one_by_one(pairs).layout()
    expected = _one_by_one(_pairs(2))
    collector = MapCollector()
    collector.reserve(layout)
    with torch.enable_grad():
        for source, grad in _pairs(2):
            source.intercept.channel_vector.requires_grad_(True)
            collector.on_gradient(source, grad)
    assert all(m.requires_grad for m in collector.block_maps.values())
    _assert_same_result(collector, expected)


def test_reserve_is_only_taken_before_the_first_map_and_for_eq4():
    layout = _one_by_one(_pairs(1)).layout()
    started = _one_by_one(_pairs(1)[:1])
    started.reserve(layout)
    assert not started._buffers  # maps already made: a reservation could not hold them
    authors = MapCollector("neurips2019")
    authors.reserve(layout)
    assert not authors._buffers and authors.layout() == ()


def test_small_maps_are_not_reserved_and_their_layout_is_kept():
    """Below ``_RESERVED_BYTES`` in all, nothing is allocated ahead (host time at batch 1
    is what counts there), and the layout is not recomputed on every call."""
    layout = _one_by_one(_pairs(2)).layout()
    collector = MapCollector()
    collector.reserve(layout)
    assert not collector._buffers and not collector._slots
    with torch.no_grad():
        for source, grad in _pairs(2):
            collector.on_gradient(source, grad)
    _assert_same_result(collector, _one_by_one(_pairs(2)))
    assert collector.layout() is layout


def test_a_reservation_that_maps_do_not_fit_is_not_made_again(monkeypatch):
    """Maps of another dtype than their slots (half-precision gradients under autocast are
    summed into float32 maps) go elsewhere; the layout then asks for no reservation, so
    later calls do not allocate memory that goes unused."""
    monkeypatch.setattr(aggregation, "_RESERVED_BYTES", 0)
    layout = _one_by_one(_pairs(2)).layout()
    collector = MapCollector()
    collector.reserve(layout)
    with torch.no_grad():
        for source, grad in _pairs(2):
            collector.on_gradient(source, grad.float())
    assert collector.layout() == ()
    later = MapCollector()
    later.reserve(())
    assert not later._buffers and later.layout() == ()


def test_a_block_without_a_slot_updates_the_layout(monkeypatch):
    monkeypatch.setattr(aggregation, "_RESERVED_BYTES", 0)
    pairs = _pairs(2)
    layout = _one_by_one(pairs[:2]).layout()  # an earlier call that reached blocks a, b
    collector = MapCollector()
    collector.reserve(layout)
    with torch.no_grad():
        for source, grad in pairs:
            collector.on_gradient(source, grad)
    assert collector.layout() == _one_by_one(pairs).layout()
