"""Image files of every PIL mode, 8 or 16 bits, read as 8-bit RGB (captum_fullgrad._images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_fullgrad._images import ImageReadError, read_image


def gradient(height: int = 6, width: int = 10) -> np.ndarray:
    """An (H, W, 3) uint8 picture with distinct values per pixel and channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 25, y * 40, (x + y) * 12], axis=-1).astype(np.uint8)


def test_sixteen_bit_grey_png_maps_0_65535_onto_0_255(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896], [65535, 1000, 65278]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow reads it as a wide integer mode
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 3)
    expected = torch.tensor([[0, 1, 128], [255, 4, 254]], dtype=torch.uint8)
    for channel in image:
        assert torch.equal(channel, expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr", "I", "F"])
def test_every_mode_reads_as_rgb_uint8(tmp_path: Path, mode: str) -> None:
    picture = Image.fromarray(gradient())
    if mode == "I":
        converted = Image.fromarray(np.asarray(picture.convert("L")).astype(np.int32) * 257)
    elif mode == "F":
        converted = Image.fromarray(np.asarray(picture.convert("L")).astype(np.float32) / 255.0)
    else:
        converted = picture.convert(mode)
    path = tmp_path / ("picture.tiff" if mode in ("CMYK", "YCbCr", "I", "F") else "picture.png")
    if mode == "YCbCr":
        path = tmp_path / "picture.jpg"
    converted.save(path)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 10)
    if mode in ("RGB", "RGBA"):
        assert torch.equal(image, torch.from_numpy(gradient()).permute(2, 0, 1))
    if mode == "P":  # the palette's colours
        expected = np.array(converted.convert("RGB"))
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    if mode in ("L", "LA", "I", "F"):  # grey: the same luminance in every channel
        grey = torch.from_numpy(np.array(picture.convert("L")))
        assert all(torch.equal(channel, grey) for channel in image)


def test_out_of_range_and_broken_files_are_refused(tmp_path: Path) -> None:
    wide = tmp_path / "wide.tiff"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(wide)
    with pytest.raises(ImageReadError, match="16-bit range"):
        read_image(wide)
    bright = tmp_path / "bright.tiff"
    Image.fromarray(np.array([[0.0, 2.5]], dtype=np.float32)).save(bright)
    with pytest.raises(ImageReadError, match=r"\[0, 1\]"):
        read_image(bright)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(broken)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)) for value in (10, 200)]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = read_image(path)
    assert image.shape == (3, 4, 4) and int(image.float().mean()) < 50
