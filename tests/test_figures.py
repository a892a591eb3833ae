"""Figures: Table 5 grid and Figure 1 decomposition build, save as valid PNG/PDF, add up."""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict

import matplotlib.image
import matplotlib.text
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from captum_fullgrad.figures import (
    MIN_FONT_PT,
    PRINT_WIDTH_IN,
    AttributionMaps,
    attribution_maps,
    comparison_grid,
    decomposition_figure,
    decomposition_summary,
    format_probability,
    normalize_maps,
    normalize_signed_map,
    overlay,
    save_figure,
)
from captum_fullgrad.full_gradient import FullGradient
from captum_fullgrad.methods import get_method
from captum_fullgrad.models import ShapesVGG
from captum_fullgrad.testing import randomize_parameters_
from tests.conftest import UnseenSquareNet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CATEGORIES = ["disc", "square", "triangle", "cross"]
NUMBER = r"(-?\d+(?:\.\d*)?(?:e[-+]?\d+)?)"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_cpu_thread):
    yield


@pytest.fixture(scope="module")
def model():
    # A small ShapesVGG (conv-BN-ReLU blocks, like the paper's VGG) with every bias non-zero.
    net = ShapesVGG(widths=(4, 8, 8))
    return randomize_parameters_(net, seed=3).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fast_methods():
    return [
        "guided_backprop",
        get_method("integrated_gradients", n_steps=4),
        get_method("smoothgrad", nt_samples=2),
        "gradcam",
        "fullgrad",
        "fullgrad_bias",
    ]


@pytest.fixture(scope="module")
def grid(model, images, fast_methods):
    return comparison_grid(model, images, methods=fast_methods, categories=CATEGORIES, batch_size=2)


