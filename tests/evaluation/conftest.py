"""Shared fixtures of the evaluation tests: one tiny evaluation run for every test that
reads a report (6 generated scenes, three methods plus the controls, fast settings)."""

import pytest
import torch

from captum_fullgrad.datasets import synthetic_shapes
from captum_fullgrad.evaluation import EvaluationReport, EvaluationSettings, evaluate
from captum_fullgrad.models import ShapesVGG
from captum_fullgrad.testing import randomize_parameters_
from tests.evaluation._tiny import METHODS, N


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    yield


@pytest.fixture(scope="package")
def data():
    return synthetic_shapes(N, seed=10_000)


@pytest.fixture(scope="package")
def model():
    torch.manual_seed(0)
    net = ShapesVGG(widths=(8, 16))
    return randomize_parameters_(net, seed=0).eval()


@pytest.fixture(scope="package")
def settings():
    return EvaluationSettings.fast(n_sanity=2, n_sensitivity=2, n_bootstrap=100)


@pytest.fixture(scope="package")
def report(model, data, settings) -> EvaluationReport:
    images, labels, masks = data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate(
            model,
            images,
            labels,
            masks,
            methods=METHODS,
            settings=settings,
            progress=False,
            model_name="tiny",
        )
    finally:
        torch.set_num_threads(threads)
