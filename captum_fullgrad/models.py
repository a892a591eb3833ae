"""Models to explain: torchvision classifiers and a small VGG trained on synthetic shapes.

:func:`load_model` is the single entry point used by the comparison toolkit. It returns a
:class:`LoadedModel`: the network in eval mode together with what is needed to feed it and
to read its output (the preprocessing transform, the class names and the input size).

Three families of models are available (see :func:`list_models`):

- ``"shapes"``: :class:`ShapesVGG`, a 4-block VGG-style network trained on
  :func:`captum_fullgrad.datasets.synthetic_shapes`, whose weights ship with the package.
  It works fully offline and its ground-truth evidence (the class object's mask) is known,
  which makes it the default subject of tests and benchmarks.
- every torchvision classifier (``"vgg16_bn"``, ``"resnet50"``, ``"convnext_tiny"``, ...),
  built with :func:`torchvision.models.get_model`. Pretrained weights come from the torch
  hub cache, ``<torch.hub.get_dir()>/checkpoints/<file name of the weights URL>``, and are
  downloaded there when missing and a network is reachable. Setting the environment
  variable ``CAPTUM_FULLGRAD_OFFLINE=1`` forbids any download attempt; a missing file then
  raises :class:`WeightsUnavailableError`, whose message says which file to put where.
- with timm installed (the ``timm`` extra), every timm model as ``"timm/<name>"``, with
  timm's preprocessing and pretrained weights from timm's cache (same offline story).

Example::

    >>> from captum_fullgrad.models import load_model
    >>> loaded = load_model("shapes")
    >>> loaded.categories
    ['disc', 'square', 'triangle', 'cross']
    >>> from captum_fullgrad.datasets import synthetic_shapes
    >>> images, labels, masks = synthetic_shapes(4, seed=0)  # (4, 3, 64, 64) in [0, 1]
    >>> loaded.model(loaded.transform(images)).shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from .datasets import SHAPE_CLASSES

__all__ = [
    "FACTORY_INPUT_SIZE",
    "OFFLINE_ENV_VAR",
    "SHAPES_MODEL_NAME",
    "TIMM_PREFIX",
    "LoadedModel",
    "ShapesVGG",
    "StateDictMismatchError",
    "ToFloatImage",
    "WeightsUnavailableError",
    "list_models",
    "load_model",
    "shapes_vgg",
    "weights_cache_path",
]

#: Environment variable that, set to ``1`` (or ``true``/``yes``), forbids downloads.
OFFLINE_ENV_VAR = "CAPTUM_FULLGRAD_OFFLINE"
#: Name of the bundled synthetic-shapes network in :func:`load_model`.
SHAPES_MODEL_NAME = "shapes"
#: Input size of a ``module:function`` model that returns a bare module.
FACTORY_INPUT_SIZE = (224, 224)
#: Prefix of timm models in :func:`load_model`: ``"timm/<timm model name>"``.
TIMM_PREFIX = "timm/"

WeightsSpec = Union[str, "os.PathLike[str]", WeightsEnum, None]
DeviceSpec = Union[str, torch.device, None]

_SHAPES_WEIGHTS_RESOURCE = ("weights", "shapes_vgg.pt")
_SHAPES_INPUT_SIZE = (64, 64)
# How many offending keys an error message lists before "... and N more".
_KEYS_SHOWN = 5


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are neither in the torch hub cache nor downloadable.

    Attributes:
        file_name: the checkpoint's file name, e.g. ``"vgg16_bn-6c64b313.pth"``.
        directory: the directory in which torchvision looks for it.
        url: where the file can be downloaded from.
    """

    def __init__(self, message: str, *, file_name: str, directory: str, url: str) -> None:
        super().__init__(message)
        self.file_name = file_name
        self.directory = directory
        self.url = url

    def __str__(self) -> str:
        # OSError's default __str__ prefixes "[Errno ...]" only with two arguments; keep the
        # message as written.
        return str(self.args[0])


