import numpy as np
import pytest
import torch
from torch import nn

from captum_fullgrad.evaluation import noisy_linear_imputation, road

# Offsets and weights of the 8-neighbourhood (Rong et al. 2022), written out again
# here so that the reference solver below is independent of the implementation.
WEIGHTS = {(dy, dx): (1 / 6 if dy == 0 or dx == 0 else 1 / 12)
           for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)}  # fmt: skip


def reference_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    r"""Direct sparse solve of the imputation system with SciPy: for each removed pixel,
    (sum of in-image neighbour weights) * x_p - sum_{removed q} w x_q = sum_{known q} w img_q."""
    sparse = pytest.importorskip("scipy.sparse")
    linalg = pytest.importorskip("scipy.sparse.linalg")
    c, h, w = image.shape
    unknown = np.argwhere(removed)
    index = -np.ones((h, w), dtype=int)
    index[removed] = np.arange(len(unknown))
    a = sparse.lil_matrix((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    for i, (y, x) in enumerate(unknown):
        for (dy, dx), weight in WEIGHTS.items():
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w):
                continue
            a[i, i] += weight
            if removed[yy, xx]:
                a[i, index[yy, xx]] -= weight
            else:
                b[i] += weight * image[:, yy, xx]
    solution = linalg.spsolve(a.tocsc(), b).reshape(len(unknown), c)
    out = image.copy()
    out[:, removed] = solution.T
    return out


def test_linear_ramp_is_reproduced_exactly_in_the_interior():
    h, w = 12, 10
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    ramp = torch.stack([0.3 * yy - 0.7 * xx + 2.0, yy + xx])[None]  # (1, 2, H, W)
    removed = torch.zeros(1, h, w, dtype=torch.bool)
    removed[0, 5, 4] = True  # a single interior pixel: x = weighted mean of 8 neighbours
    out = noisy_linear_imputation(ramp, removed, noise_std=0.0, tol=1e-12)
    torch.testing.assert_close(out, ramp, rtol=0, atol=1e-12)
    removed[0, 2:9, 3:8] = True  # a whole interior block, solved jointly
    out = noisy_linear_imputation(ramp, removed, noise_std=0.0, tol=1e-12)
    torch.testing.assert_close(out, ramp, rtol=0, atol=1e-10)


def test_solution_matches_direct_sparse_solve_including_borders():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 9, 11, generator=g, dtype=torch.float64)
    removed = torch.rand(3, 9, 11, generator=g) < torch.tensor([0.2, 0.6, 0.95]).view(3, 1, 1)
    removed[:, 0, 0] = True  # a corner, whose neighbour weights sum to 1/6 + 1/6 + 1/12
    removed[0, 0, 1] = False  # keep at least one pixel in each image
    removed[1:, 4, 5] = False
    out = noisy_linear_imputation(images, removed, noise_std=0.0, tol=1e-12)
    for i in range(3):
        expected = reference_imputation(images[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=0, atol=1e-9)


def test_float32_solution_is_close_to_float64_and_keeps_dtype():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    removed = torch.zeros(2, 32, 32, dtype=torch.bool)
    removed[:, 2:30, 1:31] = True  # a large connected hole: the slowest case
    exact = noisy_linear_imputation(images, removed, noise_std=0.0, tol=1e-12)
    single = noisy_linear_imputation(images.float(), removed, noise_std=0.0)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=0, atol=1e-3)


def test_noise_only_on_removed_pixels_with_requested_std_and_seed():
    images = torch.full((4, 3, 32, 32), 0.5)
    removed = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(2)) < 0.5
    out = noisy_linear_imputation(images, removed, noise_std=0.05, seed=3)
    assert torch.equal(
        out[~removed[:, None].expand_as(out)], images[~removed[:, None].expand_as(out)]
    )
    deviation = (out - 0.5)[removed[:, None].expand_as(out)]
    assert deviation.std().item() == pytest.approx(0.05, rel=0.05)
    assert abs(deviation.mean().item()) < 0.005
    assert torch.equal(out, noisy_linear_imputation(images, removed, noise_std=0.05, seed=3))
    assert not torch.equal(out, noisy_linear_imputation(images, removed, noise_std=0.05, seed=4))


