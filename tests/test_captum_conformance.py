"""Captum's own generated configurations, re-targeted from Saliency at FullGradient.

``captum.testing.attr.helpers.test_config`` lists the models and arguments Captum runs
its target and hook-removal tests on. Every configuration that tests ``Saliency`` runs
here against :class:`FullGradient`; the MLP inputs ``(B, F)`` are fed as ``(B, F, 1, 1)``
images. The models are in training mode (``nn.Module``'s default) without BatchNorm or
dropout, so the mode policy lets them run. The checks are written for this package:

- targets: attributing a batch equals attributing each example with its own target;
- hooks: no module keeps a hook after a call, nor after a call with a wrong target;
- completeness: with ``postprocess="signed"`` the attribution sums to ``f(x) + delta``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from captum.testing.attr.helpers.test_config import config
from torch import Tensor, nn
from torch.nn.modules import module as module_file

from captum_fullgrad import FullGradient

SALIENCY_CONFIGS = [c for c in config if Saliency in c["algorithms"]]
TARGET_CONFIGS = [
    c for c in SALIENCY_CONFIGS if isinstance(c["attribute_args"]["target"], (list, Tensor))
]


class AsImages(nn.Module):
    """Call a ``(B, F)`` model with ``(B, F, 1, 1)`` image-shaped inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args):
        flat = [a.flatten(1) if isinstance(a, Tensor) and a.dim() == 4 else a for a in args]
        return self.model(*flat)


def _images(inputs):
    if isinstance(inputs, tuple):
        return tuple(t[..., None, None] for t in inputs)
    return inputs[..., None, None]


def _setup(test_config, postprocess):
    model = AsImages(copy.deepcopy(test_config["model"]))
    args = copy.deepcopy(test_config["attribute_args"])
    args["inputs"] = _images(args["inputs"])
    method = FullGradient(model)
    noise_tunnel = test_config.get("noise_tunnel", False)
    if noise_tunnel:
        args = {**args, "postprocess": postprocess}  # NoiseTunnel passes it on
        return model, NoiseTunnel(method), args
    args["postprocess"] = postprocess
    return model, method, args


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _example(value, i):
    if isinstance(value, tuple):
        return tuple(_example(v, i) for v in value)
    return value[i : i + 1] if isinstance(value, Tensor) else value


@pytest.mark.parametrize("postprocess", ["eq4", "signed"])
@pytest.mark.parametrize("test_config", TARGET_CONFIGS, ids=lambda c: c["name"])
def test_captum_targets(test_config, postprocess):
    model, method, args = _setup(test_config, postprocess)
    assert model.training
    batched = _as_tuple(method.attribute(**args))
    inputs, targets = args["inputs"], args["target"]
    extra = args.get("additional_forward_args")
    count = len(_as_tuple(inputs)[0])
    per_example_targets = len(targets) == count
    for i in range(count):
        single_args = dict(args, inputs=_example(inputs, i))
        if extra is not None:
            single_args["additional_forward_args"] = _example(extra, i)
        choices = [targets[i] if per_example_targets else targets]
        if per_example_targets:
            choices.append(targets[i : i + 1])
        for target in choices:
            single = _as_tuple(method.attribute(**dict(single_args, target=target)))
            for whole, one in zip(batched, single):
                torch.testing.assert_close(whole[i : i + 1], one, rtol=0, atol=1e-4)
    assert model.training  # the model's mode is untouched


@pytest.mark.parametrize("test_config", SALIENCY_CONFIGS, ids=lambda c: c["name"])
def test_captum_signed_completeness(test_config):
    if test_config.get("noise_tunnel"):
        pytest.skip("NoiseTunnel averages attributions; its delta is Captum's business")
    model, method, args = _setup(test_config, "signed")
    attributions, delta = method.attribute(**args, return_convergence_delta=True)
    inputs = _as_tuple(args["inputs"])
    extra = args.get("additional_forward_args")
    extra = extra if isinstance(extra, tuple) else (() if extra is None else (extra,))
    output = model(*inputs, *extra)
    target = args["target"]
    from captum._utils.common import _select_targets

    selected = _select_targets(output, target).reshape(-1).detach()
    total = sum(a.flatten(1).sum(1) for a in _as_tuple(attributions))
    torch.testing.assert_close(total - selected, delta, rtol=0, atol=1e-4)
    assert (delta.abs() <= 1e-4 * selected.abs().clamp_min(1)).all()


def _hook_counts(model: nn.Module):
    return [
        (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
        for m in model.modules()
    ]


@pytest.mark.parametrize("wrong_target", [False, True])
@pytest.mark.parametrize("test_config", SALIENCY_CONFIGS, ids=lambda c: c["name"])
def test_captum_hook_removal(test_config, wrong_target):
    model, method, args = _setup(test_config, "eq4")
    before = _hook_counts(model)
    global_before = (
        dict(module_file._global_forward_hooks),
        dict(module_file._global_forward_pre_hooks),
    )
    if wrong_target:
        args["target"] = (9999,) * 20
        with pytest.raises(ValueError, match="target tuple"):
            method.attribute(**args)
    else:
        method.attribute(**args)
    assert _hook_counts(model) == before == [(0, 0, 0)] * len(before)
    assert (
        dict(module_file._global_forward_hooks),
        dict(module_file._global_forward_pre_hooks),
    ) == global_before
