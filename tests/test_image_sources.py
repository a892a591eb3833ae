"""Image sources: synthetic scenes one at a time, directories, ImageFolder labels, path lists."""

from __future__ import annotations

import pytest
import torch
import torchvision

from captum_fullgrad.datasets import synthetic_shapes
from captum_fullgrad.image_sources import BadImageError, open_image_source, render_synthetic


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.full((3, 8, 8), value, dtype=torch.uint8)
    torchvision.io.write_png(image, str(path))


def test_synthetic_scene_alone_equals_the_batch_generator():
    images, labels, _ = synthetic_shapes(5, seed=7)
    for index in (0, 3, 4):
        image, label = render_synthetic(7, index)
        torch.testing.assert_close(image, images[index], rtol=0, atol=0)
        assert label == int(labels[index])
    source = open_image_source("synthetic:5", data_seed=7)
    assert source.ids[3] == "synthetic:7:3" and source.has_labels and len(source) == 5
    torch.testing.assert_close(source.load(4)[0], images[4], rtol=0, atol=0)


def test_directory_is_recursive_and_sorted_by_relative_path(tmp_path):
    _png(tmp_path / "b.png", 1)
    _png(tmp_path / "a" / "z.PNG", 2)
    _png(tmp_path / "a" / "y.jpg.png", 3)
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_image_source(str(tmp_path))
    assert source.kind == "directory" and source.ids == ["a/y.jpg.png", "a/z.PNG", "b.png"]
    assert not source.has_labels
    image, label = source.load(1)
    assert image.dtype == torch.uint8 and int(image[0, 0, 0]) == 2 and label == -1


def test_imagefolder_layout_gives_class_labels(tmp_path):
    _png(tmp_path / "dog" / "1.png", 1)
    _png(tmp_path / "cat" / "x" / "2.png", 2)
    _png(tmp_path / "cat" / "3.png", 3)
    source = open_image_source(tmp_path)
    assert source.kind == "imagefolder" and source.classes == ["cat", "dog"]
    assert source.ids == ["cat/3.png", "cat/x/2.png", "dog/1.png"]
    assert source.labels == [0, 0, 1] and source.load(2)[1] == 1


def test_path_list_keeps_file_order_and_reports_bad_images(tmp_path):
    _png(tmp_path / "imgs" / "a.png", 5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimgs/broken.png\n\nimgs/a.png\nimgs/missing.png\n")
    source = open_image_source(listing)
    assert source.kind == "list" and source.ids == [
        "imgs/broken.png",
        "imgs/a.png",
        "imgs/missing.png",
    ]
    assert int(source.load(1)[0][0, 0, 0]) == 5
    for index in (0, 2):
        with pytest.raises(BadImageError) as error:
            source.load(index)
        assert str(error.value)


def test_fingerprint_tells_sources_apart(tmp_path):
    a = open_image_source("synthetic:4", data_seed=0)
    assert a.fingerprint == open_image_source("synthetic:4", data_seed=0).fingerprint
    assert a.fingerprint != open_image_source("synthetic:4", data_seed=1).fingerprint
    assert a.fingerprint != open_image_source("synthetic:5", data_seed=0).fingerprint
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 1)
    directory = open_image_source(tmp_path).fingerprint
    (tmp_path / "b.png").rename(tmp_path / "c.png")
    assert open_image_source(tmp_path).fingerprint != directory


@pytest.mark.parametrize(
    "spec, message",
    [("synthetic:0", "positive"), ("synthetic:x", "positive"), ("nowhere", "no such")],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        open_image_source(spec)


def test_empty_directory_and_single_image_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no image"):
        open_image_source(tmp_path)
    _png(tmp_path / "one.png", 1)
    with pytest.raises(ValueError, match="one image"):
        open_image_source(tmp_path / "one.png")