def test_imputation_argument_validation():
    with pytest.raises(ValueError, match="every pixel"):
        noisy_linear_imputation(torch.rand(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        noisy_linear_imputation(torch.rand(1, 1, 4, 4), torch.ones(1, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise_std"):
        noisy_linear_imputation(torch.rand(1, 1, 4, 4), torch.zeros(1, 4, 4), noise_std=-1.0)


def test_non_convergence_warns():
    removed = torch.ones(1, 16, 16, dtype=torch.bool)
    removed[0, 0, 0] = False
    with pytest.warns(RuntimeWarning, match="did not reach"):
        noisy_linear_imputation(torch.rand(1, 1, 16, 16), removed, max_iter=2)


# ----------------------------------------------------------------------------- ROAD curves
class EvidenceModel(nn.Module):
    r"""Two classes; logit_1 - logit_0 = (sum of pixels - 8) / 2: the evidence for
    class 1 is the bright object, so the exact contribution of a pixel is its value."""

    def forward(self, x):
        s = (x.flatten(1).sum(dim=1) - 8.0) / 2.0
        return torch.stack([-s / 2, s / 2], dim=1)


def object_images(batch=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = 0.05 * torch.randn(batch, 1, size, size, generator=g)
    for i in range(batch):
        top, left = torch.randint(1, size - 5, (2,), generator=g).tolist()
        images[i, 0, top : top + 4, left : left + 4] += 1.0
    return images


def test_morf_and_lerf_bracket_perfect_and_random_maps():
    model, images = EvidenceModel().eval(), object_images()
    target = torch.ones(16, dtype=torch.long)
    perfect = images[:, 0]
    random_map = torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(5))
    kwargs = dict(percentages=[5, 10, 20, 40], seed=0)
    morf_perfect = road(model, images, target, perfect, order="morf", **kwargs)
    morf_random = road(model, images, target, random_map, order="morf", **kwargs)
    lerf_perfect = road(model, images, target, perfect, order="lerf", **kwargs)
    lerf_random = road(model, images, target, random_map, order="lerf", **kwargs)
    # Removing the object first destroys the evidence; removing background keeps it.
    assert morf_perfect.probability_auc < 0.5 * morf_random.probability_auc
    assert lerf_perfect.probability_auc > morf_random.probability_auc
    assert lerf_perfect.accuracy_auc > morf_perfect.accuracy_auc
    assert morf_perfect.accuracy_curve[-1] == 0.0 and lerf_perfect.accuracy_curve[-1] == 1.0
    # Random removal order is the same for MoRF and LeRF (up to the random order).
    assert (
        abs(morf_random.probability_auc - lerf_random.probability_auc)
        < 0.2 * morf_random.probability_auc
    )


def test_road_result_layout_and_determinism():
    model, images = EvidenceModel().eval(), object_images(batch=4)
    maps = images[:, 0]
    result = road(model, images, 1, maps, percentages=[10, 50, 90], batch_size=3)
    assert result.correct.shape == result.probabilities.shape == (4, 3)
    assert result.correct.dtype == torch.bool
    assert result.n_removed.tolist() == [26, 128, 230]
    assert result.order == "morf"
    assert result.accuracy_auc == pytest.approx(float(result.accuracy_auc_per_example.mean()))
    torch.testing.assert_close(result.probability_curve, result.probabilities.mean(dim=0))
    expected_auc = (
        40
        * (
            result.probability_curve[0]
            + 2 * result.probability_curve[1]
            + result.probability_curve[2]
        )
        / 2
    )
    assert result.probability_auc == pytest.approx(float(expected_auc), rel=1e-5)
    again = road(model, images, 1, maps, percentages=[10, 50, 90])
    assert torch.equal(again.probabilities, result.probabilities)
    assert (
        road(model, images, 1, maps, percentages=[10, 50, 90], seed=1)
        .probabilities.ne(result.probabilities)
        .any()
    )


def test_road_argument_validation():
    model, images = EvidenceModel().eval(), object_images(batch=1)
    with pytest.raises(ValueError, match="percentages"):
        road(model, images, 1, images[:, 0], percentages=[50, 100])
    with pytest.raises(ValueError, match="order"):
        road(model, images, 1, images[:, 0], order="least")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_imputation_matches_cpu():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 64, 64, generator=g)
    removed = torch.rand(4, 64, 64, generator=g) < 0.9
    cpu = noisy_linear_imputation(images, removed, seed=0)
    gpu = noisy_linear_imputation(images.cuda(), removed.cuda(), seed=0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    model = EvidenceModel().eval()
    maps = images[:, :1].abs()
    r_cpu = road(model, images, 1, maps)
    r_gpu = road(model, images.cuda(), 1, maps.cuda())
    torch.testing.assert_close(r_gpu.probabilities.cpu(), r_cpu.probabilities, rtol=1e-3, atol=1e-4)