class StateDictMismatchError(ValueError):
    """A state dict does not fit the architecture it is loaded into.

    Attributes:
        missing_keys: keys the model expects that the state dict lacks.
        unexpected_keys: keys of the state dict that the model does not have.
        shape_mismatches: ``(key, expected shape, found shape)`` for shared keys.
    """

    def __init__(
        self,
        message: str,
        *,
        missing_keys: Sequence[str] = (),
        unexpected_keys: Sequence[str] = (),
        shape_mismatches: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        super().__init__(message)
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        self.shape_mismatches = list(shape_mismatches)


@dataclass
class LoadedModel:
    """A network ready to explain, with what is needed to feed it and read its output.

    Attributes:
        model: the network, in eval mode, on the requested device.
        transform: maps a PIL image or a ``(..., 3, H, W)`` uint8 or float tensor to the
            network's input (resized, cropped and normalised as the weights require).
        categories: class names, indexed by output logit.
        name: the model's name as accepted by :func:`load_model`.
        input_size: ``(height, width)`` of the inputs that ``transform`` produces.
        weights: where the parameters came from (a weights enum name, a file path, or
            ``None`` for a random initialisation).
    """

    model: nn.Module
    transform: Callable[[Any], Tensor]
    categories: list[str]
    name: str
    input_size: tuple[int, int]
    weights: str | None = field(default=None)


class ToFloatImage:
    """Convert an image to a float32 tensor in ``[0, 1]``, without resizing or normalising.

    The preprocessing of :class:`ShapesVGG`, whose input is the raw ``[0, 1]`` image. PIL
    images become ``(3, H, W)`` RGB tensors; uint8 tensors are divided by 255; floating
    tensors are cast to float32 and otherwise left as they are (they are assumed to be in
    ``[0, 1]`` already). Batched tensors ``(..., 3, H, W)`` are accepted.
    """

    def __call__(self, image: Any) -> Tensor:
        """Convert ``image``.

        Args:
            image: a :class:`PIL.Image.Image`, or a uint8 or floating tensor of shape
                ``(..., 3, H, W)``.

        Returns:
            A float32 tensor in ``[0, 1]``.
        """
        from PIL import Image  # PIL comes with torchvision; imported here to keep import light.

        if isinstance(image, Image.Image):
            image = torchvision.transforms.functional.pil_to_tensor(image.convert("RGB"))
        if not isinstance(image, Tensor):
            raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")
        if image.dtype == torch.uint8:
            return image.to(torch.float32).div_(255.0)
        if image.is_floating_point():
            return image.to(torch.float32)
        raise TypeError(f"expected a uint8 or floating tensor, got dtype {image.dtype}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------
# The synthetic-shapes network
# --------------------------------------------------------------------------------------


class ShapesVGG(nn.Module):
    """A small VGG for 64 px synthetic shape scenes.

    ``features`` is a stack of blocks, each ``conv3x3 (with bias) -> BatchNorm -> ReLU``
    repeated ``convs_per_block`` times and followed by a 2x2 max-pool, then an adaptive
    average pool and a single linear layer. The layer names (``features``, ``avgpool``,
    ``classifier``) follow :class:`torchvision.models.VGG`, and the ReLUs are in-place
    like torchvision's, so that code written for torchvision's VGGs works here unchanged.

    The convolutions keep their biases although a BatchNorm follows: for full-gradient
    saliency every bias is a separate source of attribution, and this network should
    exercise both convolution and BatchNorm biases.

    The input is the image in ``[0, 1]`` itself. There is deliberately no input
    normalisation: the BatchNorm after the first convolution already centres and scales,
    and without a hidden constant shift every bias of the network is an explicit
    parameter or BatchNorm statistic.

    Args:
        num_classes: number of output logits.
        widths: output channels of each block; every block halves the resolution.
        convs_per_block: convolutions in each block.
    """

    def __init__(
        self,
        num_classes: int = len(SHAPE_CLASSES),
        widths: Sequence[int] = (16, 32, 64, 128),
        convs_per_block: int = 1,
    ) -> None:
        super().__init__()
        if not widths or convs_per_block < 1:
            raise ValueError("ShapesVGG needs at least one block with at least one convolution")
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            for _ in range(convs_per_block):
                layers += [
                    nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=True),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_channels = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        # Global average: the class object may lie anywhere, so every position counts the same.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as torchvision's VGG.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:  # every conv here has one; typed Optional
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of images ``x`` of shape ``(N, 3, H, W)`` in [0, 1]."""
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def shapes_vgg(pretrained: bool = True) -> ShapesVGG:
    """The synthetic-shapes network, in eval mode.

    Args:
        pretrained: load the bundled weights trained by ``benchmarks/train_shapes.py``
            (held-out accuracy >= 95 %); if ``False``, a random initialisation, whose
            saliency maps explain nothing.

    Returns:
        A :class:`ShapesVGG` in eval mode.
    """
    model = ShapesVGG()
    if pretrained:
        resource = importlib.resources.files("captum_fullgrad").joinpath(*_SHAPES_WEIGHTS_RESOURCE)
        # as_file gives a real path even when the package is imported from a zip.
        with importlib.resources.as_file(resource) as path:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"the bundled weights {path} are missing; reinstall captum-fullgrad or run "
                    "benchmarks/train_shapes.py to recreate them"
                )
            state_dict = _read_state_dict(path)
        _load_state_dict_strict(model, state_dict, SHAPES_MODEL_NAME, str(path))
    return model.eval()


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Names accepted by :func:`load_model`: ``"shapes"`` then torchvision's classifiers, sorted."""
    return [SHAPES_MODEL_NAME, *_torchvision_classifiers()]


def load_model(
    name: str,
    weights: WeightsSpec = "DEFAULT",
    device: DeviceSpec = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """Build a classifier, load its weights and return it in eval mode with its metadata.

    Args:
        name: a name from :func:`list_models` (case-insensitive): ``"shapes"`` or a
            torchvision classifier such as ``"vgg16_bn"`` or ``"resnet50"``; or, when timm
            is installed (``pip install 'captum-fullgrad[timm]'``), ``"timm/<name>"`` for
            any name of ``timm.list_models()``, optionally with a pretrained tag
            (``"timm/resnet50.a1_in1k"``). A timm model gets timm's evaluation preprocessing
            from its data config (resize to ``crop / crop_pct``, centre crop, normalise) and
            ImageNet class names where timm has them. Its ``"DEFAULT"`` weights are timm's
            pretrained ones, read from timm's usual cache (the Hugging Face hub cache, or
            the torch hub cache for weights published as a URL) and downloaded there
            unless ``CAPTUM_FULLGRAD_OFFLINE=1``; a file or ``None`` work as below.
            Or ``"package.module:function"``: your own model. The function (called with
            ``model_kwargs``) returns an :class:`~torch.nn.Module`, a :class:`LoadedModel`,
            or a tuple ``(model, transform, categories)``; a bare module is fed the image as
            ``[0, 1]`` floats (:class:`ToFloatImage`) at :data:`FACTORY_INPUT_SIZE`, with
            classes named ``"0", "1", ...``. ``weights="DEFAULT"`` keeps the parameters the
            function gave, a path loads a state dict over them (strictly); ``None`` is
            refused (the function decides the initialisation).
        weights: which parameters to load.

            - ``"DEFAULT"``: the model's default pretrained weights (for ``"shapes"``, the
              bundled weights).
            - the name of a member of the model's torchvision weights enum, such as
              ``"IMAGENET1K_V1"`` (optionally prefixed, ``"VGG16_BN_Weights.IMAGENET1K_V1"``),
              or the member itself (``VGG16_BN_Weights.IMAGENET1K_V1``). Loaded through
              torchvision's weights API from the torch hub cache,
              ``<torch.hub.get_dir()>/checkpoints/<file name of weights.url>`` (see
              :func:`weights_cache_path`), and downloaded there first when missing, unless
              ``CAPTUM_FULLGRAD_OFFLINE=1`` is set.
            - a path (``str`` or :class:`os.PathLike`; pass a :class:`pathlib.Path` if the
              file name could be mistaken for a weights name) to a state dict saved with
              :func:`torch.save`. It is read with ``weights_only=True`` and loaded with
              ``strict=True``. A checkpoint dict that wraps the state dict under
              ``"state_dict"`` or ``"model"``, and a ``"module."`` prefix left by
              :class:`~torch.nn.DataParallel`, are unwrapped.
            - ``None``: random initialisation. Useful for shape or completeness checks;
              saliency maps of a random network mean nothing about any data.
        device: where to put the model (``"cpu"``, ``"cuda"``, a :class:`torch.device`);
            ``None`` leaves it on the CPU.
        **model_kwargs: passed to the model's constructor (e.g. ``num_classes=10`` for a
            fine-tuned checkpoint file). Not allowed with the bundled ``"shapes"`` weights.

    Returns:
        A :class:`LoadedModel`. For torchvision models, ``transform`` is
        ``weights.transforms()`` and ``categories`` is ``weights.meta["categories"]`` (with a
        file or ``None``, those of the default weights, or ``["0", "1", ...]`` when
        ``num_classes`` differs from theirs).

    Raises:
        ValueError: unknown model name (the message lists close names) or weights name.
        WeightsUnavailableError: pretrained weights are not cached and cannot be downloaded;
            the message names the file, the directory to place it in and its URL.
        FileNotFoundError: ``weights`` is a path that does not exist.
        StateDictMismatchError: the state dict does not fit the architecture; the message
            names the model and the first mismatching keys.
    """
    if isinstance(name, str) and ":" in name:
        loaded = _load_factory(name.strip(), weights, model_kwargs)
        loaded.model.eval()
        if device is not None:
            loaded.model.to(device)
        return loaded
    if isinstance(name, str) and name.strip().lower().startswith(TIMM_PREFIX):
        loaded = _load_timm(name, weights, model_kwargs)
        loaded.model.eval()
        if device is not None:
            loaded.model.to(device)
        return loaded
    key = _resolve_name(name)
    if key == SHAPES_MODEL_NAME:
        loaded = _load_shapes(weights, model_kwargs)
    else:
        loaded = _load_torchvision(key, weights, model_kwargs)
    loaded.model.eval()
    if device is not None:
        loaded.model.to(device)
    return loaded


def weights_cache_path(weights: WeightsEnum) -> Path:
    """Where torchvision's weights API looks for ``weights``.

    This is ``<torch.hub.get_dir()>/checkpoints/<basename of weights.url>``, the location used
    by :func:`torch.hub.load_state_dict_from_url`. :func:`torch.hub.get_dir` honours
    ``$TORCH_HOME`` (default ``~/.cache/torch``), read at call time.

    Args:
        weights: a torchvision weights enum member, e.g. ``VGG16_BN_Weights.IMAGENET1K_V1``.

    Returns:
        The path of the cached checkpoint file (which may not exist).
    """
    file_name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def _torchvision_classifiers() -> list[str]:
    # ``module=torchvision.models`` keeps the ImageNet classifiers and leaves out detection,
    # segmentation, video, optical-flow and quantized models.
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _resolve_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    names = list_models()
    if key in names:
        return key
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}.{hint} list_models() gives all {len(names)} available names."
    )


# Weights specifications, once parsed.
_RANDOM = "random"
_PRETRAINED = "pretrained"
_FILE = "file"


def _parse_weights(
    weights: WeightsSpec, model_name: str, enum_cls: type[WeightsEnum] | None
) -> tuple[str, Any]:
    """Classify ``weights`` as ``(_RANDOM, None)``, ``(_PRETRAINED, member or "DEFAULT")`` or
    ``(_FILE, Path)``. ``enum_cls`` is the model's torchvision weights enum, ``None`` for
    the shapes network (whose only pretrained weights are ``"DEFAULT"``)."""
    if weights is None:
        return _RANDOM, None
    if isinstance(weights, WeightsEnum):
        if enum_cls is None or not isinstance(weights, enum_cls):
            expected = enum_cls.__name__ if enum_cls is not None else '"DEFAULT", a path or None'
            raise ValueError(
                f"weights {weights} do not belong to model {model_name!r}; expected {expected}"
            )
        return _PRETRAINED, weights
    if isinstance(weights, os.PathLike):
        return _FILE, _existing_file(Path(weights))
    if not isinstance(weights, str):
        raise TypeError(
            f"weights must be a str, a path, a WeightsEnum or None, got {type(weights).__name__}"
        )

    # A weights name, optionally prefixed by its enum class: "VGG16_BN_Weights.IMAGENET1K_V1".
    names = ["DEFAULT"] if enum_cls is None else list(enum_cls.__members__)
    prefix, _, member = weights.strip().rpartition(".")
    if prefix in ("", getattr(enum_cls, "__name__", None)) and member.upper() in names:
        return _PRETRAINED, member.upper() if enum_cls is None else enum_cls[member.upper()]
    path = Path(weights).expanduser()
    if path.exists() or os.sep in weights or "/" in weights or path.suffix:
        return _FILE, _existing_file(path)
    raise ValueError(
        f"unknown weights {weights!r} for model {model_name!r}: expected one of {names}, "
        "a path to a state dict file, or None"
    )


def _existing_file(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    return path


def _load_shapes(weights: WeightsSpec, model_kwargs: dict[str, Any]) -> LoadedModel:
    kind, value = _parse_weights(weights, SHAPES_MODEL_NAME, None)
    if kind == _PRETRAINED:
        if model_kwargs:
            raise ValueError(
                "the bundled shapes weights fix the architecture; got model_kwargs "
                f"{sorted(model_kwargs)}"
            )
        model = shapes_vgg(pretrained=True)
        source: str | None = "DEFAULT"
    else:
        model = ShapesVGG(**model_kwargs)
        source = None
        if kind == _FILE:
            _load_state_dict_strict(model, _read_state_dict(value), SHAPES_MODEL_NAME, str(value))
            source = str(value)
    num_classes = model.classifier.out_features
    categories = (
        list(SHAPE_CLASSES) if num_classes == len(SHAPE_CLASSES) else _numbered(num_classes)
    )
    return LoadedModel(
        model=model,
        transform=ToFloatImage(),
        categories=categories,
        name=SHAPES_MODEL_NAME,
        input_size=_SHAPES_INPUT_SIZE,
        weights=source,
    )


def _load_torchvision(name: str, weights: WeightsSpec, model_kwargs: dict[str, Any]) -> LoadedModel:
    enum_cls = torchvision.models.get_model_weights(name)
    kind, value = _parse_weights(weights, name, enum_cls)

    if kind == _PRETRAINED:
        member: WeightsEnum = value
        path = weights_cache_path(member)
        if not path.is_file():
            _download(member, path, name)
        # torchvision reads the cached file with weights_only=False. Reading it once with
        # weights_only=True first means a tampered checkpoint is refused before any of its
        # pickled code could run; with mmap this costs next to nothing.
        state_dict = _read_state_dict(path, unwrap=False)
        try:
            model = torchvision.models.get_model(name, weights=member, **model_kwargs)
        except RuntimeError as exc:
            if "state_dict" not in str(exc):
                raise
            # Rebuild the architecture torchvision would have built, to name the mismatch.
            reference = torchvision.models.get_model(
                name,
                weights=None,
                **{"num_classes": len(member.meta["categories"]), **model_kwargs},
            )
            error = _mismatch_error(reference, state_dict, name, str(path))
            if error is None:  # Not a key or shape mismatch: torchvision's message says more.
                raise
            raise error from exc
        metadata_weights = member
        source: str | None = f"{type(member).__name__}.{member.name}"
    else:
        model = torchvision.models.get_model(name, weights=None, **model_kwargs)
        if kind == _FILE:
            _load_state_dict_strict(model, _read_state_dict(value), name, str(value))
        metadata_weights = enum_cls.DEFAULT
        source = str(value) if kind == _FILE else None

    categories = list(metadata_weights.meta["categories"])
    num_classes = model_kwargs.get("num_classes", len(categories))
    if num_classes != len(categories):
        categories = _numbered(num_classes)
    transform = metadata_weights.transforms()
    crop = list(getattr(transform, "crop_size", [224]))
    input_size = (int(crop[0]), int(crop[-1]))
    return LoadedModel(
        model=model,
        transform=transform,
        categories=categories,
        name=name,
        input_size=input_size,
        weights=source,
    )


def _download(member: WeightsEnum, path: Path, model_name: str) -> None:
    """Download ``member`` to ``path`` or raise :class:`WeightsUnavailableError`."""

    def unavailable(reason: str) -> WeightsUnavailableError:
        return WeightsUnavailableError(
            f"pretrained weights {type(member).__name__}.{member.name} of model {model_name!r} "
            f"are not available: file {path.name!r} is not in directory {str(path.parent)!r} "
            f"({reason}). Download {member.url} on a machine with network access and place "
            f"it, under that exact name, in {str(path.parent)!r} (that is "
            "<torch.hub.get_dir()>/checkpoints; set TORCH_HOME to use another cache), or pass "
            "weights=<path to a state dict file> or weights=None to load_model (--weights PATH "
            "or --weights random on the command line).",
            file_name=path.name,
            directory=str(path.parent),
            url=member.url,
        )

    if _offline():
        raise unavailable(f"{OFFLINE_ENV_VAR} is set, so no download was attempted")
    path.parent.mkdir(parents=True, exist_ok=True)
    # torchvision's file names end in the first hex digits of the file's SHA-256; checking
    # them catches truncated or corrupted downloads.
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(member.url, str(path), match.group(1) if match else None)
    except (OSError, RuntimeError) as exc:  # URLError, HTTPError and timeouts are OSErrors.
        raise unavailable(f"the download failed: {exc}") from exc


def _read_state_dict(path: str | os.PathLike, unwrap: bool = True) -> dict[str, Tensor]:
    """Read a state dict with ``weights_only=True`` (no pickled code is ever executed).

    Args:
        path: the file written by :func:`torch.save`.
        unwrap: accept a checkpoint dict holding the state dict under ``"state_dict"`` or
            ``"model"``, and strip a ``"module."`` prefix on every key.
    """
    # mmap avoids reading the whole file up front, but only works with the zip format that
    # torch.save has written since PyTorch 1.6; older checkpoints are read normally.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{os.fspath(path)!r} is not a plain state dict: torch.load(weights_only=True) refused "
            f"it ({str(exc).splitlines()[0]}). Re-save it as model.state_dict(), or delete it."
        ) from exc
    except (RuntimeError, EOFError) as exc:
        # A truncated download or a file that torch.save did not write.
        raise ValueError(
            f"{os.fspath(path)!r} could not be read as a torch checkpoint ({exc}); it may be "
            "truncated or corrupt: delete it and download it again."
        ) from exc
    if unwrap and isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(
            f"{os.fspath(path)!r} does not hold a state dict (got {type(obj).__name__})"
        )
    state_dict = dict(obj)
    if unwrap and state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, Tensor], model_name: str, source: str
) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a readable error on mismatch."""
    error = _mismatch_error(model, state_dict, model_name, source)
    if error is not None:
        raise error
    model.load_state_dict(state_dict, strict=True)


def _mismatch_error(
    model: nn.Module, state_dict: Mapping[str, Any], model_name: str, source: str
) -> StateDictMismatchError | None:
    """The error describing how ``state_dict`` fails to fit ``model``, or ``None`` if it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        (k, tuple(expected[k].shape), tuple(state_dict[k].shape))
        for k in expected
        if k in state_dict
        and isinstance(state_dict[k], Tensor)
        and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None

    def listing(items: Sequence[Any]) -> str:
        shown = ", ".join(str(item) for item in items[:_KEYS_SHOWN])
        return shown + (
            f", ... and {len(items) - _KEYS_SHOWN} more" if len(items) > _KEYS_SHOWN else ""
        )

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if shapes:
        parts.append(
            f"{len(shapes)} shape mismatch(es): "
            + listing([f"{k} (model {e}, file {f})" for k, e, f in shapes])
        )
    return StateDictMismatchError(
        f"the state dict in {source!r} does not match the architecture of model "
        f"{model_name!r}: " + "; ".join(parts),
        missing_keys=missing,
        unexpected_keys=unexpected,
        shape_mismatches=shapes,
    )


