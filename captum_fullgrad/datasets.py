"""Offline data: synthetic shape scenes whose class-deciding pixels are known exactly.

Saliency comparisons need images for which the "right" evidence is known. ImageNet gives
no pixel-exact ground truth and needs a download; this module renders scenes, fully
offline and in a few milliseconds per hundred images, in which

- the class is decided by exactly ONE object, whose shape is one of :data:`SHAPE_CLASSES`;
- one to three *distractor* objects (rings and thin bars, shapes that belong to no class)
  have the same size and colour statistics as the class object, so a model can only
  solve the task by looking at the class object's shape, not at colour, size or clutter;
- the background is a random, tinted, low-contrast crop of one of scikit-image's bundled
  textures (brick, grass, gravel), so that "anything that is not flat" is not a shortcut.

The class object is drawn last and never overlaps a distractor, so the returned mask is
exactly the set of pixels that the class object occupies in the image.

Every random choice comes from a :class:`numpy.random.Generator` seeded from
``(seed, image index)``; the global NumPy and torch random states are never touched. As a
consequence, ``synthetic_shapes(n, seed)`` is a prefix of ``synthetic_shapes(m, seed)``
for ``n <= m``, and images of different seeds are independent.

Example::

    >>> from captum_fullgrad.datasets import synthetic_shapes, SHAPE_CLASSES
    >>> images, labels, masks = synthetic_shapes(8, seed=0)
    >>> images.shape, labels.shape, masks.shape
    (torch.Size([8, 3, 64, 64]), torch.Size([8]), torch.Size([8, 64, 64]))
    >>> SHAPE_CLASSES
    ('disc', 'square', 'triangle', 'cross')
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SHAPE_CLASSES",
    "DISTRACTOR_SHAPES",
    "ShapeScenes",
    "handwritten_digits",
    "random_symmetry",
    "render_shapes",
    "synthetic_shapes",
]

#: Class names, in label order: label ``k`` means "the class object is a ``SHAPE_CLASSES[k]``".
#: Filled, convex-ish shapes that differ in their corners and outline, which a small CNN
#: separates reliably at 64 px.
SHAPE_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "cross")

#: Shapes of the distractor objects, which belong to no class. A ring is a disc with a hole
#: and a bar is one arm of a cross, so a model cannot use "round" or "has a thin stroke" as
#: the class cue: it has to see the whole class object.
DISTRACTOR_SHAPES: tuple[str, ...] = ("ring", "bar")

# Sizes are given for 64 px images and scaled linearly with ``size``.
_REFERENCE_SIZE = 64
# Circumradius (largest extent from the centre) of the class object, in pixels.
_CLASS_RADIUS = (7.0, 12.0)
# Outer radius and stroke width of a ring; half-length and width of a bar.
_RING_RADIUS = (4.5, 8.0)
_RING_WIDTH = (1.6, 2.6)
_BAR_HALF_LENGTH = (4.0, 8.0)
_BAR_WIDTH = (2.0, 3.0)
_NUM_DISTRACTORS = (1, 3)
# Minimal gap, in pixels, between the bounding circles of any two objects; it guarantees
# that no distractor touches the class object, so the class mask is never occluded.
_GAP = 2.0

# Background: texture values are first stretched to [0, 1], then contrast-reduced around
# 0.5 and shifted per channel (a tint). With these ranges every background channel lies in
# [0.5 - 0.2 - 0.08, 0.5 + 0.2 + 0.08] = [0.22, 0.78].
_BACKGROUND_CONTRAST = (0.2, 0.4)
_BACKGROUND_TINT = 0.08
# Object colours are random, except that one random channel is forced into [0, 0.1] or
# [0.9, 1]: that channel differs from every possible background value by at least 0.12,
# which keeps each object visible and makes "object pixel != background pixel" hold
# exactly (tests rely on it).
_DARK_CHANNEL = (0.0, 0.1)
_BRIGHT_CHANNEL = (0.9, 1.0)

_TEXTURE_NAMES: tuple[str, ...] = ("brick", "grass", "gravel")


@dataclass(frozen=True)
class ShapeScenes:
    """Rendered scenes with every layer that went into them.

    Attributes:
        images: ``(N, 3, H, W)`` float32 images in ``[0, 1]``.
        labels: ``(N,)`` int64 class indices into :data:`SHAPE_CLASSES`.
        masks: ``(N, H, W)`` bool, the pixels of the class-deciding object.
        distractor_masks: ``(N, H, W)`` bool, the union of the distractor objects' pixels;
            disjoint from ``masks``.
        backgrounds: ``(N, 3, H, W)`` float32, the textured background before any object
            was drawn; ``images`` equals ``backgrounds`` outside ``masks | distractor_masks``
            and differs from it in every pixel inside.
        num_distractors: ``(N,)`` int64, how many distractor objects each image holds.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    distractor_masks: Tensor
    backgrounds: Tensor
    num_distractors: Tensor


