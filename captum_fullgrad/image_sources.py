"""Image sources for data-set-scale attribution: what ``--images SOURCE`` names.

:func:`open_image_source` turns a SOURCE string into an :class:`ImageSource`, an ordered
list of images with stable ids, optional labels and a fingerprint:

- ``synthetic:N``: the first ``N`` scenes of
  :func:`~captum_fullgrad.datasets.synthetic_shapes` with seed ``data_seed``, ids
  ``synthetic:<seed>:<index>``, labels the scenes' classes. The embedded default: no file
  needed.
- a **directory**: every image below it (recursive), sorted by relative path, ids the
  relative POSIX paths. In an ImageFolder layout (no image directly in the root, every
  image inside a class directory) the label is the class directory's index in sorted
  order, as in :class:`torchvision.datasets.ImageFolder`.
- a **text file**: one image path per line (blank lines and lines starting with ``#``
  are skipped; relative paths are relative to the text file's directory), ids the lines
  as written, in file order.

Images are decoded one at a time by :meth:`ImageSource.load` (in DataLoader workers in
the job); an unreadable image raises :class:`BadImageError` with the reason, so the job
can record it and carry on.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "SYNTHETIC_PREFIX",
    "BadImageError",
    "ImageSource",
    "open_image_source",
    "render_synthetic",
]

#: File name endings read as images in a directory (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
SYNTHETIC_PREFIX = "synthetic:"
#: The generator's native size, that of the bundled shapes model.
SYNTHETIC_SIZE = 64


class BadImageError(Exception):
    """An image could not be read; ``str(error)`` says why."""


@dataclass(frozen=True)
class ImageSource:
    """An ordered list of images.

    Attributes:
        kind: ``"synthetic"``, ``"directory"``, ``"imagefolder"`` or ``"list"``.
        spec: the SOURCE string it was opened from.
        ids: one id per image, data-set order.
        labels: class index per image of an ImageFolder layout, else ``None`` (synthetic
            scenes give their labels through :meth:`load`: knowing them means rendering).
        classes: class names of an ImageFolder layout (index = label), else ``[]``.
        paths: file per image (empty for synthetic sources).
        data_seed: the generator's seed (synthetic sources only).
    """

    kind: str
    spec: str
    ids: List[str]
    labels: Optional[List[int]] = None
    classes: List[str] = field(default_factory=list)
    paths: List[Path] = field(default_factory=list)
    data_seed: Optional[int] = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the kind, ids and labels in order: two sources with the same
        fingerprint list the same images in the same order (a synthetic id fixes its
        scene). File contents are not read."""
        digest = hashlib.sha256()
        digest.update(self.kind.encode())
        for image_id in self.ids:
            digest.update(b"\0" + image_id.encode("utf-8", "surrogateescape"))
        if self.labels is not None:
            digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()

    @property
    def has_labels(self) -> bool:
        """True when :meth:`load` gives labels (synthetic scenes, ImageFolder layouts)."""
        return self.kind == "synthetic" or self.labels is not None

    def load(self, index: int) -> Tuple[Tensor, int]:
        """Image ``index`` as a ``(3, H, W)`` tensor (uint8 for files, float32 in [0, 1] for
        synthetic scenes) and its label (-1 when the source has none).

        Raises:
            BadImageError: the file is missing, unreadable or not an image.
        """
        if self.kind == "synthetic":
            assert self.data_seed is not None
            return render_synthetic(self.data_seed, index)
        label = -1 if self.labels is None else self.labels[index]
        return _decode(self.paths[index]), label


def render_synthetic(seed: int, index: int, size: int = SYNTHETIC_SIZE) -> Tuple[Tensor, int]:
    """Scene ``index`` of ``synthetic_shapes(n, seed, size)`` (any ``n > index``), alone, and
    its label.

    :func:`~captum_fullgrad.datasets.synthetic_shapes` gives image ``i`` its own random
    stream keyed by ``(seed, i)``; this renders one image from the same stream, so a
    worker can produce any image without rendering those before it.
    """
    from . import datasets

    coords = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    entropy = np.random.SeedSequence(int(seed)).entropy
    rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(int(index),)))
    _, image, _, _, label, _ = datasets._render_scene(rng, xs, ys, size)
    return torch.from_numpy(np.ascontiguousarray(image)), int(label)


def _decode(path: Path) -> Tensor:
    import torchvision.io as tvio

    try:
        data = tvio.read_file(str(path))
        image = tvio.decode_image(data, mode=tvio.ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as exc:
        text = " ".join(str(exc).split())
        # torchvision's messages start with "function, /path/to/source.cpp:LINE, ".
        match = re.match(r"^\w+, \S+:\d+, (.*)$", text)
        reason = (match.group(1) if match else text)[:200] or type(exc).__name__
        raise BadImageError(reason) from None
    if image.dim() == 4:  # animated GIF: first frame
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise BadImageError(f"unexpected decoded shape {tuple(image.shape)}")
    return image


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _synthetic(spec: str, data_seed: int) -> ImageSource:
    count = spec[len(SYNTHETIC_PREFIX) :].strip()
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--images {spec!r}: expected synthetic:N with N a positive integer")
    ids = [f"synthetic:{data_seed}:{i}" for i in range(int(count))]
    return ImageSource("synthetic", spec, ids, data_seed=int(data_seed))


def _directory(spec: str, root: Path) -> ImageSource:
    found: List[Path] = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        found += [Path(directory) / f for f in sorted(files) if _is_image(f)]
    if not found:
        raise ValueError(
            f"--images {spec!r}: the directory holds no image ({', '.join(IMAGE_SUFFIXES)})"
        )
    relative = [p.relative_to(root) for p in found]
    order = sorted(range(len(found)), key=lambda k: relative[k].as_posix())
    relative = [relative[k] for k in order]
    found = [found[k] for k in order]
    ids = [r.as_posix() for r in relative]
    if all(len(r.parts) >= 2 for r in relative):
        classes = sorted({r.parts[0] for r in relative})
        index = {name: k for k, name in enumerate(classes)}
        labels = [index[r.parts[0]] for r in relative]
        return ImageSource("imagefolder", spec, ids, labels, classes, list(found))
    return ImageSource("directory", spec, ids, paths=list(found))


def _path_list(spec: str, listing: Path) -> ImageSource:
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--images {spec!r}: cannot read the list of paths: {exc}") from None
    ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise ValueError(f"--images {spec!r}: the list holds no path")
    paths = [
        p if p.is_absolute() else listing.parent / p for p in (Path(i).expanduser() for i in ids)
    ]
    return ImageSource("list", spec, ids, paths=paths)


def open_image_source(spec: Union[str, "os.PathLike[str]"], data_seed: int = 0) -> ImageSource:
    """The :class:`ImageSource` that ``spec`` names (see the module docstring).

    Args:
        spec: ``synthetic:N``, a directory, or a text file of image paths.
        data_seed: seed of the synthetic scenes (ignored for files).

    Raises:
        ValueError: nothing at ``spec``, an empty directory or list, a bad ``synthetic:N``.
    """
    text = str(spec)
    if text.startswith(SYNTHETIC_PREFIX):
        return _synthetic(text, data_seed)
    path = Path(text).expanduser()
    if path.is_dir():
        return _directory(text, path)
    if path.is_file():
        if _is_image(path.name):
            raise ValueError(
                f"--images {text!r} is one image; give a directory, a text file of paths, "
                "or synthetic:N"
            )
        return _path_list(text, path)
    raise ValueError(
        f"--images {text!r}: no such directory or file (or use synthetic:N for generated scenes)"
    )
