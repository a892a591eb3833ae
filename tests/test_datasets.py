"""Tests of the synthetic shape scenes: format, determinism, and that the masks are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import label as connected_components
from skimage.measure import regionprops

from captum_fullgrad.datasets import (
    DISTRACTOR_SHAPES,
    SHAPE_CLASSES,
    ShapeScenes,
    render_shapes,
    synthetic_shapes,
)

N = 200  # Enough for every class and every distractor count to appear many times.


@pytest.fixture(scope="module")
def scenes() -> ShapeScenes:
    return render_shapes(N, seed=7)


def test_classes_and_distractors_are_distinct_shapes() -> None:
    assert len(SHAPE_CLASSES) >= 4
    assert len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    assert not set(SHAPE_CLASSES) & set(DISTRACTOR_SHAPES)


@pytest.mark.parametrize("size", [64, 96])
def test_shapes_dtypes_and_ranges(size: int) -> None:
    images, labels, masks = synthetic_shapes(24, seed=1, size=size)
    assert images.shape == (24, 3, size, size) and images.dtype == torch.float32
    assert labels.shape == (24,) and labels.dtype == torch.int64
    assert masks.shape == (24, size, size) and masks.dtype == torch.bool
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.min() >= 0 and labels.max() < len(SHAPE_CLASSES)
    assert torch.isfinite(images).all()


def test_returns_the_first_fields_of_render_shapes(scenes: ShapeScenes) -> None:
    images, labels, masks = synthetic_shapes(N, seed=7)
    assert torch.equal(images, scenes.images)
    assert torch.equal(labels, scenes.labels)
    assert torch.equal(masks, scenes.masks)


def test_deterministic_for_a_seed_and_prefix_stable() -> None:
    first = synthetic_shapes(16, seed=3)
    again = synthetic_shapes(16, seed=3)
    longer = synthetic_shapes(32, seed=3)
    for a, b, c in zip(first, again, longer):
        assert torch.equal(a, b)
        # Image i depends only on (seed, i), not on how many images are drawn.
        assert torch.equal(a, c[:16])


def test_different_seeds_give_different_images() -> None:
    a, _, mask_a = synthetic_shapes(16, seed=0)
    b, _, mask_b = synthetic_shapes(16, seed=1)
    # Every single image differs, not just the batch as a whole.
    assert all(not torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(mask_a, mask_b)


def test_leaves_global_random_state_alone() -> None:
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    synthetic_shapes(4, seed=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert (
        after[0] == np_state[0]
        and np.array_equal(after[1], np_state[1])
        and after[2:] == np_state[2:]
    )


def test_every_class_appears_roughly_balanced(scenes: ShapeScenes) -> None:
    counts = torch.bincount(scenes.labels, minlength=len(SHAPE_CLASSES))
    assert len(counts) == len(SHAPE_CLASSES)
    # Expected N / 4 = 50 each; a binomial stays within [25, 75] with overwhelming odds.
    assert counts.min() >= N // (2 * len(SHAPE_CLASSES)), counts
    assert counts.max() <= 3 * N // (2 * len(SHAPE_CLASSES)), counts


def test_masks_are_single_blobs_of_plausible_size(scenes: ShapeScenes) -> None:
    for mask in scenes.masks.numpy():
        area = int(mask.sum())
        # Smallest class object: a triangle of circumradius 7 (~64 px); largest: a disc of
        # radius 0.8 * 12 (~290 px).
        assert 40 <= area <= 350, area
        assert connected_components(mask, connectivity=2, return_num=True)[1] == 1
        # The class object lies fully inside the image.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_mask_is_exactly_the_class_object(scenes: ShapeScenes) -> None:
    images, backgrounds = scenes.images, scenes.backgrounds
    objects = scenes.masks | scenes.distractor_masks
    # The class object never overlaps (nor touches) a distractor.
    assert not (scenes.masks & scenes.distractor_masks).any()
    changed = (images != backgrounds).any(dim=1)
    # Drawing the objects changed exactly their pixels: the background is untouched
    # elsewhere, and each object pixel has a colour the background cannot have.
    assert torch.equal(changed, objects)
    # The class object is drawn last and in one colour, so its visible pixels (the mask)
    # all carry that colour.
    for image, mask in zip(images, scenes.masks):
        colours = image[:, mask]
        assert torch.equal(colours, colours[:, :1].expand_as(colours))


def _shape_of(mask: np.ndarray) -> str:
    """Recognise a class object from its mask alone, by two rotation-invariant measures.

    ``fill`` is the area over that of the smallest centred disc containing the shape
    (disc ~0.9, square ~0.64, triangle ~0.41); ``solidity`` (area over convex-hull area)
    singles out the cross (~0.7, the others >= 0.83).
    """
    ys, xs = np.nonzero(mask)
    radius = np.sqrt(((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max()) + 0.5
    fill = mask.sum() / (np.pi * radius**2)
    solidity = regionprops(mask.astype(np.uint8))[0].solidity
    if solidity < 0.79:
        return "cross"
    if fill > 0.77:
        return "disc"
    if fill < 0.52:
        return "triangle"
    return "square"


def test_mask_has_the_shape_of_the_label(scenes: ShapeScenes) -> None:
    # The mask is not just some blob: it is the object whose shape the label names.
    recognised = [_shape_of(mask) for mask in scenes.masks.numpy()]
    expected = [SHAPE_CLASSES[label] for label in scenes.labels.tolist()]
    assert recognised == expected


def test_distractors_present(scenes: ShapeScenes) -> None:
    assert scenes.num_distractors.min() >= 1 and scenes.num_distractors.max() <= 3
    assert set(scenes.num_distractors.tolist()) == {1, 2, 3}
    for distractors, count, image in zip(
        scenes.distractor_masks.numpy(), scenes.num_distractors.tolist(), scenes.images
    ):
        components, found = connected_components(distractors, connectivity=2, return_num=True)
        # Distractors keep a gap between each other, so each is one separate component.
        assert found == count
        for k in range(1, found + 1):
            colours = image[:, torch.from_numpy(components == k)]
            assert torch.equal(colours, colours[:, :1].expand_as(colours))


def test_background_is_textured_and_low_contrast(scenes: ShapeScenes) -> None:
    backgrounds = scenes.backgrounds
    assert backgrounds.min() >= 0.22 - 1e-6 and backgrounds.max() <= 0.78 + 1e-6
    # Textured, not flat: every background has visible spatial variation.
    assert (backgrounds.flatten(1).std(dim=1) > 0.01).all()


def test_zero_images() -> None:
    images, labels, masks = synthetic_shapes(0, seed=0)
    assert images.shape == (0, 3, 64, 64) and labels.shape == (0,) and masks.shape == (0, 64, 64)


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 2.5}, {"size": 16}, {"size": 1024}])
def test_invalid_arguments(kwargs: dict) -> None:
    arguments = {"n": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        synthetic_shapes(**arguments)


def test_random_symmetry_is_a_symmetry_of_the_square_and_seeded():
    from captum_fullgrad.datasets import random_symmetry

    images = synthetic_shapes(4, seed=3, size=32)[0]
    symmetries = []
    for transpose in (False, True):
        for flip_v in (False, True):
            for flip_h in (False, True):
                t = images.flip(-1) if flip_h else images
                t = t.flip(-2) if flip_v else t
                symmetries.append(t.transpose(-1, -2) if transpose else t)
    for seed in range(6):
        out = random_symmetry(images, torch.Generator().manual_seed(seed))
        assert any(torch.equal(out, s) for s in symmetries)
        assert torch.equal(out, random_symmetry(images, torch.Generator().manual_seed(seed)))