def synthetic_shapes(n: int, seed: int, size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Render ``n`` synthetic shape scenes.

    Each image contains one class object (a disc, square, triangle or cross, see
    :data:`SHAPE_CLASSES`) at a random position, with a random size, rotation and colour,
    one to three distractor objects (rings and bars, see :data:`DISTRACTOR_SHAPES`) that
    never touch it, and a textured background. See the module docstring for the design.

    Args:
        n: number of images, ``n >= 0``.
        seed: seed of the scene generator. The same ``(n, seed, size)`` always gives the
            same tensors; image ``i`` depends only on ``(seed, i, size)``.
        size: height and width of the images in pixels, between 32 and 256. Object sizes
            scale with it.

    Returns:
        ``(images, labels, masks)``: ``images`` is ``(N, 3, size, size)`` float32 in
        ``[0, 1]``, ``labels`` is ``(N,)`` int64 in ``[0, len(SHAPE_CLASSES))`` and
        ``masks`` is ``(N, size, size)`` bool, exactly the visible pixels of the class
        object. Use :func:`render_shapes` to also get the distractors and backgrounds.
    """
    scenes = render_shapes(n, seed, size)
    return scenes.images, scenes.labels, scenes.masks


def render_shapes(n: int, seed: int, size: int = 64) -> ShapeScenes:
    """Render ``n`` synthetic shape scenes and return every layer of them.

    Same scenes as :func:`synthetic_shapes` (which returns the first three fields of this
    function's result), plus the distractor masks and the backgrounds, which let a caller
    check the masks or measure how much saliency falls on distractors.

    Args:
        n: number of images, ``n >= 0``.
        seed: seed of the scene generator; see :func:`synthetic_shapes`.
        size: height and width of the images in pixels, between 32 and 256.

    Returns:
        A :class:`ShapeScenes`.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 256:
        # Below 32 px the smallest shapes lose their corners; above 256 px a background
        # crop would need to be larger than half of the 512 px textures.
        raise ValueError(f"size must be an integer between 32 and 256, got {size!r}")
    n, size = int(n), int(size)

    images = np.empty((n, 3, size, size), dtype=np.float32)
    backgrounds = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    distractor_masks = np.empty((n, size, size), dtype=bool)
    labels = np.empty(n, dtype=np.int64)
    num_distractors = np.empty(n, dtype=np.int64)

    # Pixel centres, shared by every object of every image.
    coords = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    # One independent stream per image, keyed by (seed, index): the result does not
    # depend on n or on the order of generation, and the global random state is untouched.
    entropy = np.random.SeedSequence(int(seed)).entropy
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(i,)))
        background, image, mask, distractor_mask, label, count = _render_scene(rng, xs, ys, size)
        backgrounds[i], images[i], masks[i], distractor_masks[i] = (
            background, image, mask, distractor_mask
        )  # fmt: skip
        labels[i], num_distractors[i] = label, count

    return ShapeScenes(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        masks=torch.from_numpy(masks),
        distractor_masks=torch.from_numpy(distractor_masks),
        backgrounds=torch.from_numpy(backgrounds),
        num_distractors=torch.from_numpy(num_distractors),
    )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _render_scene(
    rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Draw one scene; returns (background, image, mask, distractor mask, label, #distractors)."""
    scale = size / _REFERENCE_SIZE
    background = _background(rng, size)
    image = background.copy()

    label = int(rng.integers(len(SHAPE_CLASSES)))
    radius = rng.uniform(*_CLASS_RADIUS) * scale
    # The class object lies entirely inside the image: its mask is never cut by the border.
    centre = rng.uniform(radius + 1.0, size - radius - 1.0, size=2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    colour = _colour(rng)

    # Distractors: place each at a random position whose bounding circle keeps _GAP pixels
    # from the class object and from the earlier distractors.
    placed = [(centre, radius)]
    distractor_mask = np.zeros((size, size), dtype=bool)
    count = 0
    for _ in range(int(rng.integers(_NUM_DISTRACTORS[0], _NUM_DISTRACTORS[1] + 1))):
        kind = DISTRACTOR_SHAPES[int(rng.integers(len(DISTRACTOR_SHAPES)))]
        if kind == "ring":
            outer = rng.uniform(*_RING_RADIUS) * scale
            width = rng.uniform(*_RING_WIDTH) * scale
            draw: Callable[[np.ndarray, np.ndarray], np.ndarray] = functools.partial(
                _ring, outer=outer, width=width
            )
            extent = outer
        else:
            half_length = rng.uniform(*_BAR_HALF_LENGTH) * scale
            width = rng.uniform(*_BAR_WIDTH) * scale
            draw = functools.partial(_rectangle, half_u=half_length, half_v=width / 2)
            extent = float(np.hypot(half_length, width / 2))
        d_centre = _free_position(rng, extent, placed, size)
        d_angle = rng.uniform(0.0, 2.0 * np.pi)
        d_colour = _colour(rng)
        if d_centre is None:  # No room left: the image keeps the distractors drawn so far.
            continue
        placed.append((d_centre, extent))
        obj = draw(*_local_coords(xs, ys, d_centre, d_angle))
        image[:, obj] = d_colour[:, None]
        distractor_mask |= obj
        count += 1

    # The class object is drawn last so that its mask is exactly what is visible.
    mask = _CLASS_DRAWERS[label](*_local_coords(xs, ys, centre, angle), radius)
    image[:, mask] = colour[:, None]
    return background, image, mask, distractor_mask, label, count


def _free_position(
    rng: np.random.Generator,
    extent: float,
    placed: list[tuple[np.ndarray, float]],
    size: int,
    tries: int = 64,
) -> np.ndarray | None:
    """A centre for an object of bounding radius ``extent`` that keeps clear of ``placed``.

    Draws ``tries`` candidates at once (a fixed number, so the random stream does not
    depend on which candidate succeeds) and returns the first valid one, or ``None``.
    """
    low, high = min(extent, size / 2), max(size - extent, size / 2)
    candidates = rng.uniform(low, high, size=(tries, 2))
    ok = np.ones(tries, dtype=bool)
    for other_centre, other_extent in placed:
        distance = np.linalg.norm(candidates - other_centre, axis=1)
        ok &= distance >= extent + other_extent + _GAP
    hits = np.flatnonzero(ok)
    return candidates[hits[0]] if hits.size else None


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour with one channel far from every background value."""
    colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    channel = int(rng.integers(3))
    extreme = _DARK_CHANNEL if rng.random() < 0.5 else _BRIGHT_CHANNEL
    colour[channel] = rng.uniform(*extreme)
    return colour


def _local_coords(
    xs: np.ndarray, ys: np.ndarray, centre: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in the object's frame (translated, rotated by ``-angle``)."""
    dx, dy = xs - centre[0], ys - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


# Each drawer maps the object-frame coordinates (u, v) of every pixel centre and the
# circumradius r to a boolean mask. Hard (non anti-aliased) edges keep the mask exact.
# The proportions give the four classes similar areas (1.3 r^2 to 2.0 r^2), so that area
# is no reliable cue given the random radius.


def _disc(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return u * u + v * v <= (0.8 * r) ** 2


def _square(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    # Half-side 0.68 r: the corners reach 0.96 r.
    return _rectangle(u, v, 0.68 * r, 0.68 * r)


def _triangle(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    # Equilateral triangle of circumradius r: inside the three half-planes whose outward
    # normals are 120 degrees apart, at the inradius r / 2 from the centre.
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        phi = np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(phi) + v * np.sin(phi) <= r / 2
    return inside


def _cross(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    # Two arms of half-length 0.95 r and half-width 0.3 r: thick enough to differ from the
    # thin bar distractors, and the arm corners stay within r.
    return _rectangle(u, v, 0.95 * r, 0.3 * r) | _rectangle(u, v, 0.3 * r, 0.95 * r)


def _ring(u: np.ndarray, v: np.ndarray, outer: float, width: float) -> np.ndarray:
    rho2 = u * u + v * v
    return (rho2 <= outer**2) & (rho2 >= (outer - width) ** 2)


def _rectangle(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    return (np.abs(u) <= half_u) & (np.abs(v) <= half_v)


_CLASS_DRAWERS: tuple[Callable[[np.ndarray, np.ndarray, float], np.ndarray], ...] = (
    _disc,
    _square,
    _triangle,
    _cross,
)
assert len(_CLASS_DRAWERS) == len(SHAPE_CLASSES)


# --------------------------------------------------------------------------------------
# Background
# --------------------------------------------------------------------------------------


@functools.cache
def _texture(name: str) -> np.ndarray:
    """A bundled scikit-image texture, grey-scale float32 stretched to [0, 1].

    The 1st and 99th percentiles map to 0 and 1, so all three textures use the same
    dynamic range before the per-image contrast reduction.
    """
    import skimage.data  # Imported lazily: it is only needed to render, not to import.

    texture = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    if texture.ndim == 3:  # Defensive: all three are grey-scale in scikit-image 0.21+.
        texture = texture[..., :3].mean(axis=-1)
    low, high = np.percentile(texture, [1, 99])
    texture = np.clip((texture - low) / (high - low), 0.0, 1.0)
    texture.setflags(write=False)  # Cached and shared: guard against accidental edits.
    return texture


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of a random texture, randomly zoomed, rotated, contrast-reduced and tinted."""
    texture = _texture(_TEXTURE_NAMES[int(rng.integers(len(_TEXTURE_NAMES)))])
    # A zoom of 2 (a crop twice as large, subsampled) varies the texture scale for free.
    zoom = int(rng.integers(1, 3)) if 2 * size <= min(texture.shape) else 1
    extent = zoom * size
    top = int(rng.integers(texture.shape[0] - extent + 1))
    left = int(rng.integers(texture.shape[1] - extent + 1))
    crop = texture[top : top + extent : zoom, left : left + extent : zoom]
    crop = np.rot90(crop, k=int(rng.integers(4)))

    contrast = rng.uniform(*_BACKGROUND_CONTRAST)
    tint = rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, size=3).astype(np.float32)
    grey = 0.5 + contrast * (crop - 0.5)
    return (grey[None, :, :] + tint[:, None, None]).astype(np.float32)


def random_symmetry(images: Tensor, generator: torch.Generator) -> Tensor:
    """A random element of the square's symmetry group (flips, transpose) applied to a batch.

    The classes of :func:`synthetic_shapes` are invariant to it (a disc, square, triangle
    or cross stays one), so the training scripts use it as augmentation. Draws three
    numbers from ``generator``.
    """
    flip_h, flip_v, transpose = (torch.rand(3, generator=generator) < 0.5).tolist()
    if flip_h:
        images = images.flip(-1)
    if flip_v:
        images = images.flip(-2)
    if transpose:
        images = images.transpose(-1, -2)
    return images.contiguous()


# --------------------------------------------------------------------------- real images
#: Largest pixel value of scikit-learn's digits (4x4 blocks of a 32x32 bitmap, counted).
_DIGITS_MAX = 16.0


def handwritten_digits(size: int = 16) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits as a batch for convolutional networks.

    Real images that ship offline: ``sklearn.datasets.load_digits`` holds 1,797 8x8
    grey-level scans (values 0-16) of digits written by 43 people, classes 0-9 with 174 to
    183 images each. Pixels are scaled to ``[0, 1]`` and the images bilinearly resized
    (``align_corners=False``) to ``size x size``, so that a few 2x2 poolings still leave a
    spatial map. Needs the optional extra ``digits`` (scikit-learn); nothing is downloaded.

    Args:
        size: side of the returned images in pixels, at least 8 (8: the scans as they are).

    Returns:
        ``(images, labels)``: float32 ``(1797, 1, size, size)`` in ``[0, 1]`` and int64
        ``(1797,)``, in scikit-learn's order.

    Raises:
        ImportError: scikit-learn is not installed (the message names the extra).
        ValueError: ``size`` is not an integer >= 8.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"handwritten_digits: size must be an integer >= 8, got {size!r}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "handwritten_digits needs scikit-learn (the bundled digits data set): "
            "pip install 'captum-fullgrad[digits]'."
        ) from error
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / _DIGITS_MAX)
    images = images.unsqueeze(1)
    if size != images.shape[-1]:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        ).clamp_(0.0, 1.0)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images.contiguous(), labels
