"""The shared device helpers: where a model runs, and waiting for its device."""

import torch
from torch import nn

from captum_fullgrad._device import model_device, synchronize


def test_model_device_is_the_first_parameters_else_the_fallback():
    fallback = torch.device("meta")
    assert model_device(nn.Linear(2, 2), fallback) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2, device="meta"), torch.device("cpu")) == fallback
    assert model_device(nn.ReLU(), fallback) == fallback  # no parameters
    assert model_device(lambda x: x, fallback) == fallback  # not a module


def test_synchronize_off_cuda_is_a_no_op():
    synchronize(torch.device("cpu"))
    synchronize(torch.device("meta"))
