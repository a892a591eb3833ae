"""Tests of model loading: the bundled shapes network, torchvision weights, files and errors.

No test touches the network or the user's torch hub cache: every test runs with
``CAPTUM_FULLGRAD_OFFLINE=1`` and ``TORCH_HOME`` pointing to a temporary directory, and the
torchvision checkpoints it needs are written there by the test itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models import ResNet18_Weights, VGG16_BN_Weights

from captum_fullgrad.datasets import SHAPE_CLASSES, synthetic_shapes
from captum_fullgrad.models import (
    OFFLINE_ENV_VAR,
    LoadedModel,
    ShapesVGG,
    StateDictMismatchError,
    ToFloatImage,
    WeightsUnavailableError,
    list_models,
    load_model,
    shapes_vgg,
    weights_cache_path,
)
from captum_fullgrad.testing import randomize_parameters_

HELDOUT_SEED = 20_000  # Neither the training seed (0) nor the training script's held-out seed.


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private torch hub, and no download may even be attempted."""
    monkeypatch.setenv(OFFLINE_ENV_VAR, "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def assert_eval_mode(model: nn.Module) -> None:
    assert not any(module.training for module in model.modules())


def random_resnet18(seed: int = 1) -> dict[str, torch.Tensor]:
    # randomize_parameters_ makes every bias and BatchNorm statistic non-zero, so a loader
    # that silently skipped them (or kept torchvision's zero init) would be caught.
    model = randomize_parameters_(torchvision.models.resnet18(weights=None), seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# The bundled shapes network
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes() -> LoadedModel:
    return load_model("shapes")


def test_shapes_model_heldout_accuracy(shapes: LoadedModel) -> None:
    images, labels, _ = synthetic_shapes(300, seed=HELDOUT_SEED)
    with torch.no_grad():
        predictions = shapes.model(shapes.transform(images)).argmax(dim=1)
    accuracy = (predictions == labels).float().mean().item()
    assert accuracy >= 0.95, accuracy


def test_shapes_model_metadata(shapes: LoadedModel) -> None:
    assert isinstance(shapes.model, ShapesVGG)
    assert_eval_mode(shapes.model)
    assert shapes.categories == list(SHAPE_CLASSES)
    assert shapes.name == "shapes"
    assert shapes.input_size == (64, 64)
    assert shapes.weights == "DEFAULT"
    assert shapes.model.classifier.out_features == len(SHAPE_CLASSES)


def test_shapes_model_has_explicit_biases(shapes: LoadedModel) -> None:
    convs = [m for m in shapes.model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in shapes.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) >= 4 and len(norms) == len(convs)
    # Trained biases are non-zero: full-gradient tests on this model test something.
    assert all(conv.bias is not None and conv.bias.abs().max() > 0 for conv in convs)
    assert all(norm.bias.abs().max() > 0 and norm.running_mean.abs().max() > 0 for norm in norms)
    assert isinstance(shapes.model.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(shapes.model.classifier, nn.Linear)


def test_bundled_weights_file_is_small_plain_state_dict() -> None:
    path = Path(__file__).resolve().parents[1] / "captum_fullgrad" / "weights" / "shapes_vgg.pt"
    assert path.stat().st_size < 2 * 1024**2
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert state.keys() == ShapesVGG().state_dict().keys()


def test_shapes_vgg_constructor() -> None:
    pretrained, random = shapes_vgg(), shapes_vgg(pretrained=False)
    assert_eval_mode(pretrained)
    assert_eval_mode(random)
    assert not torch.equal(pretrained.classifier.weight, random.classifier.weight)
    assert_same_state(pretrained, load_model("shapes").model.state_dict())


def test_shapes_without_weights_is_random() -> None:
    loaded = load_model("shapes", weights=None)
    assert loaded.weights is None and loaded.categories == list(SHAPE_CLASSES)
    assert_eval_mode(loaded.model)


def test_to_float_image() -> None:
    transform = ToFloatImage()
    as_uint8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.allclose(transform(as_uint8), as_uint8.float() / 255)
    as_float = torch.rand(3, 8, 8, dtype=torch.float64)
    assert transform(as_float).dtype == torch.float32
    assert torch.allclose(transform(as_float), as_float.float())
    pil = Image.fromarray(as_uint8[0].permute(1, 2, 0).numpy())
    assert torch.allclose(transform(pil), as_uint8[0].float() / 255)
    with pytest.raises(TypeError):
        transform(torch.zeros(3, 8, 8, dtype=torch.int32))


# --------------------------------------------------------------------------------------
# torchvision weights from the hub cache
# --------------------------------------------------------------------------------------


def test_cache_path_is_torchvision_file_name_in_hub_checkpoints(offline_hub: Path) -> None:
    path = weights_cache_path(VGG16_BN_Weights.IMAGENET1K_V1)
    assert path == offline_hub / "vgg16_bn-6c64b313.pth"
    assert path.name == Path(VGG16_BN_Weights.IMAGENET1K_V1.url).name
    assert path.parent == Path(torch.hub.get_dir()) / "checkpoints"


@pytest.mark.parametrize(
    "weights",
    [
        "DEFAULT",
        "IMAGENET1K_V1",
        "imagenet1k_v1",
        "ResNet18_Weights.IMAGENET1K_V1",
        ResNet18_Weights.DEFAULT,
    ],
)
def test_torchvision_weights_from_the_hub_cache(offline_hub: Path, weights: object) -> None:
    expected = random_resnet18()
    offline_hub.mkdir(parents=True)
    torch.save(expected, offline_hub / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)

    loaded = load_model("resnet18", weights=weights)

    assert_same_state(loaded.model, expected)
    assert_eval_mode(loaded.model)
    assert loaded.categories == ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(loaded.categories) == 1000
    assert loaded.name == "resnet18" and loaded.input_size == (224, 224)
    assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
    # The transform is torchvision's own preprocessing for these weights.
    assert repr(loaded.transform) == repr(ResNet18_Weights.IMAGENET1K_V1.transforms())
    batch = loaded.transform(torch.randint(0, 256, (2, 3, 300, 260), dtype=torch.uint8))
    assert batch.shape == (2, 3, 224, 224)


def test_offline_error_names_file_directory_and_url(offline_hub: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("vgg16_bn")
    message = str(info.value)
    assert "vgg16_bn-6c64b313.pth" in message
    assert str(offline_hub) in message
    assert VGG16_BN_Weights.IMAGENET1K_V1.url in message
    assert OFFLINE_ENV_VAR in message
    assert info.value.file_name == "vgg16_bn-6c64b313.pth"
    assert info.value.directory == str(offline_hub)
    assert isinstance(info.value, FileNotFoundError)


def test_mismatching_cached_checkpoint(offline_hub: Path) -> None:
    offline_hub.mkdir(parents=True)
    torch.save(ShapesVGG().state_dict(), weights_cache_path(ResNet18_Weights.IMAGENET1K_V1))
    with pytest.raises(StateDictMismatchError, match="resnet18") as info:
        load_model("resnet18")
    assert "conv1.weight" in info.value.missing_keys
    assert "classifier.weight" in info.value.unexpected_keys


def test_truncated_cached_checkpoint(offline_hub: Path) -> None:
    offline_hub.mkdir(parents=True)
    path = weights_cache_path(ResNet18_Weights.IMAGENET1K_V1)
    torch.save(random_resnet18(), path)
    path.write_bytes(path.read_bytes()[:1000])  # An interrupted download.
    with pytest.raises(ValueError, match="corrupt"):
        load_model("resnet18")


# --------------------------------------------------------------------------------------
# Local files and random initialisation
# --------------------------------------------------------------------------------------


def test_local_state_dict_file(tmp_path: Path) -> None:
    expected = random_resnet18(seed=2)
    path = tmp_path / "finetuned.pth"
    torch.save(expected, path)
    for weights in (str(path), path):
        loaded = load_model("resnet18", weights=weights)
        assert_same_state(loaded.model, expected)
        assert_eval_mode(loaded.model)
        assert loaded.weights == str(path)
        assert loaded.categories == ResNet18_Weights.DEFAULT.meta["categories"]


def test_local_file_wrapped_or_from_data_parallel(tmp_path: Path) -> None:
    model = randomize_parameters_(ShapesVGG(), seed=3)
    expected = model.state_dict()
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": expected, "epoch": 3}, wrapped)
    assert_same_state(load_model("shapes", weights=wrapped).model, expected)
    parallel = tmp_path / "parallel.pt"
    torch.save(nn.DataParallel(model).state_dict(), parallel)
    assert_same_state(load_model("shapes", weights=parallel).model, expected)


def test_local_file_with_other_number_of_classes(tmp_path: Path) -> None:
    path = tmp_path / "ten.pt"
    torch.save(ShapesVGG(num_classes=10).state_dict(), path)
    loaded = load_model("shapes", weights=path, num_classes=10)
    assert loaded.categories == [str(i) for i in range(10)]
    # Without the matching num_classes the head does not fit, and the error says where.
    with pytest.raises(StateDictMismatchError, match="classifier.weight") as info:
        load_model("shapes", weights=path)
    assert info.value.shape_mismatches[0][0] == "classifier.weight"


def test_mismatching_local_file_names_model_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "shapes.pt"
    torch.save(ShapesVGG().state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_model("resnet18", weights=path)
    message = str(info.value)
    assert "resnet18" in message and str(path) in message
    assert "conv1.weight" in message and "features.0.weight" in message
    assert "more" in message  # Long key lists are cut, not dumped whole.


def test_file_with_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": ShapesVGG().state_dict(), "extra": Path("x")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_model("shapes", weights=path)


def test_random_torchvision_model() -> None:
    loaded = load_model("resnet18", weights=None, num_classes=7)
    assert loaded.weights is None
    assert loaded.categories == [str(i) for i in range(7)]
    assert loaded.model.fc.out_features == 7
    assert_eval_mode(loaded.model)
    default = load_model("resnet18", weights=None)
    assert default.categories == ResNet18_Weights.DEFAULT.meta["categories"]


def test_device_argument() -> None:
    loaded = load_model("shapes", device="cpu")
    assert next(loaded.model.parameters()).device == torch.device("cpu")


# --------------------------------------------------------------------------------------
# Names and argument errors
# --------------------------------------------------------------------------------------


def test_list_models() -> None:
    names = list_models()
    assert names[0] == "shapes"
    required = [
        "vgg16_bn", "vgg11_bn", "resnet18", "resnet50", "alexnet",
        "densenet121", "mobilenet_v2", "efficientnet_b0", "convnext_tiny",
    ]  # fmt: skip
    assert set(required) <= set(names)
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    assert len(names) == len(set(names))


def test_unknown_model_lists_close_names() -> None:
    with pytest.raises(ValueError, match="vgg16_bn"):
        load_model("vgg16bn")
    with pytest.raises(ValueError, match="resnet18"):
        load_model("resnet_18")


def test_model_name_is_case_insensitive() -> None:
    assert load_model("Shapes").name == "shapes"


def test_unknown_weights_name() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_model("resnet18", weights="IMAGENET9K")
    with pytest.raises(ValueError, match="belong"):
        load_model("resnet18", weights=VGG16_BN_Weights.DEFAULT)
    with pytest.raises(ValueError):
        load_model("shapes", weights=ResNet18_Weights.DEFAULT)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_model("shapes", weights=str(tmp_path / "nothing.pth"))


def test_bundled_weights_fix_the_architecture() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        load_model("shapes", num_classes=3)


# --------------------------------------------------------------------------------------
# timm models
# --------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private Hugging Face hub cache (where timm's pretrained weights live)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def completeness(model: nn.Module, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FullGradient's map and relative completeness gap on two random images, in float64."""
    from captum_fullgrad.full_gradient import FullGradient

    model = randomize_parameters_(model, seed=2).double()
    x = torch.rand(
        2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    attribution, delta = FullGradient(model).attribute(x, target=3, return_convergence_delta=True)
    with torch.no_grad():
        output = model(x)[:, 3]
    return attribution, delta.detach().abs() / output.abs()


@pytest.mark.parametrize(
    "name, kwargs, size",
    [("timm/resnet10t", {}, 64), ("timm/vit_tiny_patch16_224", {"img_size": 48}, 48)],
)
def test_random_timm_models_are_exact(name: str, kwargs: dict, size: int) -> None:
    loaded = load_model(name, weights=None, **kwargs)
    assert loaded.name == name and loaded.weights is None
    assert_eval_mode(loaded.model)
    assert len(loaded.categories) == 1000 and loaded.categories[0] == "tench"
    if kwargs:
        assert loaded.input_size == (size, size)
    attribution, relative_gap = completeness(loaded.model, size)
    assert torch.isfinite(attribution).all() and attribution.abs().sum() > 0
    assert float(relative_gap.max()) <= 1e-8


def test_timm_transform_is_timms_data_config() -> None:
    loaded = load_model("timm/resnet10t", weights=None)
    config = timm.data.resolve_model_data_config(loaded.model)
    assert loaded.input_size == tuple(config["input_size"][-2:])
    assert loaded.transform.mean == list(config["mean"])
    assert loaded.transform.resize_size == [int(config["input_size"][-1] / config["crop_pct"])]
    batch = loaded.transform(torch.randint(0, 256, (2, 3, 300, 260), dtype=torch.uint8))
    assert batch.shape == (2, 3, *loaded.input_size)
    picture = Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    assert loaded.transform(picture).shape == (3, *loaded.input_size)


def test_offline_timm_error_names_repository_file_and_cache(hf_cache: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("timm/resnet10t")
    message = str(info.value)
    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    assert repo in message and "model.safetensors" in message and str(hf_cache) in message
    assert "huggingface-cli download" in message and "--weights random" in message
    assert info.value.url == f"https://huggingface.co/{repo}/resolve/main/model.safetensors"


def test_timm_pretrained_weights_from_the_hub_cache(hf_cache: Path) -> None:
    from safetensors.torch import save_file

    reference = randomize_parameters_(timm.create_model("resnet10t"), seed=4)
    expected = {k: v.clone().contiguous() for k, v in reference.state_dict().items()}
    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    folder = hf_cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    save_file(expected, str(snapshot / "model.safetensors"))

    loaded = load_model("timm/resnet10t")

    assert_same_state(loaded.model, expected)
    assert loaded.weights == "timm/resnet10t (pretrained)"


def test_timm_state_dict_file_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = randomize_parameters_(timm.create_model("resnet10t", num_classes=7), seed=6)
    path = tmp_path / "fine_tuned.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_model("timm/resnet10t", weights=str(path), num_classes=7)
    assert_same_state(loaded.model, reference.state_dict())
    assert loaded.categories == [str(i) for i in range(7)] and loaded.weights == str(path)
    with pytest.raises(StateDictMismatchError, match="timm/resnet10t"):
        load_model("timm/resnet10t", weights=path)  # 1000 classes: the head does not fit
    with pytest.raises(ValueError, match="timm/resnet18"):
        load_model("timm/resnt18", weights=None)  # close names are suggested
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(ValueError, match=r"pip install 'captum-fullgrad\[timm\]'"):
        load_model("timm/resnet10t", weights=None)
