"""SmoothGrad image by image (what ``attribute`` does for per-image seeds) vs one batched call.

``captum-fullgrad attribute`` calls stochastic methods once per image, each with its own
seed, so that a map does not depend on its batch. This measures what that costs against
one call over the whole batch (the noise tunnel batches the noisy copies either way), on
the bundled shapes model at 64 px, 1 CPU thread.

Usage::

    PYTHONPATH=. python benchmarks/scale_smoothgrad_calls.py --out benchmarks/results/scale
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_fullgrad.datasets import synthetic_shapes  # noqa: E402
from captum_fullgrad.methods import get_method  # noqa: E402
from captum_fullgrad.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images (default: 16)")
    parser.add_argument("--samples", type=int, default=50, help="noisy copies (default: 50)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    model = load_model("shapes").model
    images, _, _ = synthetic_shapes(args.n, seed=10_000)
    with torch.no_grad():
        targets = model(images).argmax(1)
    smooth = get_method("smoothgrad", nt_samples=args.samples)
    smooth(model, images[:2], targets[:2])  # warm-up
    batched, per_image = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        smooth(model, images, targets)
        batched.append((time.perf_counter() - start) / args.n)
        start = time.perf_counter()
        for i in range(args.n):
            smooth.configure(seed=i)(model, images[i : i + 1], targets[i : i + 1])
        per_image.append((time.perf_counter() - start) / args.n)
    result = {
        "model": "shapes",
        "n_images": args.n,
        "nt_samples": args.samples,
        "s_per_image_batched_min": min(batched),
        "s_per_image_per_image_calls_min": min(per_image),
        "per_image_over_batched": min(per_image) / min(batched),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smoothgrad_calls.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
