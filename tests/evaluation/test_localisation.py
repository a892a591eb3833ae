import numpy as np
import pytest
import torch

from captum_fullgrad.evaluation import pointing_game, relevance_mass, relevance_rank
from captum_fullgrad.evaluation.localisation import _disk_dilate


def square_mask(size=16, top=6, left=6, side=3, batch=1):
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    mask[:, top : top + side, left : left + side] = True
    return mask


def peak_map(row, col, size=16):
    maps = torch.rand(1, size, size, generator=torch.Generator().manual_seed(0)) * 0.5
    maps[0, row, col] = 1.0
    return maps


# ----------------------------------------------------------------------------- pointing game
def test_map_equal_to_mask_scores_one_everywhere():
    masks = square_mask(batch=2)
    masks[1] = torch.roll(masks[1], shifts=(5, -4), dims=(0, 1))
    maps = masks.float()
    # All maximal pixels (the whole mask) are inside the mask, even with no tolerance.
    assert pointing_game(maps, masks, tolerance=0).tolist() == [True, True]
    torch.testing.assert_close(relevance_mass(maps, masks), torch.ones(2))
    torch.testing.assert_close(relevance_rank(maps, masks), torch.ones(2))


def test_maximum_inside_mask_hits_and_far_outside_misses():
    masks = square_mask()  # rows/cols 6..8
    assert pointing_game(peak_map(7, 7), masks).item()
    assert not pointing_game(peak_map(0, 15), masks).item()


@pytest.mark.parametrize(
    "row, col, tolerance, hit",
    [
        (7, 11, 3, True),  # 3 px right of the mask edge (col 8): within tolerance
        (7, 12, 3, False),  # 4 px: beyond
        (7, 9, 0, False),  # 1 px outside with no tolerance
        (10, 10, 3, True),  # diagonal (2, 2) from corner (8, 8): distance 2.83 <= 3
        (11, 11, 3, False),  # diagonal (3, 3): 4.24 > 3 although a square window would hit
    ],
)
def test_tolerance_is_euclidean_distance_in_pixels(row, col, tolerance, hit):
    assert pointing_game(peak_map(row, col), square_mask(), tolerance=tolerance).item() == hit


def test_constant_map_is_not_a_hit():
    masks = square_mask()
    assert not pointing_game(torch.ones(1, 16, 16), masks).item()
    # ... unless the object (dilated by the tolerance) covers the whole image.
    assert pointing_game(torch.ones(1, 16, 16), torch.ones(1, 16, 16, dtype=torch.bool)).item()


def test_tied_maxima_must_all_be_inside():
    masks = square_mask()
    maps = peak_map(7, 7)
    assert pointing_game(maps, masks).item()
    maps[0, 0, 0] = 1.0  # a second, equal maximum far from the object
    assert not pointing_game(maps, masks).item()


def test_accepts_channel_dimension_and_numeric_masks():
    masks = square_mask()
    maps = peak_map(7, 7)
    assert pointing_game(maps[:, None], masks[:, None].float()).item()
    assert pointing_game(maps, masks.long()).item()


def test_disk_dilation_matches_euclidean_distance_transform():
    ndimage = pytest.importorskip("scipy.ndimage")
    masks = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(1)) > 0.97
    for radius in (0, 1, 2, 5):
        expected = [ndimage.distance_transform_edt(~m.numpy()) <= radius for m in masks]
        assert torch.equal(_disk_dilate(masks, radius), torch.from_numpy(np.stack(expected)))


def test_pointing_game_errors():
    with pytest.raises(ValueError, match="empty"):
        pointing_game(torch.rand(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match"):
        pointing_game(torch.rand(1, 8, 8), torch.ones(1, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.full((1, 8, 8), float("nan")), torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 and 1"):
        pointing_game(torch.rand(1, 8, 8), torch.full((1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="one channel"):
        pointing_game(torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(torch.rand(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), tolerance=-1)


# ----------------------------------------------------------------------------- relevance mass
def test_relevance_mass_hand_case_counts_positive_relevance_only():
    maps = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])
    masks = torch.tensor([[[True, True], [False, False]]])
    # Positive mass: 1 inside, 1 + 3 in total; the -2 inside the mask does not count.
    torch.testing.assert_close(relevance_mass(maps, masks), torch.tensor([0.25]))


def test_relevance_mass_is_zero_without_positive_mass():
    masks = square_mask()
    assert relevance_mass(-torch.rand(1, 16, 16), masks).item() == 0.0
    assert relevance_mass(torch.zeros(1, 16, 16), masks).item() == 0.0


def test_relevance_mass_of_map_outside_mask_is_zero_and_scale_invariant():
    masks = square_mask()
    maps = (~masks).float() * torch.rand(1, 16, 16)
    assert relevance_mass(maps, masks).item() == 0.0
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2))
    masks = square_mask(batch=2)
    torch.testing.assert_close(relevance_mass(maps, masks), relevance_mass(7.0 * maps, masks))


# ----------------------------------------------------------------------------- relevance rank
def test_relevance_rank_hand_case():
    maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    masks = torch.tensor([[[True, False], [True, False]]])  # K = 2: top-2 are 4 and 3
    assert relevance_rank(maps, masks).item() == pytest.approx(0.5)


def test_relevance_rank_ties_count_in_expectation():
    # K = 2; one strictly larger pixel (inside), then 3 pixels tied for the last slot,
    # one of them inside: expected hits = 1 + 1 * (2 - 1) / 3.
    maps = torch.tensor([[[5.0, 1.0], [1.0, 1.0]]])
    masks = torch.tensor([[[True, True], [False, False]]])
    assert relevance_rank(maps, masks).item() == pytest.approx((1 + 1 / 3) / 2)
    # A constant map scores the chance level K / (H W).
    masks = square_mask()
    assert relevance_rank(torch.ones(1, 16, 16), masks).item() == pytest.approx(9 / 256)


def test_relevance_rank_empty_mask_error():
    with pytest.raises(ValueError, match="empty"):
        relevance_rank(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_localisation_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(8, 64, 64, generator=g)
    masks = torch.rand(8, 64, 64, generator=g) > 0.8
    for metric in (pointing_game, relevance_mass, relevance_rank):
        cpu = metric(maps, masks)
        gpu = metric(maps.cuda(), masks.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu)
