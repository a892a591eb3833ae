"""The lazy torch of the metric modules: the same objects as torch, imported on first use."""

import subprocess
import sys
from pathlib import Path

import torch

from captum_fullgrad.evaluation._lazy import lazy_module, no_grad

ROOT = Path(__file__).resolve().parents[2]


def test_proxy_gives_the_modules_objects():
    proxy = lazy_module("torch.nn.functional")
    assert proxy.relu is torch.nn.functional.relu
    assert lazy_module("torch").Tensor is torch.Tensor
    assert not hasattr(proxy, "no_such_function")


def test_no_grad_runs_the_function_without_gradients():
    @no_grad
    def double(x):
        """Doubles."""
        return 2 * x

    y = double(torch.ones(2, requires_grad=True))
    assert not y.requires_grad and double.__doc__ == "Doubles."


def test_metric_modules_import_torch_only_when_used():
    code = (
        "import sys\n"
        "from captum_fullgrad.evaluation import registered_metrics\n"
        "from captum_fullgrad.evaluation.road import noisy_linear_imputation\n"
        "keys = [m.key for m in registered_metrics()]\n"
        "before = 'torch' in sys.modules\n"
        "import torch\n"
        "x = torch.rand(1, 3, 8, 8)\n"
        "out = noisy_linear_imputation(x, torch.zeros(1, 8, 8, dtype=torch.bool))\n"
        "print(before, 'road' in keys, tuple(out.shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "False True (1, 3, 8, 8)"
