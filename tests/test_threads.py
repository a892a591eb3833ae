"""Thread safety: another thread's forward passes and attributions never change a result.

The capture's and the replay's global module hooks see every thread's module calls, and
PyTorch has one forward-mode AD level per process; these tests run a second thread that
keeps the same model (or another one) busy while the main thread attributes, and compare
every result with one computed alone. Each test is bounded in time (a few seconds).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from captum_fullgrad import FullGradient, full_jacobian
from captum_fullgrad.replay import plans_for
from captum_fullgrad.testing import randomize_parameters_

_SECONDS = 2.0
_MAX_CALLS = 40


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    return randomize_parameters_(model, seed).double().eval()


def _busy(work, stop: threading.Event, errors: list) -> threading.Thread:
    def loop() -> None:
        try:
            while not stop.is_set():
                work()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("other", ["same_model", "other_model", "plain_forward"])
def test_concurrent_calls_give_the_results_of_a_call_alone(other):
    model, second = _net(0), _net(1)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    layered = FullGradient(model, layers=["3"])
    expected, expected_delta = layered.attribute(x, target=1, return_convergence_delta=True)
    expected_names = list(full_jacobian(model, x, target=1).bias_jacobians)
    work = {
        "same_model": lambda: FullGradient(model).attribute(x, target=2),
        "other_model": lambda: FullGradient(second).attribute(x, target=0),
        "plain_forward": lambda: (model(x), second(x)),
    }[other]
    stop, errors = threading.Event(), []
    thread = _busy(work, stop, errors)
    try:
        deadline = time.monotonic() + _SECONDS
        calls = 0
        while calls < _MAX_CALLS and time.monotonic() < deadline:
            attribution, delta = layered.attribute(x, target=1, return_convergence_delta=True)
            torch.testing.assert_close(attribution, expected)
            torch.testing.assert_close(delta, expected_delta)
            assert list(full_jacobian(model, x, target=1).bias_jacobians) == expected_names
            calls += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert calls > 0
    # The other thread never made the plan of this signature look mismatched.
    cache = plans_for(model)
    assert not cache._mismatches
    assert len(cache) >= 1


def test_global_hooks_are_gone_after_concurrent_calls():
    from torch.nn.modules import module as module_file

    before = (dict(module_file._global_forward_hooks), dict(module_file._global_forward_pre_hooks))
    test_concurrent_calls_give_the_results_of_a_call_alone("same_model")
    after = (dict(module_file._global_forward_hooks), dict(module_file._global_forward_pre_hooks))
    assert after == before


def test_layer_attribution_and_another_threads_forward_do_not_mix():
    """LayerFullGradient hooks the user's layer: another thread's forward through it must
    neither receive the attribution's tensor nor feed its own into the attribution."""
    from captum_fullgrad import LayerFullGradient

    model = _net(0)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    other_x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        other_expected = model(other_x)
    layer = LayerFullGradient(model, model[2])
    expected = layer.attribute(x, target=1)
    wrong: list = []

    def forward() -> None:
        with torch.no_grad():
            if not torch.allclose(model(other_x), other_expected):
                wrong.append(1)

    stop, errors = threading.Event(), []
    thread = _busy(forward, stop, errors)
    try:
        deadline = time.monotonic() + _SECONDS
        calls = 0
        while calls < _MAX_CALLS and time.monotonic() < deadline:
            torch.testing.assert_close(layer.attribute(x, target=1), expected)
            calls += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert not wrong


def test_each_thread_forms_terms_in_its_own_workspace():
    """Two threads replaying at once must not share the memory that their activation terms
    are formed in (each would overwrite the other's); one thread's calls share one, whatever
    the plan or model."""
    from captum_fullgrad.capture import thread_workspace

    model = _net(0)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    FullGradient(model).attribute(x, target=1)
    FullGradient(model).attribute(x, target=1)  # a replay: its activation used the workspace
    here = thread_workspace()
    assert torch.float64 in here._buffers
    FullGradient(_net(1)).attribute(x[:1], target=1)
    assert thread_workspace() is here
    there: list = []
    thread = threading.Thread(target=lambda: there.append(thread_workspace()))
    thread.start()
    thread.join()
    assert there[0] is not here