def texts(figure):
    """Every string drawn on the figure: titles, labels, suptitle, supxlabel."""
    found = [t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text"))]
    return [t for t in found if t]


# ---------------------------------------------------------------------------------------
# Table 5
# ---------------------------------------------------------------------------------------


def test_grid_layout_titles_and_row_labels(grid, model, images):
    assert isinstance(grid, Figure)
    image_axes = [ax for ax in grid.axes if ax.images]
    assert len(image_axes) == 3 * 7 + 0  # 3 rows x (image + 6 methods); the colour bar has no image
    titles = [ax.get_title() for ax in grid.axes if ax.get_title()]
    for label in [
        "Image",
        "Guided\nbackprop",
        "Integrated\ngradients",
        "SmoothGrad",
        "Grad-CAM",
        "FullGrad",
        "Bias-Jacobian",
    ]:
        assert any(t.startswith(label) for t in titles), label
    with torch.no_grad():
        probabilities = model(images).softmax(1)
    labels = [ax.get_ylabel() for ax in grid.axes if ax.get_ylabel()]
    for row, label in enumerate(labels[:3]):
        k = int(probabilities[row].argmax())
        assert label == f"{CATEGORIES[k]}  p={float(probabilities[row, k]):#.3g}"


def test_grid_maps_are_normalised_with_one_colour_map(grid):
    maps = [im for ax in grid.axes for im in ax.get_images() if im.get_cmap().name == "inferno"]
    assert len(maps) == 3 * 6
    for im in maps:
        assert im.get_clim() == (0.0, 1.0)
        data = np.asarray(im.get_array())
        assert data.min() >= 0.0 and data.max() <= 1.0
        assert im.get_extent() == [0, 32, 32, 0]  # aligned with the image panel


def test_grid_targets_display_images_row_labels_and_precomputed(model, images):
    methods = ["fullgrad", "gradcam"]
    result = attribution_maps(model, images, 2, methods)
    assert list(result.maps) == methods and result.targets.tolist() == [2, 2, 2]
    assert set(result.seconds) == set(methods) and all(s >= 0 for s in result.seconds.values())
    display = (images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)  # (N, H, W, 3) uint8
    figure = comparison_grid(
        model,
        images,
        2,
        methods,
        CATEGORIES,
        display,
        precomputed=result,
        row_labels=["a.png", "b.png", "c.png"],
    )
    labels = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    assert labels[0].startswith("a.png\n")
    predicted = result.predictions.tolist()
    for label, k in zip(labels, predicted):
        assert ("explains triangle" in label) == (k != 2)
    first = figure.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(np.asarray(first), display[0] / 255.0, atol=1e-6)


def test_grid_rejects_bad_arguments(model, images):
    with pytest.raises(ValueError, match="unknown method"):
        comparison_grid(model, images, methods=["fullgrad", "nope"])
    with pytest.raises(ValueError, match="targets"):
        comparison_grid(model, images, targets=[0, 1], methods=["gradcam"])
    with pytest.raises(ValueError, match="class indices"):
        comparison_grid(model, images, targets=7, methods=["gradcam"])
    with pytest.raises(ValueError, match="display images"):
        comparison_grid(model, images, methods=["gradcam"], display_images=np.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="repeated"):
        comparison_grid(model, images, methods=["gradcam", "gradcam"])


def test_normalize_maps():
    ramp = torch.arange(1000, dtype=torch.float32).reshape(1, 1, 10, 100)
    shown = normalize_maps(ramp)
    q = torch.quantile(ramp.flatten(), 0.99)
    torch.testing.assert_close(shown, (ramp / q).clamp(max=1.0))
    assert shown[0, 0, 0, 0] == 0  # zero stays zero
    assert (shown == 1).sum() == 10  # the top 1 % is clipped
    sparse = torch.zeros(1, 1, 10, 10)
    sparse[0, 0, 3, 4] = 5.0
    assert normalize_maps(sparse).max() == 1.0  # 99th percentile is 0: divide by the max
    assert normalize_maps(torch.zeros(2, 1, 4, 4)).eq(0).all()
    assert normalize_maps(ramp[0, 0], percentile=100).max() == 1.0
    with pytest.raises(ValueError):
        normalize_maps(ramp, percentile=0)


def test_no_pyplot_figures_are_left_behind(model, images):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    comparison_grid(model, images[:1], methods=["gradcam"])
    decomposition_figure(model, images[0])
    assert plt.get_fignums() == before


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def test_save_png_and_pdf(grid, tmp_path):
    png = save_figure(grid, tmp_path / "sub" / "grid.png", dpi=50)
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(png)
    width, height = grid.get_size_inches() * 50
    assert pixels.shape[0] == pytest.approx(height, abs=2) and pixels.shape[1] == pytest.approx(
        width, abs=2
    )
    assert pixels.shape[2] in (3, 4)
    pdf = save_figure(grid, tmp_path / "grid.PDF")
    content = pdf.read_bytes()
    assert content.startswith(b"%PDF-") and content.rstrip().endswith(b"%%EOF")
    assert sorted(os.listdir(tmp_path)) == ["grid.PDF", "sub"]  # no temporary files left
    assert os.listdir(tmp_path / "sub") == ["grid.png"]


def test_save_is_atomic(grid, tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    target.write_bytes(b"previous")

    def broken(handle, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(grid, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(grid, target)
    assert target.read_bytes() == b"previous"
    with pytest.raises(RuntimeError):
        save_figure(grid, tmp_path / "new.pdf")
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]


def test_save_rejects_unknown_extension(grid, tmp_path):
    with pytest.raises(ValueError, match=r"\.png, \.pdf"):
        save_figure(grid, tmp_path / "grid.jpg")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------
# Figure 1
# ---------------------------------------------------------------------------------------


def test_decomposition_summary_adds_up(model, images):
    summary = decomposition_summary(model, images[0], target=1)
    with torch.no_grad():
        output = float(model(images[:1])[0, 1])
    assert summary.output == pytest.approx(output, rel=1e-5)
    assert summary.total == pytest.approx(output, rel=1e-5, abs=1e-6)
    assert abs(summary.completeness_gap) < 1e-5 * max(1.0, abs(output))
    assert list(summary.block_terms) == ["features.0", "features.4", "features.8"]
    assert summary.non_spatial_sources == ["classifier"] and summary.non_spatial != 0
    assert [tuple(m.shape) for m in summary.block_maps.values()] == [(32, 32), (16, 16), (8, 8)]
    assert summary.input_map.shape == (32, 32)
    assert summary.input_map.sum().item() == pytest.approx(summary.input_term, rel=1e-6, abs=1e-9)


def test_completeness_gap_has_captums_sign():
    """The summary's gap and the figure's footer read claimed - f(x), FullGradient's delta:
    through an unseen square the terms claim 2 f(x), so the gap is +f(x), not -f(x)."""
    net = UnseenSquareNet().double().eval()
    image = torch.rand(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    summary = decomposition_summary(net, image, target=0)
    assert summary.output > 0
    assert summary.completeness_gap == pytest.approx(summary.output, rel=1e-9)
    _, delta = FullGradient(net).attribute(image[None], target=0, return_convergence_delta=True)
    assert summary.completeness_gap == pytest.approx(float(delta[0]), rel=1e-9)
    footer = next(t for t in texts(decomposition_figure(net, image, 0)) if "= f(x):" in t)
    shown = re.search(rf"completeness gap sum − f\(x\) = {NUMBER} ", footer)
    assert shown is not None, footer
    assert float(shown.group(1)) == pytest.approx(summary.output, rel=1e-2)


def test_decomposition_figure_numbers_add_up_to_f_x(model, images, tmp_path):
    target = 2
    figure = decomposition_figure(model, images[1], target, categories=CATEGORIES)
    with torch.no_grad():
        output = float(model(images[1:2])[0, target])
    strings = texts(figure)
    shares = [float(m) for t in strings for m in re.findall(r"Σ = " + NUMBER, t)]
    assert len(shares) == 1 + 3  # the input term and three blocks
    footer = next(t for t in strings if "= f(x):" in t)
    a, b, c, total = map(
        float,
        re.search(rf"= f\(x\):\s+{NUMBER} \+ {NUMBER} \+ {NUMBER} = {NUMBER}", footer).groups(),
    )
    stated = float(re.search(rf"\nf\(x\) = {NUMBER};", footer).group(1))
    scale = sum(abs(v) for v in shares) + abs(c)
    assert a == pytest.approx(shares[0], rel=1e-4)
    assert b == pytest.approx(sum(shares[1:]), rel=1e-4, abs=1e-4 * scale)
    assert shares[0] + sum(shares[1:]) + c == pytest.approx(output, rel=1e-4, abs=1e-4 * scale)
    assert total == pytest.approx(output, rel=1e-4) and stated == pytest.approx(output, rel=1e-4)
    assert any("triangle" in t for t in strings)
    # Signed panels: a diverging colour map centred at zero.
    for im in (
        im for ax in figure.axes for im in ax.get_images() if im.get_cmap().name == "RdBu_r"
    ):
        low, high = im.get_clim()
        assert low == -high
    png = save_figure(figure, tmp_path / "decomposition.png", dpi=40)
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert matplotlib.image.imread(png).ndim == 3


def test_decomposition_figure_shows_every_block(images):
    deep = randomize_parameters_(ShapesVGG(widths=(4, 4, 8, 8), convs_per_block=3), seed=5).eval()
    figure = decomposition_figure(deep, images[0])
    shares = [t for t in texts(figure) if "Σ = " in t]
    assert len(shares) == 1 + 12  # every one of the 12 conv-BN blocks, plus the input term
    assert figure.get_size_inches()[0] <= 2.0 * 5  # at most 5 panels a row (here 4 rows of 4)


def test_decomposition_figure_rejects_batches(model, images):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        decomposition_figure(model, images)
    with pytest.raises(ValueError, match="target"):
        decomposition_summary(model, images[0], target=9)


# ---------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------


def test_overlay_blends_a_normalised_map_over_the_image():
    image = np.array([[0.0, 0.2], [0.6, 1.0]], dtype=np.float32)  # grey (H, W)
    saliency = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    # With the grey colour map, cmap(v) = (v, v, v): out = (1 - alpha) * image + alpha * m / max.
    shown = overlay(image, saliency, alpha=0.25, cmap="gray", percentile=100)
    assert shown.shape == (2, 2, 3) and shown.dtype == np.float32
    expected = 0.75 * image + 0.25 * np.array([[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(shown, np.repeat(expected[..., None], 3, -1), atol=2e-3)
    # alpha = 0 is the image, alpha = 1 the coloured map; uint8 and (3, H, W) images read alike.
    rgb = torch.from_numpy(np.repeat(image[None], 3, 0))
    np.testing.assert_allclose(overlay(rgb, saliency, alpha=0.0), np.stack([image] * 3, -1))
    as_uint8 = (np.stack([image] * 3, -1) * 255).astype(np.uint8)
    np.testing.assert_allclose(
        overlay(as_uint8, saliency, alpha=0.0), np.stack([image] * 3, -1), atol=1e-6
    )
    np.testing.assert_allclose(
        overlay(image, saliency, alpha=1.0, cmap="gray", percentile=100)[..., 0],
        [[0.0, 0.25], [0.5, 1.0]],
        atol=2e-3,
    )


def test_overlay_of_a_signed_map_centres_zero_on_the_diverging_map():
    image = np.zeros((2, 2), dtype=np.float32)
    saliency = torch.tensor([[-2.0, 0.0], [1.0, 2.0]])
    shown = overlay(image, saliency, alpha=1.0, cmap="gray", percentile=100)  # signed: auto
    np.testing.assert_allclose(shown[..., 0], [[0.0, 0.5], [0.75, 1.0]], atol=3e-3)
    default = overlay(image, saliency, alpha=1.0)  # RdBu_r: blue, white, ..., red
    assert default[0, 0, 2] > default[0, 0, 0] and default[1, 1, 0] > default[1, 1, 2]
    np.testing.assert_allclose(default[0, 1], [0.97, 0.97, 0.97], atol=0.03)  # zero is white
    with pytest.raises(ValueError, match="negative"):
        overlay(image, saliency, signed=False)
    torch.testing.assert_close(
        normalize_signed_map(saliency), torch.tensor([[-1.0, 0.0], [0.5, 1.0]], dtype=torch.double)
    )


def test_overlay_resizes_a_coarse_map_and_rejects_bad_arguments():
    image = np.zeros((8, 8, 3), dtype=np.float32)
    coarse = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # (1, 1, 2, 2) at a block's resolution
    shown = overlay(image, coarse, alpha=1.0, cmap="gray", percentile=100)
    assert shown.shape == (8, 8, 3)
    assert shown[0, 0, 0] > 0.9 and shown[7, 7, 0] < 0.05  # top-left stays bright
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, coarse, alpha=1.5)
    with pytest.raises(ValueError, match="percentile"):
        overlay(image, coarse, percentile=0)
    with pytest.raises(ValueError, match="one map"):
        overlay(image, torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        overlay(image, torch.full((8, 8), float("nan")))


def test_probabilities_have_three_significant_figures():
    assert format_probability(0.5) == "0.500"
    assert format_probability(0.0012345) == "0.00123"
    assert format_probability(0.99996) == "1.00"
    assert format_probability(1.2345e-5) == "1.23e-05"
    assert format_probability(0.0) == "0"


# ---------------------------------------------------------------------------------------
# Print-ready layout: nothing clipped, labels >= 7 pt at a page width
# ---------------------------------------------------------------------------------------


def fake_maps(rows, columns, zero=()):
    """Precomputed maps for a grid of any size, without running a model."""
    generator = torch.Generator().manual_seed(rows * 100 + columns)
    maps = OrderedDict()
    for column in range(columns):
        values = torch.rand(rows, 1, 24, 24, generator=generator)
        if column in zero:
            values.zero_()
        maps[f"method_{column}"] = values
    logits = torch.randn(rows, 5, generator=generator) * 4
    return AttributionMaps(
        maps=maps,
        labels={name: f"Method number {i} with a long label" for i, name in enumerate(maps)},
        seconds={name: 0.0 for name in maps},
        targets=torch.arange(rows) % 5,
        predictions=logits.argmax(1),
        probabilities=logits.softmax(1),
    )


def check_print_ready(figure):
    """Every text inside the figure and >= 7 pt once the figure is scaled to 7 in wide."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied"
        figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    width = figure.get_size_inches()[0]
    bounds = figure.bbox
    inside = bounds.padded(1)
    # What is drawn: each axes' tight box (its titles, labels and drawn tick labels; ticks
    # beyond the view limits exist but are not drawn) and the figure's own texts.
    boxes = [ax.get_tightbbox(renderer) for ax in figure.axes]
    boxes += [t.get_window_extent(renderer) for t in figure.texts if t.get_text().strip()]
    for box in boxes:
        assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1), box
    checked = 0
    for text in figure.findobj(matplotlib.text.Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        size = text.get_fontsize()
        assert size >= MIN_FONT_PT and size * PRINT_WIDTH_IN / width >= MIN_FONT_PT - 1e-9
        checked += 1
    for ax in figure.axes:  # the layout did not collapse any panel
        assert ax.get_position().width > 0 and ax.get_position().height > 0
    return checked


@pytest.mark.parametrize("rows, columns", [(1, 1), (1, 10), (8, 1), (8, 10), (3, 6), (2, 4)])
def test_grids_of_every_size_are_print_ready(rows, columns):
    images = torch.rand(rows, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    result = fake_maps(rows, columns)
    figure = comparison_grid(
        None,
        images,
        precomputed=result,
        categories=["a class with a rather long name"] * 5,
        row_labels=[f"photo_{i}_with_a_long_file_name.png" for i in range(rows)],
        title="A title long enough to need more than one line at a page width, for sure",
    )
    assert figure.get_size_inches()[0] <= PRINT_WIDTH_IN + 1e-9
    assert check_print_ready(figure) >= rows + columns + 2
    if (rows, columns) == (1, 1):  # the colour bar's label, whole
        labels = [t.get_text() for t in figure.findobj(matplotlib.text.Text)]
        assert any("clipped" in t for t in labels)


def test_a_wider_grid_scales_its_fonts():
    result = fake_maps(2, 3)
    images = torch.rand(2, 3, 24, 24)
    figure = comparison_grid(None, images, precomputed=result, cell_size=4.0, overlay_maps=True)
    assert figure.get_size_inches()[0] > PRINT_WIDTH_IN
    check_print_ready(figure)


def test_all_zero_maps_are_marked():
    result = fake_maps(2, 3, zero=(1,))
    figure = comparison_grid(None, torch.rand(2, 3, 24, 24), precomputed=result)
    marked = [ax for ax in figure.axes if any(t.get_text() == "all zero" for t in ax.texts)]
    assert len(marked) == 2  # both rows of method_1, no other panel
    assert all(np.asarray(ax.get_images()[0].get_array()).max() == 0 for ax in marked)


def test_grid_overlays_blend_each_map_over_its_image():
    result = fake_maps(1, 2)
    display = np.full((1, 24, 24, 3), 0.5, dtype=np.float32)
    figure = comparison_grid(
        None,
        torch.rand(1, 3, 24, 24),
        precomputed=result,
        display_images=display,
        overlay_maps=True,
        alpha=0.3,
    )
    panels = [ax for ax in figure.axes if ax.get_images()][1:]
    assert len(panels) == 2
    for ax, name in zip(panels, result.maps):
        shown = np.asarray(ax.get_images()[0].get_array())
        np.testing.assert_allclose(
            shown, overlay(display[0], result.maps[name][0], alpha=0.3), atol=1e-6
        )
    assert any("alpha = 0.3" in t for t in texts(figure))


def test_decomposition_panels_have_colour_bars_and_are_print_ready(images):
    deep = randomize_parameters_(ShapesVGG(widths=(4, 4, 8, 8), convs_per_block=3), seed=5).eval()
    figure = decomposition_figure(deep, images[0], overlay_maps=True, percentile=99)
    bars = [ax for ax in figure.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(bars) == 1 + 12  # the input term and the 12 blocks
    for ax in bars:
        low, high = ax._colorbar.mappable.get_clim()
        assert low == -high and high > 0
    check_print_ready(figure)
    assert figure.get_size_inches()[0] <= PRINT_WIDTH_IN + 1e-9