def _numbered(n: int) -> list[str]:
    return [str(i) for i in range(n)]


# --------------------------------------------------------------------------------------
# timm models
# --------------------------------------------------------------------------------------


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError(
            "timm models need the timm package: pip install 'captum-fullgrad[timm]' "
            "(or pip install timm)"
        ) from None
    return timm


def _resolve_timm_name(name: str) -> str:
    """``"timm/resnet50.a1_in1k"`` -> ``"resnet50.a1_in1k"``, checked against timm's registry."""
    timm = _import_timm()
    spec = name.strip()[len(TIMM_PREFIX) :].strip()
    architecture = spec.split(".", 1)[0]
    if not architecture or not timm.is_model(architecture):
        names = timm.list_models()
        close = difflib.get_close_matches(architecture.lower(), names, n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(TIMM_PREFIX + c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown timm model {spec!r}.{hint} timm.list_models() gives its {len(names)} names."
        )
    return spec


def _timm_weights_location(pretrained_cfg: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
    """Where timm reads pretrained weights: ``(kind, file name, directory, cached path)``.

    ``kind`` is ``"hf-hub"`` (Hugging Face hub repository ``timm/...``, cached under
    ``huggingface_hub``'s cache) or ``"url"`` (a file cached like torchvision's, in
    ``<torch.hub.get_dir()>/checkpoints``); ``cached path`` is ``None`` when not cached.
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    url = pretrained_cfg.get("url")
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, _, revision = str(hub_id).partition("@")
        for file_name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo_id, file_name, revision=revision or None)
            if isinstance(found, str):
                return "hf-hub", file_name, str(Path(found).parent), found
        return "hf-hub", "model.safetensors", str(constants.HF_HUB_CACHE), None
    if url:
        file_name = os.path.basename(urlparse(str(url)).path)
        path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        return "url", file_name, str(path.parent), str(path) if path.is_file() else None
    return "none", "", "", None


def _timm_unavailable(spec: str, pretrained_cfg: Mapping[str, Any], reason: str) -> Exception:
    kind, file_name, directory, _ = _timm_weights_location(pretrained_cfg)
    alternatives = (
        "or pass weights=<path to a state dict file> or weights=None to load_model "
        "(--weights PATH or --weights random on the command line)."
    )
    if kind == "hf-hub":
        repo = str(pretrained_cfg["hf_hub_id"]).partition("@")[0]
        url = f"https://huggingface.co/{repo}/resolve/main/{file_name}"
        message = (
            f"pretrained weights of timm model {spec!r} are not available ({reason}): timm reads "
            f"them from the Hugging Face hub repository {repo!r}, file {file_name!r}, cached in "
            f"{directory!r}. On a machine with network access run "
            f"`huggingface-cli download {repo} {file_name}` (or "
            f"timm.create_model({spec!r}, pretrained=True)) and copy the cache folder "
            f"'models--{repo.replace('/', '--')}' into {directory!r} (set HF_HOME or "
            f"HF_HUB_CACHE to use another cache), {alternatives}"
        )
    elif kind == "url":
        url = str(pretrained_cfg["url"])
        message = (
            f"pretrained weights of timm model {spec!r} are not available ({reason}): file "
            f"{file_name!r} is not in directory {directory!r}. Download {url} on a machine with "
            f"network access and place it, under that exact name, in {directory!r} (that is "
            f"<torch.hub.get_dir()>/checkpoints; set TORCH_HOME to use another cache), "
            f"{alternatives}"
        )
    else:
        return ValueError(
            f"timm model {spec!r} has no pretrained weights; pass weights=None (--weights "
            "random) or a state dict file"
        )
    return WeightsUnavailableError(message, file_name=file_name, directory=directory, url=url)


class _TimmEvalTransform(torchvision.transforms._presets.ImageClassification):
    """timm's evaluation preprocessing (its data config: resize to ``crop / crop_pct``,
    centre crop, normalise), for PIL images and ``(..., 3, H, W)`` tensors alike."""

    def __init__(self, data_config: Mapping[str, Any], input_size: tuple[int, int]) -> None:
        from torchvision.transforms import InterpolationMode

        crop_pct = float(data_config.get("crop_pct") or 1.0)
        interpolation = str(data_config.get("interpolation") or "bilinear").upper()
        mode = InterpolationMode.__members__.get(interpolation, InterpolationMode.BILINEAR)
        super().__init__(
            crop_size=input_size[0],
            resize_size=int(math.floor(min(input_size) / crop_pct)),
            mean=tuple(data_config["mean"]),
            std=tuple(data_config["std"]),
            interpolation=mode,
        )
        self.crop_size = [int(input_size[0]), int(input_size[1])]  # (height, width)
        self.crop_pct = crop_pct


def _timm_categories(pretrained_cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    """Class names where timm knows them (its ImageNet subsets), else ``"0", "1", ...``."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(dict(pretrained_cfg))
        if subset:
            info = ImageNetInfo(subset)
            if info.num_classes() == num_classes:
                return [
                    info.index_to_description(i).split(",")[0].strip() for i in range(num_classes)
                ]
    except (ImportError, OSError, ValueError, KeyError):  # class names are a nicety
        pass
    return _numbered(num_classes)


def _load_timm(name: str, weights: WeightsSpec, model_kwargs: dict[str, Any]) -> LoadedModel:
    timm = _import_timm()
    spec = _resolve_timm_name(name)
    if weights is None:
        kind, value = _RANDOM, Path()
    elif isinstance(weights, os.PathLike):
        kind, value = _FILE, _existing_file(Path(weights))
    elif isinstance(weights, str) and weights.strip().upper() in ("DEFAULT", "PRETRAINED"):
        kind, value = _PRETRAINED, Path()
    elif isinstance(weights, str):
        kind, value = _FILE, _existing_file(Path(weights))
    else:
        raise TypeError(
            "weights of a timm model must be 'DEFAULT', a path or None, "
            f"got {type(weights).__name__}"
        )
    full_name = TIMM_PREFIX + spec
    if kind == _PRETRAINED:
        pretrained_cfg = timm.models.get_pretrained_cfg(spec) or {}
        cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg
        if not cfg:
            # An untagged architecture: its default tag's configuration.
            cfg = timm.create_model(spec, pretrained=False).pretrained_cfg
        _, _, _, cached = _timm_weights_location(cfg)
        if cached is None and _offline():
            raise _timm_unavailable(
                spec, cfg, f"{OFFLINE_ENV_VAR} is set, so no download was attempted"
            )
        try:
            if cached is not None:
                # Read the cached file itself: no network round trip, and timm's filter_fn
                # (checkpoint remapping) still applies. torch.load runs with weights_only.
                model = timm.create_model(
                    spec, pretrained=True, pretrained_cfg_overlay={"file": cached}, **model_kwargs
                )
            else:
                model = timm.create_model(spec, pretrained=True, **model_kwargs)
        except (OSError, ConnectionError) as exc:  # network errors and missing files
            raise _timm_unavailable(spec, cfg, f"the download failed: {exc}") from exc
        except Exception as exc:  # huggingface_hub's own errors (offline mode, gated repos)
            if type(exc).__module__.startswith(("huggingface_hub", "requests", "urllib3")):
                raise _timm_unavailable(spec, cfg, f"the download failed: {exc}") from exc
            raise
        source: str | None = f"{full_name} (pretrained)"
    else:
        model = timm.create_model(spec, pretrained=False, **model_kwargs)
        source = None
        if kind == _FILE:
            _load_state_dict_strict(model, _read_state_dict(value), full_name, str(value))
            source = str(value)
    model_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    from timm.data import resolve_model_data_config

    data_config = resolve_model_data_config(model)
    size = model_kwargs.get("img_size", data_config["input_size"][-2:])
    input_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num_classes = int(getattr(model, "num_classes", 0) or model_cfg.get("num_classes") or 0)
    return LoadedModel(
        model=model,
        transform=_TimmEvalTransform(data_config, input_size),
        categories=_timm_categories(model_cfg, num_classes),
        name=full_name,
        input_size=input_size,
        weights=source,
    )


# --------------------------------------------------------------------------------------
# Your own model: "module:function"
# --------------------------------------------------------------------------------------


def _load_factory(spec: str, weights: WeightsSpec, model_kwargs: dict[str, Any]) -> LoadedModel:
    """``"package.module:function"``: import the module, call the function, wrap the result."""
    import importlib

    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"model {spec!r}: give module:function, e.g. mypackage.nets:build")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model factory {spec!r}: {exc}") from None
    if not callable(factory):
        raise ValueError(f"{spec} is not a function (got {type(factory).__name__})")
    if weights is None:
        raise ValueError(
            f"model {spec!r} comes with the parameters its function gives: random weights "
            "(weights=None, --weights random) do not apply; pass DEFAULT or a state dict file"
        )
    made = factory(**model_kwargs)
    if isinstance(made, LoadedModel):
        loaded = made
    elif isinstance(made, nn.Module):
        loaded = LoadedModel(
            model=made,
            transform=ToFloatImage(),
            categories=[],
            name=spec,
            input_size=FACTORY_INPUT_SIZE,
        )
    elif (
        isinstance(made, tuple)
        and len(made) == 3
        and isinstance(made[0], nn.Module)
        and callable(made[1])
    ):
        model, transform, categories = made
        crop = list(getattr(transform, "crop_size", FACTORY_INPUT_SIZE))
        loaded = LoadedModel(
            model=model,
            transform=transform,
            categories=[str(c) for c in categories],
            name=spec,
            input_size=(int(crop[0]), int(crop[-1])),
        )
    else:
        raise ValueError(
            f"{spec} returned {type(made).__name__}: expected an nn.Module, a LoadedModel or "
            "a tuple (model, transform, categories)"
        )
    if isinstance(weights, (str, os.PathLike)) and str(weights).strip().upper() != "DEFAULT":
        path = _existing_file(Path(weights))
        _load_state_dict_strict(loaded.model, _read_state_dict(path), spec, str(path))
        loaded.weights = str(path)
    elif loaded.weights is None:
        loaded.weights = f"{spec}()"
    if not loaded.categories:
        loaded.categories = _probe_categories(loaded)
    return loaded


def _probe_categories(loaded: LoadedModel) -> list[str]:
    """``"0", "1", ...`` for as many classes as the model outputs on one blank input."""
    parameter = next(loaded.model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    with torch.no_grad():
        blank = torch.zeros(1, 3, *loaded.input_size, device=device, dtype=dtype)
        output = loaded.model.eval()(blank)
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise ValueError(f"model {loaded.name!r} must return logits of shape (N, K)")
    return _numbered(int(output.shape[1]))
