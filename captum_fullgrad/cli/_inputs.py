"""What the subcommands read: models, weights, images, method lists, devices.

Every function turns a library error into :class:`~captum_fullgrad.cli._common.CliError`
with a message in command-line terms (``--weights PATH|random``, not ``weights=...``).
torch and the library are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ._common import CliError, bad_input, one_line

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model`` (required) and ``--weights``."""
    parser.add_argument(
        "--model",
        required=True,
        help="'shapes' (the bundled synthetic-shapes network), a torchvision classifier "
        "such as vgg16_bn, timm/NAME for a timm model (with timm installed), or "
        "module:function returning your model",
    )
    parser.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT (pretrained: torch hub cache or download), a torchvision weights name "
        "such as IMAGENET1K_V1, a path to a state dict file, or 'random' (default: DEFAULT)",
    )


def progress(args: argparse.Namespace) -> bool:
    """A progress bar unless --no-progress or stderr is not a terminal."""
    return not args.no_progress and sys.stderr.isatty()


def device(spec: str) -> "torch.device":
    """The ``--device`` value as a device that exists here (``auto``: CUDA when available)."""
    from .._argtypes import resolve_device

    with bad_input(ValueError):
        return resolve_device(spec)


def methods(
    text: Optional[str],
    default: Optional[Sequence[str]] = None,
    option: str = "--methods",
    params: Optional[Dict[str, Dict[str, Any]]] = None,
) -> List[Any]:
    """The configured methods of a ``--methods`` value (``default`` when it is None: the
    paper's Table 5), read by :func:`captum_fullgrad.methods.resolve_methods`, with
    ``params`` (from :func:`method_params`) applied; a ``--param`` for a method that is not
    selected is bad input."""
    from ..methods import DEFAULT_TABLE5_METHODS, resolve_methods

    chosen = DEFAULT_TABLE5_METHODS if default is None else default
    with bad_input(ValueError, TypeError, prefix=f"{option}: "):
        selected = resolve_methods(text, default=chosen)
    with bad_input(ValueError, TypeError, prefix="--param: "):
        return resolve_methods(selected, params=params)


def method_param(text: str) -> str:
    """The argument type of ``--param METHOD.NAME=VALUE``."""
    if re.fullmatch(r"\s*[A-Za-z][\w-]*\.\w+\s*=.*", text, re.S) is None:
        raise argparse.ArgumentTypeError(
            f"expected METHOD.NAME=VALUE, e.g. integrated_gradients.n_steps=20, got {text!r}"
        )
    return text.strip()


def add_param_option(parser: argparse.ArgumentParser) -> None:
    """``--param METHOD.NAME=VALUE`` (repeatable): a parameter of one selected method."""
    parser.add_argument(
        "--param",
        action="append",
        type=method_param,
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="set a method parameter, e.g. integrated_gradients.n_steps=20 or "
        "gradcam.layer=layer4 (repeatable; values are Python literals, else text)",
    )


def method_params(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``["integrated_gradients.n_steps=20", ...]`` as ``{method: {name: value}}``; values
    are Python literals (``20``, ``0.1``, ``None``, ``True``) or else the text itself. The
    registry checks names and values when the methods are resolved (:func:`methods`)."""
    params: Dict[str, Dict[str, Any]] = {}
    for item in items:
        target, _, text = item.partition("=")
        method, _, name = target.strip().partition(".")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        params.setdefault(method.strip().lower().replace("-", "_"), {})[name.strip()] = value
    return params


def _weights_message(exc: BaseException) -> str:
    """A weights error in command-line terms: ``--weights PATH|random``, not ``load_model``."""
    text = one_line(exc)
    text = re.sub(r",? or pass weights=.*$", "", text).rstrip(" .")
    if getattr(exc, "url", None) is not None:  # WeightsUnavailableError: what to fetch, where
        return f"{text}, or pass --weights PATH (a state dict file) or --weights random"
    return re.sub(r"\bor None\b", "or 'random'", text)


def load_model(name: str, weights: str, device: "torch.device") -> Any:
    """:func:`captum_fullgrad.models.load_model` for ``--model`` and ``--weights``."""
    from ..models import load_model as load

    spec: Any = None if weights.strip().lower() in ("random", "none") else weights
    if spec is not None and spec != "DEFAULT" and Path(spec).expanduser().exists():
        spec = Path(spec).expanduser()  # an existing file is a file, whatever its name
    try:
        return load(name, weights=spec, device=device)
    except (ValueError, TypeError, OSError, KeyError) as exc:
        raise CliError(_weights_message(exc)) from None
    except RuntimeError as exc:  # torch.load on a corrupt file
        raise CliError(
            f"cannot load weights {weights!r} for model {name!r}: {one_line(exc)[:300]}"
        ) from None


def image_paths(items: Sequence[str]) -> List[Path]:
    """The image files that ``items`` (files or directories of PNG/JPEG files) name."""
    paths: List[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise CliError(f"directory {item!r} holds no PNG or JPEG image")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise CliError(f"{item!r} is neither a file nor a directory")
        else:
            raise CliError(f"image {item!r} does not exist")
    return paths


def read_image(path: Path) -> "torch.Tensor":
    """``(3, H, W)`` uint8 RGB image of any PIL mode (16-bit too), or :class:`CliError`."""
    from .._images import ImageReadError
    from .._images import read_image as read

    try:
        image = read(path)
    except (ImageReadError, OSError) as exc:
        raise CliError(f"cannot read image {str(path)!r}: {one_line(exc)[:200]}") from None
    if min(image.shape[1:]) < 1:
        raise CliError(f"cannot read image {str(path)!r}: it has no pixels")
    return image


def prepare(loaded: Any, images: Sequence["torch.Tensor"]) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Model inputs ``(N, C, H, W)`` (the model's transform, at its input size) and the same
    pixels for display ``(N, 3, H, W)`` in [0, 1] (the transform's normalisation undone)."""
    import torch
    import torch.nn.functional as F

    transform = loaded.transform
    size = tuple(loaded.input_size)
    inputs = []
    for image in images:
        x = transform(image)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(
                x[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
            )[0]
        inputs.append(x)
    batch = torch.stack(inputs).float()
    mean = getattr(transform, "mean", None)
    std = getattr(transform, "std", None)
    if mean is not None and std is not None:
        display = batch * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        display = batch
    return batch, display.clamp(0.0, 1.0)


def check_target(target: Optional[int], loaded: Any) -> None:
    """``--target`` must be one of the model's classes."""
    if target is not None and not 0 <= target < len(loaded.categories):
        raise CliError(
            f"--target {target}: model {loaded.name!r} has {len(loaded.categories)} classes "
            f"(0 to {len(loaded.categories) - 1})"
        )


def weights_label(loaded: Any) -> str:
    """How a figure title names the loaded weights."""
    if loaded.weights is None:
        return "random weights"
    if loaded.weights == "DEFAULT":
        return "bundled weights"
    return Path(loaded.weights).name if os.sep in str(loaded.weights) else str(loaded.weights)
